"""End to end through the real ComfyUI server, as a user runs it.

The server of tests/comfy_server.py: a temporary base directory holds the pack (a symlink in custom_nodes/) and a checkpoint with
the real SD1.5 layout and random weights (tests/random_checkpoint.py). The server is ComfyUI's
own main.py, started on the CPU on a free port with --base-directory there. The test asks
/object_info for the pack's nodes, turns example_workflows/pladis_sd15.json (UI format) into
an API prompt the way the frontend does, shrinks it (64x64, 2 steps), queues it with Apply
PLADIS and with Apply PLADIS bypassed, and checks the two saved PNGs. The server is stopped and
the directory removed whatever happens. Never skipped: a server that does not start is a
failure that shows the end of its log.
"""
import copy
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfy_server import CHECKPOINT, ServerError, comfyui_server, log_tail

PACK = Path(__file__).resolve().parent.parent
WORKFLOW = PACK / "example_workflows" / "pladis_sd15.json"
# Node types that only the frontend knows: they never reach the server.
FRONTEND_ONLY = {"Note", "MarkdownNote"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
BYPASS, NEVER = 4, 2  # LiteGraph node modes


@pytest.fixture(scope="module")
def server():
    try:
        with comfyui_server(checkpoint=True) as srv:
            yield srv
    except ServerError as e:
        pytest.fail(str(e))


# UI workflow -> API prompt, as the frontend builds it.


def widget_inputs(info):
    """(name, spec) of a node's inputs that are widgets, in the order of its widgets_values."""
    order = info.get("input_order") or {s: list(info["input"].get(s, {})) for s in ("required", "optional")}
    for section in ("required", "optional"):
        for name in order.get(section, []):
            spec = info["input"][section][name]
            if isinstance(spec[0], list) or spec[0] in WIDGET_TYPES:
                yield name, spec


def has_control_widget(name, spec):
    """The frontend puts a 'control after generate' value (fixed, randomize...) after seed widgets."""
    options = spec[1] if len(spec) > 1 else {}
    return spec[0] == "INT" and (options.get("control_after_generate") or name in ("seed", "noise_seed"))


def to_api(workflow, object_info):
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}

    def source(link_id):
        _, node_id, slot, _, _, kind = links[link_id]
        node = nodes[node_id]
        if node.get("mode") == BYPASS:  # the output passes on the node's first input of its type
            for inp in node["inputs"]:
                if inp["type"] == kind and inp.get("link") is not None:
                    return source(inp["link"])
            raise ValueError(f"bypassed node {node_id} has no {kind} input to pass on")
        return [str(node_id), slot]

    prompt = {}
    for node in nodes.values():
        if node["type"] in FRONTEND_ONLY or node.get("mode") in (BYPASS, NEVER):
            continue
        if node["type"] not in object_info:
            raise ValueError(f"the server does not know node type {node['type']} (node {node['id']})")
        values = node.get("widgets_values", [])
        inputs, i = {}, 0
        for name, spec in widget_inputs(object_info[node["type"]]):
            if i >= len(values):
                raise ValueError(f"node {node['id']} ({node['type']}) has too few widget values for {name}")
            inputs[name] = values[i]
            i += 2 if has_control_widget(name, spec) else 1
        if i != len(values):
            raise ValueError(f"node {node['id']} ({node['type']}): {len(values)} widget values, {i} used")
        for inp in node["inputs"]:
            if inp.get("link") is not None:
                inputs[inp["name"]] = source(inp["link"])
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def only(prompt, class_type):
    found = [v for v in prompt.values() if v["class_type"] == class_type]
    assert len(found) == 1, f"expected one {class_type}, found {len(found)}"
    return found[0]


def saved_image(srv, entry, prompt):
    save_id = next(k for k, v in prompt.items() if v["class_type"] == "SaveImage")
    images = entry["outputs"][save_id]["images"]
    assert len(images) == 1
    path = srv.base / "output" / images[0]["subfolder"] / images[0]["filename"]
    assert path.is_file(), f"SaveImage reported {path}, which does not exist"
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (64, 64) and img.mode == "RGB"
        pixels = np.asarray(img)
    assert len(np.unique(pixels)) > 16, "the image is (nearly) uniform: the sampler or the VAE produced garbage"
    return path, pixels


