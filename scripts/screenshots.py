"""Screenshots of ComfyUI's web UI for the README and the template browser: the real server
(tests/comfy_server.py) in headless Chromium (tests/browser.py, Playwright and the system's Chromium).

    COMFYUI_PATH=/work/shared/hosts/comfyui-0.28.0 PYTHONDONTWRITEBYTECODE=1 \
        .venv-comfyui-0.28.0/bin/python scripts/screenshots.py [--only PARTS] [--workflow NAME.json]

(any ComfyUI works, the pictures show the frontend it serves; the README's are of 0.28's; the
venv needs playwright and Pillow, scripts/requirements-test.txt, and /usr/bin/chromium or
CHROMIUM). About 2 minutes on 2 CPU cores, most of it writing the checkpoint for the preview.

PARTS, comma-separated (default: all of them):

- nodes: docs/nodes.png, the pack's four nodes as fresh nodes (default widgets) side by side.
- workflow: docs/workflow.png, an example workflow (--workflow, default pladis_sdxl.json) opened
  in the UI and fit to the view.
- preview: docs/preview.png, the "PLADIS Attention Preview" node and the Preview Image node with
  the grid that a prompt run on the server put there. The server gets the random-weight SD1.5
  checkpoint of tests/random_checkpoint.py (2 GB, written at start-up), so the maps show the
  structure of an untrained model, not a subject.
- thumbnails: example_workflows/<name>.jpg for every example_workflows/<name>.json, the
  workflow as the UI draws it, fit to the view (800x500, the template browser's thumbnails).

The UI runs in focus mode (no menus or sidebars) without the minimap, the canvas menu and the
canvas info, and draws the nodes in full at any zoom (its low-detail rendering off). The
"missing models" overlay that a workflow without its model files raises is closed, and the
nodes' missing-model marks are cleared, before each shot.
"""
import argparse
import io
import sys
import time
from pathlib import Path

from PIL import Image

PACK = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PACK / "tests"))
from browser import SETTINGS, Browser, seed_settings  # noqa: E402
from comfy_server import comfyui_server  # noqa: E402

PARTS = ("nodes", "workflow", "preview", "thumbnails")
OURS = ["ApplyPLADIS", "PladisFluxPatch", "ApplyTGATE", "PladisAttentionPreview"]
# No minimap, canvas menu or canvas info; nodes drawn in full at any zoom (no low-detail boxes).
UI_SETTINGS = {**SETTINGS, "Comfy.Graph.CanvasInfo": False, "Comfy.Minimap.Visible": False,
               "Comfy.Graph.CanvasMenu": False, "LiteGraph.Canvas.MinFontSizeForLOD": 0}
# The page is 60 px taller than the region shot: focus mode keeps its "exit" button at the top right.
VIEWPORT = (1600, 1060)
REGION = {"x": 0, "y": 60, "width": 1600, "height": 1000}
THUMBNAIL = (800, 500)
MARGIN = 28  # px around the nodes: room for the node source badge above a title
PROMPT = "a red fox reading a newspaper on a park bench"


def tidy(ui):
    """Closes the warnings and clears what they left on the nodes, the selection and the hover."""
    ui.close_warnings()
    ui.page.evaluate("""() => { for (const n of app.graph._nodes) n.has_errors = false;
        app.canvas.deselectAll?.(); app.canvas.setDirty(true, true) }""")
    ui.page.mouse.move(1, VIEWPORT[1] - 1)


def shoot_nodes(ui, out):
    ui.clear_graph()
    ui.reset_view()
    x = 0
    for node_type in OURS:
        node_id = ui.add_node(node_type, [x, 0])
        x += ui.node_geometry(node_id)["size"][0] + 40
    tidy(ui)
    ui.screenshot(out, ui.fit_to(REGION), MARGIN)


def shoot_workflow(ui, workflow, out):
    ui.load_workflow(workflow)
    tidy(ui)
    ui.screenshot(out, ui.fit_to(REGION, fill=0.94), MARGIN)


