"""The shipped example workflows: their files, layout and model metadata as they are, and their
nodes, links and widgets against the real host's node registry and our schemas."""
import json
from pathlib import PurePosixPath
from pathlib import Path
from urllib.parse import urlparse

import pytest
from PIL import Image

from host import comfyui_host

FOLDER = Path(__file__).resolve().parent.parent / "example_workflows"
WORKFLOWS = sorted(FOLDER.glob("*.json"))
EXPECTED = {
    "pladis_sd15": {"ApplyPLADIS"}, "pladis_sdxl": {"ApplyPLADIS"}, "pladis_sdxl_lightning": {"ApplyPLADIS"},
    "pladis_flux_dev": {"PladisFluxPatch"}, "pladis_flux_schnell": {"PladisFluxPatch"},
    "tgate_sdxl": {"ApplyTGATE"}, "pladis_tgate_sdxl": {"ApplyPLADIS", "ApplyTGATE"},
    "pladis_qwen_image": {"PladisFluxPatch"}, "pladis_z_image_turbo": {"PladisFluxPatch"}, "pladis_chroma": {"PladisFluxPatch"},
    "pladis_sd35": {"PladisFluxPatch"}, "pladis_hidream": {"PladisFluxPatch"}, "pladis_hunyuan_video15": {"PladisFluxPatch"},
    "pladis_wan22_t2v": {"ApplyPLADIS"}, "pladis_ltx2": {"ApplyPLADIS"},
}
# Node types that a workflow uses and an older host lacks, by host version. There, the
# workflow's other nodes are checked, and exactly these must be missing: the web UI names them
# in its missing-nodes warning (tests/test_web_ui.py). Every other host must have them all.
NEWER_THAN_HOST = {
    "0.3.75": {  # LTX-2 came after ComfyUI 0.3.75
        "pladis_ltx2": {"LTXAVTextEncoderLoader", "LTXVAudioVAELoader", "LTXVEmptyLatentAudio", "LTXVConcatAVLatent",
                        "LTXVSeparateAVLatent", "LTXVLatentUpsampler", "LTXVAudioVAEDecode", "ManualSigmas"},
    },
}
OURS = {"ApplyPLADIS", "PladisFluxPatch", "ApplyTGATE", "PladisAttentionPreview"}
FRONTEND_ONLY = {"Note", "MarkdownNote"}  # drawn by the web UI, never executed
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# A widget value with one of these endings is a model file; the web UI offers to download a
# missing one from its node's properties.models, for these names and from these sites only.
MODEL_EXTENSIONS = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".gguf")
DOWNLOADABLE_EXTENSIONS = (".safetensors", ".sft", ".ckpt", ".pth", ".pt")
DOWNLOAD_SITES = ("huggingface.co", "civitai.com")
TITLE_HEIGHT = 30  # LiteGraph draws a node's title bar above its pos
GAP = 10  # the least space between two nodes


def workflow(path):
    return json.loads(path.read_text())


def model_files(node):
    return [v for v in node.get("widgets_values") or [] if isinstance(v, str) and v.lower().endswith(MODEL_EXTENSIONS)]


def test_the_documented_workflows_are_all_there():
    assert {path.stem for path in WORKFLOWS} == set(EXPECTED)


