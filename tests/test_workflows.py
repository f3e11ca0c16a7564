"""The shipped example workflows load against the real host's nodes and our schemas."""
import json
from pathlib import Path

import pytest

WORKFLOWS = sorted((Path(__file__).resolve().parent.parent / "example_workflows").glob("*.json"))


def test_there_are_example_workflows():
    assert WORKFLOWS


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_nodes_links_and_widgets_are_valid(host, path):
    workflow = json.loads(path.read_text())
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for n in nodes.values():
        assert n["type"] in host.nodes.NODE_CLASS_MAPPINGS, f"unknown node {n['type']}"
    for link_id, source, source_slot, target, target_slot, kind in workflow["links"]:
        assert nodes[source]["outputs"][source_slot]["type"] == kind
        assert link_id in nodes[source]["outputs"][source_slot]["links"]
        assert nodes[target]["inputs"][target_slot] == {**nodes[target]["inputs"][target_slot], "type": kind, "link": link_id}
    ours = [n for n in nodes.values() if n["type"] in ("ApplyPLADIS", "ApplyTGATE")]
    assert ours, "an example workflow should use the pack's nodes"
    for n in ours:
        schema = host.node(n["type"]).define_schema()
        widgets = [i for i in schema.inputs if getattr(i, "default", None) is not None]
        assert len(widgets) == len(n["widgets_values"])
        for spec, value in zip(widgets, n["widgets_values"]):
            assert type(value) is type(spec.default), spec.id
            if getattr(spec, "min", None) is not None:
                assert spec.min <= value <= (spec.max if spec.max is not None else value), spec.id
            if getattr(spec, "options", None):
                assert value in spec.options, spec.id
