"""The shipped example workflows load against the real host's node registry and our schemas."""
import json
from pathlib import Path

import pytest
from PIL import Image

FOLDER = Path(__file__).resolve().parent.parent / "example_workflows"
WORKFLOWS = sorted(FOLDER.glob("*.json"))
EXPECTED = {
    "pladis_sd15": {"ApplyPLADIS"}, "pladis_sdxl": {"ApplyPLADIS"}, "pladis_sdxl_lightning": {"ApplyPLADIS"},
    "pladis_flux_dev": {"PladisFluxPatch"}, "pladis_flux_schnell": {"PladisFluxPatch"},
    "tgate_sdxl": {"ApplyTGATE"}, "pladis_tgate_sdxl": {"ApplyPLADIS", "ApplyTGATE"},
}
OURS = {"ApplyPLADIS", "PladisFluxPatch", "ApplyTGATE", "PladisAttentionPreview"}
FRONTEND_ONLY = {"Note", "MarkdownNote"}  # drawn by the web UI, never executed
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def test_the_documented_workflows_are_all_there():
    assert {path.stem for path in WORKFLOWS} == set(EXPECTED)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_each_workflow_has_a_thumbnail_and_a_note(path):
    with Image.open(path.with_suffix(".jpg")) as thumbnail:
        assert thumbnail.format == "JPEG" and min(thumbnail.size) >= 128
    notes = [n for n in json.loads(path.read_text())["nodes"] if n["type"] == "Note"]
    assert len(notes) == 1 and "expects" in notes[0]["widgets_values"][0].lower()


def widget_specs(node_class):
    """(name, spec) of the inputs the UI shows as widgets, in order, with the UI's extra
    'control_after_generate' value after seeds."""
    types = node_class.INPUT_TYPES()
    for part in ("required", "optional"):
        for name, spec in types.get(part, {}).items():
            if isinstance(spec[0], list) or spec[0] in WIDGET_TYPES:
                yield name, spec
                options = spec[1] if len(spec) > 1 else {}
                if options.get("control_after_generate") or name in ("seed", "noise_seed"):
                    yield f"{name} control", (["fixed", "increment", "decrement", "randomize"], {})


def check_widget(name, spec, value):
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
    if isinstance(kind, list) or kind == "COMBO":
        choices = kind if isinstance(kind, list) else options.get("options", [])
        if not name.rstrip("0123456789").endswith("_name"):  # model file names (ckpt_name, clip_name1...) depend on the user's folders
            assert value in choices, f"{name}: {value!r} is not one of {choices}"
        return
    expected = {"INT": int, "FLOAT": (int, float), "STRING": str, "BOOLEAN": bool}[kind]
    assert isinstance(value, expected) and not (kind != "BOOLEAN" and isinstance(value, bool)), f"{name}: {value!r} is not {kind}"
    if kind in ("INT", "FLOAT"):
        assert options.get("min", value) <= value <= options.get("max", value), f"{name}: {value} out of range"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_nodes_links_and_widgets_are_valid(host, path):
    registry = host.all_nodes()
    workflow = json.loads(path.read_text())
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for n in nodes.values():
        assert n["type"] in registry or n["type"] in FRONTEND_ONLY, f"unknown node {n['type']}"
    for link_id, source, source_slot, target, target_slot, kind in workflow["links"]:
        assert nodes[source]["outputs"][source_slot]["type"] == kind
        assert link_id in nodes[source]["outputs"][source_slot]["links"]
        assert nodes[target]["inputs"][target_slot] == {**nodes[target]["inputs"][target_slot], "type": kind, "link": link_id}
    assert {n["type"] for n in nodes.values()} & OURS == EXPECTED[path.stem]
    for n in nodes.values():
        if n["type"] in FRONTEND_ONLY:
            continue
        specs = list(widget_specs(registry[n["type"]]))
        assert len(specs) == len(n["widgets_values"]), f"{n['type']}: {len(n['widgets_values'])} widget values for {len(specs)} widgets"
        for (name, spec), value in zip(specs, n["widgets_values"]):
            check_widget(name, spec, value)
        linked = {i["name"] for i in n["inputs"] if i.get("link") is not None}
        types = registry[n["type"]].INPUT_TYPES()
        required = {name for name, spec in types["required"].items() if not (isinstance(spec[0], list) or spec[0] in WIDGET_TYPES)}
        assert required <= linked, f"{n['type']}: inputs {required - linked} are not connected"