def test_the_newer_node_types_are_in_their_workflows():
    for version, workflows in NEWER_THAN_HOST.items():
        for stem, types in workflows.items():
            assert types <= {n["type"] for n in workflow(FOLDER / f"{stem}.json")["nodes"]}, f"{version}: {stem}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_each_workflow_has_a_thumbnail(path):
    with Image.open(path.with_suffix(".jpg")) as thumbnail:
        assert thumbnail.format == "JPEG" and min(thumbnail.size) >= 128


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_each_workflow_has_a_note(path):
    notes = [n for n in workflow(path)["nodes"] if n["type"] == "Note"]
    assert len(notes) == 1 and "expects" in notes[0]["widgets_values"][0].lower()


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_each_workflow_uses_the_pack(path):
    used = {n["type"] for n in workflow(path)["nodes"]} & OURS
    assert used, "none of the pack's nodes"
    assert used == EXPECTED[path.stem]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_links_agree_with_both_ends(path):
    """Plain graphs: every node and link at the top level (no subgraphs), each link held by its
    source output and its target input, and nothing else held."""
    graph = workflow(path)
    assert not graph.get("definitions", {}).get("subgraphs"), "subgraphs: flatten them"
    nodes = {n["id"]: n for n in graph["nodes"]}
    assert len(nodes) == len(graph["nodes"]), "repeated node ids"
    links = {link[0]: link for link in graph["links"]}
    assert len(links) == len(graph["links"]), "repeated link ids"
    for link_id, source, source_slot, target, target_slot, kind in graph["links"]:
        assert source in nodes and target in nodes, f"link {link_id}: a node is missing"
        assert nodes[source]["outputs"][source_slot]["type"] == kind
        assert link_id in nodes[source]["outputs"][source_slot]["links"]
        assert nodes[target]["inputs"][target_slot] == {**nodes[target]["inputs"][target_slot], "type": kind, "link": link_id}
    held = [(n["id"], i["link"]) for n in nodes.values() for i in n.get("inputs", []) if i.get("link") is not None]
    held += [(n["id"], link) for n in nodes.values() for o in n.get("outputs", []) for link in o.get("links") or []]
    for node_id, link_id in held:
        assert link_id in links and node_id in links[link_id][1:5:2], f"node {node_id} holds link {link_id}, which does not join it"
    assert graph["last_node_id"] >= max(nodes) and graph["last_link_id"] >= max(links, default=0)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_no_two_nodes_overlap(path):
    nodes = workflow(path)["nodes"]
    boxes = [(n, (n["pos"][0], n["pos"][1] - TITLE_HEIGHT, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])) for n in nodes]
    for i, (a, (ax0, ay0, ax1, ay1)) in enumerate(boxes):
        assert a["size"][0] > 0 and a["size"][1] > 0
        for b, (bx0, by0, bx1, by1) in boxes[i + 1:]:
            apart = ax1 + GAP <= bx0 or bx1 + GAP <= ax0 or ay1 + GAP <= by0 or by1 + GAP <= ay0
            assert apart, f"{a['type']} {a['id']} and {b['type']} {b['id']} overlap (or are less than {GAP} apart)"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_every_model_file_can_be_downloaded_from_the_ui(path):
    """Each model file a node loads has its entry in properties.models: the same name, an https
    download from a site the web UI accepts, whose file name is the model's, and a folder."""
    loaders = [n for n in workflow(path)["nodes"] if model_files(n)]
    assert loaders, "loads no model"
    for n in loaders:
        models = n.get("properties", {}).get("models", [])
        assert sorted(m["name"] for m in models) == sorted(set(model_files(n))), f"{n['type']} {n['id']}: models {models} for {model_files(n)}"
        for m in models:
            url = urlparse(m["url"])
            assert url.scheme == "https" and url.hostname in DOWNLOAD_SITES, f"{m['name']}: {m['url']} is not an https download from {DOWNLOAD_SITES}"
            assert PurePosixPath(url.path).name == m["name"], f"{m['url']} does not download {m['name']}"
            assert m["name"].endswith(DOWNLOADABLE_EXTENSIONS), f"the web UI downloads no {m['name']}"
            assert isinstance(m["directory"], str) and m["directory"] and "/" not in m["directory"]


# --- against the running host's registry ---


def newer_than_host(root, path):
    """The node types of the workflow that this host lacks, as NEWER_THAN_HOST lists them."""
    return NEWER_THAN_HOST.get(comfyui_host.version(root), {}).get(path.stem, set())


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


def combo_choices(spec):
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
    return kind if isinstance(kind, list) else options.get("options", [])


