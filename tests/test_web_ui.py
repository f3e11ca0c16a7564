"""The pack in ComfyUI's web UI: the real server (tests/comfy_server.py) in headless Chromium (tests/browser.py).

One server and one browser tab per run (a module-scoped fixture), on whichever host the suite
runs on: ComfyUI 0.3.75 serves frontend 1.32.9, ComfyUI 0.28 frontend 1.45.21. No checkpoint:
the UI only needs the node definitions; a workflow's "missing models" warning (1.32.9: a dialog
that offers the downloads of the workflow's properties.models; 1.45.21: the error overlay) is
expected and closed. The tests check:

- the frontend that the server serves, and the pack's four nodes registered in it under their
  display names, with no errors on the page at start-up;
- that the missing-node check below sees a node type the host lacks (a control: it proves the
  selectors find each frontend's warning);
- each example workflow opened through the app's file input (Workflow > Open): the graph on the
  canvas is the file's, every node type is registered (none drawn as a missing node), no
  missing-nodes warning (1.32.9: the "global-missing-nodes" dialog; 1.45.21: the error overlay's
  "Some nodes are missing"), the pack's nodes show no error and hold the file's widget values;
- each example workflow's model files listed by the UI as missing, each with a Download
  button, in their folders (1.32.9: the dialog, with the URLs; 1.45.21: the error overlay's
  list), exactly the files of the workflow's properties.models;
- the node library's search box (sidebar) lists each of the four nodes by its display name,
  and, where the host's own nodes carry search aliases (0.28), by an alias of its own that is
  in neither its name nor its description;
- hovering a node's title, each widget and each input socket on the canvas shows the tooltip
  text of the node's schema (/object_info: description and input tooltips);
- the template browser lists the pack's workflows under the pack's folder name, each with its
  thumbnail (example_workflows/<name>.jpg), the same names that /api/workflow_templates serves,
  and opening one there puts that workflow on the canvas.

Every test ends by checking that the page raised no error and logged none that is the app's
(tests/browser.py says what is not). Never skipped: no ComfyUI, no Chromium or no Playwright is
a failure.
"""
import importlib.metadata
import json
import re
import time
from pathlib import Path

import pytest

from browser import MISSING_NODES_TEXT, Browser, seed_settings
from host import comfyui_host
from comfy_server import ServerError, comfyui_server
from test_workflows import GAP, newer_than_host

PACK = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((PACK / "example_workflows").glob("*.json"))
OURS = {"ApplyPLADIS": "Apply PLADIS", "PladisFluxPatch": "PLADIS Flux Patch", "ApplyTGATE": "Apply TGATE",
        "PladisAttentionPreview": "PLADIS Attention Preview"}
# The missing-model warnings that loading a workflow without its model files may raise.
MISSING_MODELS = "global-missing-models-warning"  # 1.32.9's dialog
BADGE = 20  # px above a custom node's title: its source badge (the pack's name)
MODELS_LINE = re.compile(r"^\d+ required models? (is|are) missing$")  # 1.45.21's error overlay


class UI:
    def __init__(self, server, page, object_info):
        self.server, self.page, self.object_info = server, page, object_info

    @property
    def where(self):
        return f"ComfyUI {self.server.version}, frontend {self.page.frontend_version}"


@pytest.fixture(scope="module")
def ui():
    try:
        with comfyui_server(checkpoint=False) as server:
            seed_settings(server)
            object_info = server.get("/object_info")
            with Browser() as browser:
                page = browser.new_page(server.url)
                try:
                    page.open()
                except Exception as e:
                    pytest.fail(f"the web UI did not start: {e}\npage messages: {page.messages[-20:]}")
                yield UI(server, page, object_info)
    except ServerError as e:
        pytest.fail(str(e))


def text(s):
    return " ".join(str(s).split())