def shoot_thumbnail(ui, workflow, out):
    ui.load_workflow(workflow)
    tidy(ui)
    ui.fit_to(REGION)
    picture = Image.open(io.BytesIO(ui.screenshot(None, REGION))).convert("RGB")
    picture.resize(THUMBNAIL, Image.LANCZOS).save(out, quality=85, optimize=True)


def shoot_preview(ui, server, out):
    """Builds checkpoint -> prompt, empty latent -> Attention Preview -> Preview Image on the
    canvas, runs the UI's own API prompt of it on the server for this tab, and shoots the last two
    nodes once the image is in."""
    ui.clear_graph()
    ui.reset_view()
    ids = ui.page.evaluate("""([ckpt, text]) => {
        const add = (type, pos, size, values = {}) => { const n = LiteGraph.createNode(type); n.pos = pos;
            if (size) n.size = size; app.graph.add(n);
            for (const [k, v] of Object.entries(values)) n.widgets.find(w => w.name === k).value = v; return n };
        const ckpt_node = add('CheckpointLoaderSimple', [0, 0], null, {ckpt_name: ckpt});
        const text_node = add('CLIPTextEncode', [0, 160], [320, 130], {text});
        const latent = add('EmptyLatentImage', [0, 340], null, {width: 256, height: 256, batch_size: 1});
        const preview = add('PladisAttentionPreview', [380, 0]);
        const image = add('PreviewImage', [preview.pos[0] + preview.size[0] + 50, 0], [800, 360]);
        ckpt_node.connect(0, preview, 0); ckpt_node.connect(1, text_node, 0);
        text_node.connect(0, preview, 1); latent.connect(0, preview, 2); preview.connect(0, image, 0);
        app.canvas.setDirty(true, true); return [preview.id, image.id] }""", ["v1-5-pruned-emaonly.safetensors", PROMPT])
    prompt = ui.page.evaluate("async () => (await app.graphToPrompt()).output")
    server.run(prompt, ui.client_id)
    ui.page.wait_for_function("""(id) => { const n = app.graph.getNodeById(id);
        return n.imgs?.length && n.imgs.every(i => i.complete && i.naturalWidth > 0) }""", arg=ids[1], timeout=60_000)
    tidy(ui)
    ui.screenshot(out, ui.fit_to(REGION, ui.graph_bounds(ids)), MARGIN)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated, of: {', '.join(PARTS)}")
    parser.add_argument("--workflow", default="pladis_sdxl.json", help="example workflow for docs/workflow.png")
    args = parser.parse_args()
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts: {sorted(unknown)}")
    started = time.monotonic()
    docs = PACK / "docs"
    docs.mkdir(exist_ok=True)
    with comfyui_server(checkpoint="preview" in parts) as server:
        seed_settings(server, UI_SETTINGS)
        with Browser(viewport=VIEWPORT) as browser:
            ui = browser.new_page(server.url).open()
            ui.page.evaluate("() => app.extensionManager.command.execute('Workspace.ToggleFocusMode')")
            print(f"ComfyUI {server.version}, frontend {ui.frontend_version} ({time.monotonic() - started:.0f} s)", flush=True)
            done = []
            if "nodes" in parts:
                shoot_nodes(ui, docs / "nodes.png")
                done.append(docs / "nodes.png")
            if "workflow" in parts:
                shoot_workflow(ui, PACK / "example_workflows" / args.workflow, docs / "workflow.png")
                done.append(docs / "workflow.png")
            if "preview" in parts:
                shoot_preview(ui, server, docs / "preview.png")
                done.append(docs / "preview.png")
            if "thumbnails" in parts:
                for workflow in sorted((PACK / "example_workflows").glob("*.json")):
                    shoot_thumbnail(ui, workflow, workflow.with_suffix(".jpg"))
                    done.append(workflow.with_suffix(".jpg"))
            for path in done:
                print(f"{path.relative_to(PACK)}: {Image.open(path).size}")
            errors = ui.app_errors()
            if errors:
                print(f"{len(errors)} error(s) in the browser:", *errors, sep="\n", file=sys.stderr)
    print(f"done in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