def check_widget(name, spec, value):
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
    if isinstance(kind, list) or kind == "COMBO":
        # model files depend on the user's folders (their download entries are checked above and below)
        if not (isinstance(value, str) and value.lower().endswith(MODEL_EXTENSIONS)):
            assert value in combo_choices(spec), f"{name}: {value!r} is not one of {combo_choices(spec)}"
        return
    expected = {"INT": int, "FLOAT": (int, float), "STRING": str, "BOOLEAN": bool}[kind]
    assert isinstance(value, expected) and not (kind != "BOOLEAN" and isinstance(value, bool)), f"{name}: {value!r} is not {kind}"
    if kind in ("INT", "FLOAT"):
        assert options.get("min", value) <= value <= options.get("max", value), f"{name}: {value} out of range"


def check_widget_count(node_type, node_class, specs, values):
    """As many values as widgets; the web UI leaves widgets after the saved values at their
    defaults, so a workflow may stop before trailing optional widgets that have one."""
    assert len(values) <= len(specs), f"{node_type}: {len(values)} widget values for {len(specs)} widgets"
    optional = node_class.INPUT_TYPES().get("optional", {})
    for name, spec in specs[len(values):]:
        has_default = "default" in (spec[1] if len(spec) > 1 else {})
        assert name in optional and has_default, f"{node_type}: {len(values)} widget values for {len(specs)} widgets; {name} has no value"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_nodes_links_and_widgets_are_valid(host, path):
    registry = host.all_nodes()
    nodes = {n["id"]: n for n in workflow(path)["nodes"]}
    unknown = {n["type"] for n in nodes.values()} - set(registry) - FRONTEND_ONLY
    assert unknown == newer_than_host(host.root, path), "node types this host lacks"
    for n in nodes.values():
        if n["type"] in FRONTEND_ONLY or n["type"] in unknown:
            continue
        node_class = registry[n["type"]]
        specs = list(widget_specs(node_class))
        check_widget_count(n["type"], node_class, specs, n["widgets_values"])
        for (name, spec), value in zip(specs, n["widgets_values"]):
            check_widget(name, spec, value)
        types = node_class.INPUT_TYPES()
        declared = {**types["required"], **types.get("optional", {})}
        for i in n["inputs"]:
            assert i["name"] in declared, f"{n['type']}: no input {i['name']}"
        linked = {i["name"] for i in n["inputs"] if i.get("link") is not None}
        required = {name for name, spec in types["required"].items() if not (isinstance(spec[0], list) or spec[0] in WIDGET_TYPES)}
        assert required <= linked, f"{n['type']}: inputs {required - linked} are not connected"
        # the outputs the workflow lists, in the registry's order (0.28's SaveImage has one that 0.3.75's lacks)
        outputs = [o["type"] for o in n["outputs"]]
        assert outputs == list(node_class.RETURN_TYPES)[:len(outputs)], f"{n['type']}: outputs {outputs}, registry {node_class.RETURN_TYPES}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_model_files_download_to_the_folder_their_node_reads(host, path, monkeypatch):
    """Each properties.models entry names one of the host's model folders, and the node offers
    that file from that folder: with the file in no other folder, its widget lists it."""
    import folder_paths

    registry = host.all_nodes()
    folders = set(folder_paths.folder_names_and_paths)
    for n in workflow(path)["nodes"]:
        if n["type"] in newer_than_host(host.root, path):
            continue
        for m in n.get("properties", {}).get("models", []):
            assert m["directory"] in folders, f"{m['name']}: {m['directory']!r} is not a model folder of this host ({sorted(folders)})"
            monkeypatch.setattr(folder_paths, "get_filename_list",
                                lambda folder, m=m: [m["name"]] if folder_paths.map_legacy(folder) == m["directory"] else [])
            offered = [name for (name, spec), value in zip(widget_specs(registry[n["type"]]), n["widgets_values"])
                       if value == m["name"] and m["name"] in combo_choices(spec)]
            assert offered, f"{n['type']} does not read {m['name']} from {m['directory']}"
            monkeypatch.undo()