def unexpected_warnings(warnings):
    """The warnings other than those for missing model files."""
    out = []
    for w in warnings:
        if w["kind"] == MISSING_MODELS:
            continue
        if w["kind"] == "error-overlay":  # title, the messages, Dismiss / See Errors / Show missing models
            lines = [line.strip() for line in w["text"].splitlines() if line.strip()]
            messages = [line for line in lines if not re.fullmatch(r"\d+ ERRORS?|Dismiss|See Errors|Show missing models", line)]
            if all(MODELS_LINE.match(line) for line in messages):
                continue
        out.append(w)
    return out


def apart(a, b):
    """Two [x, y, width, height] boxes at least GAP apart."""
    return (a[0] + a[2] + GAP <= b[0] or b[0] + b[2] + GAP <= a[0]
            or a[1] + a[3] + GAP <= b[1] or b[1] + b[3] + GAP <= a[1])


def test_the_ui_starts_with_the_pack_nodes_registered(ui):
    assert ui.page.frontend_version == importlib.metadata.version("comfyui-frontend-package"), \
        "the page runs another frontend than the one installed for this ComfyUI"
    registered = ui.page.registered_types()
    assert {k: registered.get(k) for k in OURS} == OURS, ui.where
    assert {k: ui.object_info[k]["display_name"] for k in OURS} == OURS
    ui.page.assert_no_app_errors(what=f"start-up ({ui.where})")


def test_the_missing_node_check_sees_an_unknown_node(ui, tmp_path):
    workflow = json.loads((PACK / "example_workflows" / "pladis_sd15.json").read_text())
    node = next(n for n in workflow["nodes"] if n["type"] == "ApplyPLADIS")
    node["type"] = "PladisNoSuchNode"
    path = tmp_path / "control.json"
    path.write_text(json.dumps(workflow))
    since = time.monotonic()
    warnings = ui.page.load_workflow(path)
    unknown = [n["type"] for n in ui.page.graph_nodes() if not n["known"]]
    assert unknown == ["PladisNoSuchNode"], ui.where
    assert [w for w in warnings if MISSING_NODES_TEXT.search(w["text"])], f"no missing-nodes warning ({ui.where}): {warnings}"
    ui.page.close_warnings()
    ui.page.assert_no_app_errors(since, f"the control workflow ({ui.where})")


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_example_workflow_loads_with_every_node_known(ui, path):
    workflow = json.loads(path.read_text())
    since = time.monotonic()
    warnings = ui.page.load_workflow(path)
    nodes = ui.page.graph_nodes()
    assert sorted((n["id"], n["type"]) for n in nodes) == sorted((n["id"], n["type"]) for n in workflow["nodes"]), \
        "the canvas does not hold the workflow's nodes"
    unknown = {n["type"] for n in nodes if not n["known"]}
    newer = newer_than_host(ui.server.root, path)
    assert unknown == newer, f"{path.name}: node types the web UI does not know ({ui.where})"
    missing = [w for w in warnings if MISSING_NODES_TEXT.search(w["text"])]
    if newer:  # a host older than the workflow: the UI names what is missing
        assert len(missing) == 1 and all(t in missing[0]["text"] for t in newer), f"{path.name} ({ui.where}): {warnings}"
    else:
        assert not missing, f"{path.name}: the UI warns of missing nodes ({ui.where}): {missing}"
        assert not unexpected_warnings(warnings), f"{path.name}: warnings other than missing models ({ui.where}): {warnings}"
    # As the UI draws them (it may grow a node beyond its saved size), a custom node's source
    # badge above its title included.
    drawn = [(n, [n["box"][0], n["box"][1] - BADGE, n["box"][2], n["box"][3] + BADGE] if n["type"] in OURS else n["box"])
             for n in nodes if n["known"]]
    for i, (a, box_a) in enumerate(drawn):
        for b, box_b in drawn[i + 1:]:
            assert apart(box_a, box_b), f"{path.name}: {a['type']} {a['id']} and {b['type']} {b['id']} overlap on the canvas"
    by_id = {n["id"]: n for n in workflow["nodes"]}
    ours = [n for n in nodes if n["type"] in OURS]
    assert ours, f"{path.name} has none of the pack's nodes"
    for n in ours:
        assert not n["has_errors"], f"{path.name}: {n['type']} (node {n['id']}) is marked with an error ({ui.where})"
        assert list(n["widgets"].values()) == by_id[n["id"]]["widgets_values"], \
            f"{path.name}: {n['type']} (node {n['id']}) shows other widget values than the file's"
    ui.page.close_warnings()
    ui.page.assert_no_app_errors(since, f"{path.name} ({ui.where})")


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_the_ui_offers_every_model_file_for_download(ui, path):
    """With none of its model files on the server, loading a workflow lists each file its
    loaders read (properties.models: folder and name) with a Download button. 1.32.9 lists
    bypassed loaders' files too, with their URLs; 1.45.21 those of the loaders that run."""
    if newer_than_host(ui.server.root, path):
        pytest.skip(f"this host lacks some of {path.name}'s nodes: the UI reports those first")
    workflow = json.loads(path.read_text())
    since = time.monotonic()
    ui.page.load_workflow(path)
    listed = ui.page.missing_models()
    with_urls = bool(listed) and len(listed[0]) == 3  # 1.32.9
    expected = {(m["directory"], m["name"], m["url"])[:3 if with_urls else 2]
                for n in workflow["nodes"] if with_urls or n.get("mode", 0) == 0
                for m in n.get("properties", {}).get("models", [])}
    assert sorted(set(listed)) == sorted(expected), f"{path.name} ({ui.where})"
    ui.page.close_warnings()
    ui.page.assert_no_app_errors(since, f"{path.name}'s missing models ({ui.where})")