# The tests.


def test_server_lists_the_pack_nodes_with_their_inputs(server):
    info = server.get("/object_info")
    categories = {k: v["category"] for k, v in info.items()}
    expected = {
        "ApplyPLADIS": (
            {"model": "MODEL", "scale": "FLOAT", "alpha": "FLOAT", "start_percent": "FLOAT",
             "end_percent": "FLOAT", "include_middle": "BOOLEAN"},
            {"blocks": "STRING"},
        ),
        "PladisFluxPatch": (
            {"model": "MODEL", "scale": "FLOAT", "alpha": "FLOAT", "start_percent": "FLOAT",
             "end_percent": "FLOAT", "double_blocks": "STRING", "single_blocks": "STRING"},
            {},
        ),
        "ApplyTGATE": (
            {"model": "MODEL", "gate_step": "INT", "sp_interval": "INT", "fi_interval": "INT",
             "warm_up": "INT", "after_gate": "COMBO"},
            {},
        ),
    }
    for node_id, (required, optional) in expected.items():
        assert node_id in info, f"{node_id} missing from /object_info"
        node = info[node_id]
        inputs = node["input"]
        assert {k: v[0] for k, v in inputs["required"].items()} == required, node_id
        assert {k: v[0] for k, v in inputs.get("optional", {}).items()} == optional, node_id
        assert node["output"] == ["MODEL"], node_id
        assert node["category"] == categories["Epsilon Scaling"], node_id  # beside the host's own patch nodes
    pladis = info["ApplyPLADIS"]["input"]
    defaults = {k: v[1].get("default") for k, v in pladis["required"].items() if k != "model"}
    assert defaults == {"scale": 2.0, "alpha": 1.5, "start_percent": 0.0, "end_percent": 1.0, "include_middle": False}
    assert info["ApplyTGATE"]["input"]["required"]["after_gate"][1]["options"] == ["uncond", "cond"]
    assert CHECKPOINT in info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]


def test_sd15_example_workflow_runs_and_pladis_changes_the_image(server):
    info = server.get("/object_info")
    workflow = json.loads(WORKFLOW.read_text())

    prompt = to_api(workflow, info)
    assert only(prompt, "CheckpointLoaderSimple")["inputs"]["ckpt_name"] == CHECKPOINT
    pladis = only(prompt, "ApplyPLADIS")["inputs"]
    assert {k: v for k, v in pladis.items() if k != "model"} == {
        "scale": 2.0, "alpha": 1.5, "start_percent": 0.0, "end_percent": 1.0, "include_middle": False, "blocks": ""}
    sampler = only(prompt, "KSampler")["inputs"]
    assert (sampler["steps"], sampler["cfg"], sampler["sampler_name"], sampler["scheduler"], sampler["denoise"]) == (
        25, 7.0, "euler", "normal", 1.0)
    pladis_id = next(k for k, v in prompt.items() if v["class_type"] == "ApplyPLADIS")
    assert sampler["model"] == [pladis_id, 0]

    def shrink(p, prefix):
        only(p, "EmptyLatentImage")["inputs"].update(width=64, height=64, batch_size=1)
        only(p, "KSampler")["inputs"]["steps"] = 2
        only(p, "SaveImage")["inputs"]["filename_prefix"] = prefix
        return p

    with_pladis = shrink(prompt, "pladis_sd15_on")
    bypassed_workflow = copy.deepcopy(workflow)
    next(n for n in bypassed_workflow["nodes"] if n["type"] == "ApplyPLADIS")["mode"] = BYPASS
    without = shrink(to_api(bypassed_workflow, info), "pladis_sd15_off")
    assert "ApplyPLADIS" not in {v["class_type"] for v in without.values()}
    loader_id = next(k for k, v in without.items() if v["class_type"] == "CheckpointLoaderSimple")
    assert only(without, "KSampler")["inputs"]["model"] == [loader_id, 0]

    on_path, on = saved_image(server, server.run(with_pladis), with_pladis)
    off_path, off = saved_image(server, server.run(without), without)
    assert on_path != off_path
    assert not np.array_equal(on, off), "Apply PLADIS did not change the image"
    assert "Apply PLADIS: patched" in log_tail(server.log, 400)
