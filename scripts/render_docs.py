"""Renders the README's pictures and the example workflows' thumbnails.

    .venv/bin/python scripts/render_docs.py

- docs/nodes.png: the pack's nodes as cards drawn from their schemas in the real host (this
  machine has no browser to take screenshots of the web UI).
- docs/preview.png: a "PLADIS Attention Preview" grid rendered by the test suite's small
  SD1.5-architecture UNet with random weights (so the maps show structure, not a subject).
- example_workflows/*.jpg: a diagram of each workflow's nodes and links.
"""
import json
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw

PACK = Path(__file__).resolve().parent.parent
sys.path.append(str(PACK / "tests"))
OURS = {"ApplyPLADIS": "Apply PLADIS", "PladisFluxPatch": "PLADIS Flux Patch", "ApplyTGATE": "Apply TGATE",
        "PladisAttentionPreview": "PLADIS Attention Preview"}
BACKGROUND, CARD, OUR_CARD, NOTE_CARD, TEXT = (32, 32, 36), (60, 62, 70), (120, 60, 140), (90, 70, 40), (235, 235, 240)


def main():
    from host import Host, comfyui_host

    host = Host(comfyui_host.find_comfyui() or comfyui_host.comfyui_path())
    (PACK / "docs").mkdir(exist_ok=True)
    node_cards(host).save(PACK / "docs" / "nodes.png")
    preview_grid(host).save(PACK / "docs" / "preview.png")
    for path in sorted((PACK / "example_workflows").glob("*.json")):
        workflow_diagram(json.loads(path.read_text())).save(path.with_suffix(".jpg"), quality=90)


def node_cards(host):
    """Each node as a card: its name, its inputs with their defaults, its output."""
    cards = []
    for node_id, title in OURS.items():
        schema = host.node(node_id).define_schema()
        lines = [f"{i.id}: {i.default!r}" if getattr(i, "default", None) is not None else f"{i.id}  ({i.get_io_type()})" for i in schema.inputs]
        lines += [f"-> {o.display_name}" for o in schema.outputs]
        card = Image.new("RGB", (300, 34 + 16 * len(lines)), CARD)
        draw = ImageDraw.Draw(card)
        draw.rectangle([0, 0, 299, 24], fill=OUR_CARD)
        draw.text((8, 6), title, fill=TEXT)
        for row, line in enumerate(lines):
            draw.text((10, 30 + 16 * row), line, fill=TEXT)
        cards.append(card)
    sheet = Image.new("RGB", (sum(c.width for c in cards) + 20 * (len(cards) + 1), max(c.height for c in cards) + 40), BACKGROUND)
    left = 20
    for card in cards:
        sheet.paste(card, (left, 20))
        left += card.width + 20
    return sheet


def preview_grid(host):
    from host_models import build_unet, conditioning

    with torch.inference_mode():
        image = host.node("PladisAttentionPreview").execute(
            build_unet("sd15"), conditioning("sd15", 1), {"samples": torch.zeros(1, 4, 32, 32)}, token_index=3
        ).result[0]
    return Image.fromarray((image[0].numpy() * 255).astype("uint8"))


def workflow_diagram(workflow):
    """The workflow's nodes at their positions (ours in purple, notes in brown) and its links."""
    nodes = {n["id"]: n for n in workflow["nodes"]}
    x0 = min(n["pos"][0] for n in nodes.values()) - 20
    y0 = min(n["pos"][1] for n in nodes.values()) - 20
    x1 = max(n["pos"][0] + n["size"][0] for n in nodes.values()) + 20
    y1 = max(n["pos"][1] + n["size"][1] for n in nodes.values()) + 20
    scale = min(640 / (x1 - x0), 400 / (y1 - y0))
    image = Image.new("RGB", (int((x1 - x0) * scale), int((y1 - y0) * scale)), BACKGROUND)
    draw = ImageDraw.Draw(image)

    def box(n):
        (x, y), (w, h) = n["pos"], n["size"]
        return [(x - x0) * scale, (y - y0) * scale, (x + w - x0) * scale, (y + h - y0) * scale]

    for _, source, _, target, _, _ in workflow["links"]:
        a, b = box(nodes[source]), box(nodes[target])
        draw.line([(a[2], (a[1] + a[3]) / 2), (b[0], (b[1] + b[3]) / 2)], fill=(150, 150, 160), width=2)
    for n in nodes.values():
        fill = OUR_CARD if n["type"] in OURS else NOTE_CARD if n["type"] == "Note" else CARD
        b = box(n)
        draw.rectangle(b, fill=fill, outline=(200, 200, 210))
        draw.text((b[0] + 4, b[1] + 3), n.get("title") or OURS.get(n["type"], n["type"]), fill=TEXT)
    return image


if __name__ == "__main__":
    main()