def test_the_node_library_search_lists_the_pack_nodes(ui):
    page = ui.page.page
    since = time.monotonic()
    ui.page.close_warnings()
    ui.page.sidebar_button("Node Library").click()
    panel = page.locator(".side-bar-panel")
    box = panel.get_by_placeholder(re.compile(r"^Search"))  # 1.32.9: "Search Nodes...", 1.45.21: "Search..."
    box.wait_for(state="visible", timeout=10_000)
    # Result rows: role treeitem on both (1.32.9: PrimeVue tree li, 1.45.21: a flat list of divs);
    # a node's row holds just its display name.
    rows_js = "() => [...document.querySelectorAll('.side-bar-panel [role=treeitem]')].map(e => e.innerText.trim())"
    # Where the host's own nodes carry search aliases (0.28), ours do too, and an alias in
    # neither the node's name nor its description finds it.
    host_has_aliases = any(v.get("search_aliases") for k, v in ui.object_info.items() if k not in OURS)
    aliases = {name: ui.object_info[node].get("search_aliases", []) for node, name in OURS.items()}
    assert all(aliases.values()) == host_has_aliases and any(aliases.values()) == host_has_aliases, aliases
    words = {name: f"{name} {ui.object_info[node]['description']}".lower() for node, name in OURS.items()}
    by_alias = [(next(a for a in found if a not in words[name]), [name]) for name, found in aliases.items() if found]
    listed = {}
    for query, wanted in [("PLADIS", ["Apply PLADIS", "PLADIS Flux Patch", "PLADIS Attention Preview"]),
                          *[(name, [name]) for name in OURS.values()], *by_alias]:
        box.fill("")
        box.fill(query)
        try:
            page.wait_for_function(f"(names) => names.every(n => ({rows_js})().includes(n))", arg=wanted, timeout=10_000)
        except Exception:
            pass
        listed[query] = page.evaluate(rows_js)
        assert set(wanted) <= set(listed[query]), f"searching '{query}' ({ui.where}) lists {listed[query]}"
    box.fill("")
    ui.page.sidebar_button("Node Library").click()  # closes the sidebar tab
    ui.page.assert_no_app_errors(since, f"the node library ({ui.where})")


@pytest.mark.parametrize("node_type", list(OURS))
def test_tooltips_show_the_schema_text(ui, node_type):
    info = ui.object_info[node_type]
    specs = {name: spec for part in ("required", "optional") for name, spec in info["input"].get(part, {}).items()}
    since = time.monotonic()
    ui.page.close_warnings()
    ui.page.clear_graph()
    ui.page.reset_view()
    node_id = ui.page.add_node(node_type, [200, 200])
    ui.page.page.wait_for_timeout(300)
    g = ui.page.node_geometry(node_id)
    (left, top), (width, _) = g["pos"], g["size"]
    spots = {"(title)": (left + 40, top - g["title"] / 2)}
    for name, slot, is_widget in g["inputs"]:
        if not is_widget:
            spots[name] = tuple(slot)
    for name, y, height in g["widgets"]:
        if name in specs:  # not the "control after generate" widget the UI adds after a seed
            spots[name] = (left + width / 2, top + y + height / 2)
    assert set(spots) == {"(title)", *specs}, f"the canvas shows inputs {sorted(spots)}, the schema has {sorted(specs)}"
    expected = {"(title)": info["description"], **{name: spec[1]["tooltip"] for name, spec in specs.items()}}
    shown = {name: ui.page.tooltip_at(*ui.page.to_screen(*spot)) for name, spot in spots.items()}
    assert {k: text(v) for k, v in shown.items()} == {k: text(v) for k, v in expected.items()}, ui.where
    ui.page.assert_no_app_errors(since, f"the tooltips of {node_type} ({ui.where})")


def test_the_template_browser_lists_the_pack_workflows(ui):
    names = sorted(p.stem for p in WORKFLOWS)
    served = ui.server.get("/api/workflow_templates")
    assert sorted(served.get(comfyui_host.PACK_NAME, [])) == names, f"/api/workflow_templates: {served}"
    page = ui.page.page
    since = time.monotonic()
    ui.page.close_warnings()
    ui.page.clear_graph()
    ui.page.sidebar_button("Templates").click()
    dialog = page.locator("[aria-labelledby=global-workflow-template-selector]")  # both frontends
    dialog.wait_for(state="visible", timeout=10_000)
    # The navigation lists custom nodes' templates under EXTENSIONS, by the pack's folder name.
    dialog.get_by_text(comfyui_host.PACK_NAME, exact=True).first.click()
    cards = dialog.locator("[data-testid=template-workflows-content] [data-testid^=template-workflow-]")
    try:
        page.wait_for_function("(n) => document.querySelectorAll('[data-testid=template-workflows-content] "
                               "[data-testid^=template-workflow-]').length === n", arg=len(names), timeout=10_000)
    except Exception:
        pass
    listed = {card.get_attribute("data-testid").removeprefix("template-workflow-"): card for card in cards.all()}
    assert sorted(listed) == names, f"the template browser's '{comfyui_host.PACK_NAME}' lists {sorted(listed)} ({ui.where})"
    for name, card in listed.items():
        assert card.locator("h3").first.inner_text().strip() == name
    # Thumbnails: the frontend fetches /api/workflow_templates/<pack>/<name>.jpg and shows it as a
    # blob: URL, or its default picture when there is none.
    missing = []
    for name, card in listed.items():
        card.scroll_into_view_if_needed()
        image = card.locator("img").first
        try:
            page.wait_for_function("(e) => e.complete && e.naturalWidth > 0 && e.src.startsWith('blob:')",
                                   arg=image.element_handle(), timeout=5_000)
        except Exception:
            missing.append(f"{name}: {image.get_attribute('src')}")
    assert not missing, f"templates shown without their thumbnail ({ui.where}): {missing}"
    # Opening one puts it on the canvas.
    listed["pladis_sd15"].click()
    dialog.wait_for(state="hidden", timeout=10_000)
    workflow = json.loads((PACK / "example_workflows" / "pladis_sd15.json").read_text())
    page.wait_for_function("(n) => app.graph._nodes.length === n", arg=len(workflow["nodes"]), timeout=10_000)
    assert sorted(n["type"] for n in ui.page.graph_nodes()) == sorted(n["type"] for n in workflow["nodes"])
    page.wait_for_timeout(1500)
    missing_nodes = [w for w in ui.page.warnings() if MISSING_NODES_TEXT.search(w["text"])]
    assert not missing_nodes, missing_nodes
    ui.page.close_warnings()
    # Thumbnails that are missing give 404s, which the check above already names.
    ui.page.assert_no_app_errors(since, f"the template browser ({ui.where})")
