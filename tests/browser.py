"""ComfyUI's web UI in headless Chromium (Playwright): for tests/test_web_ui.py and scripts/screenshots.py.

The browser is the system's Chromium (CHROMIUM, default /usr/bin/chromium: Debian's `chromium`
package; Playwright's own browser download is not needed) with a fresh profile in a temporary
folder. Every request that does not go to the ComfyUI server is aborted (the frontend asks
api.comfy.org and huggingface.co for news, node packs and model sizes; these machines have no
internet, and a blocked request fails at once instead of after a DNS timeout) and recorded.

What the page reports is kept: uncaught exceptions ("pageerror") and console errors. app_errors()
drops the ones that are not the app's: the browser's own line for each failed request ("Failed
to load resource": a blocked request to the internet, or the 404 a fresh user's files give), and
a few messages that the frontend itself logs with or without this pack (KNOWN_FRONTEND_ERRORS).

The two frontends (1.32.9 for ComfyUI 0.3.75, 1.45.21 for 0.28) differ; the selectors used here
work on both unless a comment says which is which.
"""
import json
import os
import re
import tempfile
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
APP_TIMEOUT = 120_000  # ms for the app to start
# A returning user: no first-run template browser over the canvas.
SETTINGS = {"Comfy.TutorialCompleted": True}
# Console errors that the frontends log on their own (checked against the same host with no
# custom node at all), each matched at the start of the message.
KNOWN_FRONTEND_ERRORS = (
    # 1.32.9, at start-up: GraphView's load() sets a setting that has no definition (onChange reads .id of undefined).
    "TypeError: Cannot read properties of undefined (reading 'id')",
    # 1.45.21, at start-up.
    "ComfyApp graph accessed before initialization",
    # Both, in the missing-models dialog: the HEAD request for a model's size goes to its download
    # URL (huggingface.co), which is blocked here.
    "Error fetching file size: TypeError: Failed to fetch",
)
# Files a fresh user does not have yet: the frontend asks for them and takes the 404 as "none".
FRESH_USER_404 = re.compile(r"/(api/)?userdata(/|\?)|/user\.css$")

# Which missing-nodes warning each frontend shows: 1.32.9 a dialog, 1.45.21 the error overlay.
MISSING_NODES_TEXT = re.compile(r"missing nodes|nodes are missing", re.I)
# Visible dialogs and overlays: PrimeVue dialogs (both), the error overlay (1.45.21), toasts.
WARNINGS_JS = """() => [...document.querySelectorAll('.p-dialog, [role=dialog], [data-testid=error-overlay], .p-toast-message')]
    .filter(e => e.offsetParent !== null || getComputedStyle(e).position === 'fixed')
    .filter(e => getComputedStyle(e).visibility !== 'hidden' && e.getBoundingClientRect().width > 0)
    .map(e => ({kind: e.getAttribute('aria-labelledby') || e.getAttribute('data-testid') || e.className.split(' ')[0],
                text: e.innerText}))"""

# 1.32.9's missing-models dialog: one row per model with its download button.
MISSING_MODELS_DIALOG_JS = """() => [...document.querySelectorAll(
        '[aria-labelledby=global-missing-models-warning] .comfy-missing-models li')]
    .filter(li => li.querySelector('button[aria-label^=Download]'))
    .map(li => { const label = li.querySelector('span[title]'); return [...label.innerText.split(' / '), label.title] })"""
# 1.45.21's missing-models list: "folder (n)" headings, each followed by its "file (n)" rows,
# each row with a "Download <file>" button.
MISSING_MODELS_PANEL_JS = """(group) => { const out = []; let folder = null;
    for (const line of group.innerText.split('\\n').map(s => s.trim())) {
        const m = line.match(/^(.+) \\(\\d+\\)$/); if (!m) continue;
        if (!/\\.[a-z0-9]+$/i.test(m[1])) { folder = m[1]; continue }
        if (group.querySelector(`[data-testid=missing-model-download][aria-label="Download ${m[1]}"]`)) out.push([folder, m[1]]) }
    return out }"""


class BrowserError(AssertionError):
    pass


class Message:
    def __init__(self, kind, text, url=""):
        self.kind, self.text, self.url = kind, text, url
        self.time = time.monotonic()

    def __repr__(self):
        return f"{self.kind}: {self.text}" + (f" ({self.url})" if self.url else "")


class ComfyPage:
    """One browser tab on the ComfyUI server at base_url."""

    def __init__(self, page, base_url):
        self.page, self.base_url = page, base_url.rstrip("/")
        self.messages, self.blocked = [], []
        page.on("pageerror", lambda e: self.messages.append(Message("pageerror", f"{e.name}: {e.message}\n{e.stack}")))
        page.on("console", self._console)

    def _console(self, msg):
        if msg.type == "error":
            self.messages.append(Message("console.error", msg.text, (msg.location or {}).get("url", "")))

    def _route(self, route):
        if route.request.url.startswith(self.base_url + "/") or route.request.url == self.base_url:
            route.continue_()
        else:
            self.blocked.append(route.request.url)
            route.abort()

    # The page's errors.

    def is_app_error(self, m):
        if m.kind == "pageerror":
            return True
        if m.text.startswith("Failed to load resource"):
            if not m.url.startswith(self.base_url):
                return False  # a blocked request to the internet
            return not ("404" in m.text and FRESH_USER_404.search(m.url.split(self.base_url, 1)[1]))
        return not m.text.startswith(KNOWN_FRONTEND_ERRORS)

    def app_errors(self, since=0.0):
        return [m for m in self.messages if m.time >= since and self.is_app_error(m)]

    def assert_no_app_errors(self, since=0.0, what="the page"):
        errors = self.app_errors(since)
        if errors:
            raise BrowserError(f"{what}: {len(errors)} error(s) in the browser:\n" + "\n".join(map(repr, errors)))

    # The app.

    def open(self):
        self.page.context.route("**/*", self._route)
        self.page.goto(self.base_url + "/")
        self.page.wait_for_function(
            "() => window.app && window.app.graph && window.app.canvas && window.LiteGraph"
            " && Object.keys(window.LiteGraph.registered_node_types).length > 100",
            timeout=APP_TIMEOUT)
        # The sidebar is the last part to come up.
        self.page.get_by_role("button", name=re.compile(r"^Node Library")).wait_for(timeout=APP_TIMEOUT)
        self.page.wait_for_timeout(500)
        self.close_warnings()
        return self

    @property
    def frontend_version(self):
        return self.page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__")

    def registered_types(self):
        """{node type: title} of what the frontend's LiteGraph has registered."""
        return self.page.evaluate(
            "() => Object.fromEntries(Object.entries(LiteGraph.registered_node_types).map(([k, v]) => [k, v.title ?? null]))")

    def warnings(self):
        """[{kind, text}] of the dialogs and overlays on the screen."""
        return self.page.evaluate(WARNINGS_JS)

    def close_warnings(self, rounds=4):
        """Closes dialogs and the error overlay (Escape, then their close or Dismiss buttons)."""
        for _ in range(rounds):
            if not self.warnings():
                return
            self.page.keyboard.press("Escape")
            self.page.wait_for_timeout(200)
            for selector in ("[data-testid=error-overlay] button:has-text('Dismiss')",
                             ".p-dialog .p-dialog-close-button", ".p-dialog button[aria-label=Close]",
                             ".p-toast-message .p-toast-close-button"):
                for button in self.page.locator(selector).all():
                    if button.is_visible():
                        button.click()
                        self.page.wait_for_timeout(200)
        left = self.warnings()
        if left:
            raise BrowserError(f"dialogs that do not close: {left}")

    def load_workflow(self, path):
        """Opens a workflow file as a user does (Workflow > Open: the app's file input); returns
        the warnings it raised (read after the app settled), each {kind, text}."""
        self.close_warnings()
        self.page.set_input_files("#comfy-file-input", str(path))
        nodes = len(json.loads(Path(path).read_text())["nodes"])
        self.page.wait_for_function("(n) => app.graph._nodes.length === n", arg=nodes, timeout=30_000)
        self.page.wait_for_timeout(1500)  # the missing-node and missing-model checks run after the load
        return self.warnings()

    def missing_models(self):
        """[(folder, file name)] of the models that the UI, after a workflow's load, lists as
        missing with a Download button: 1.32.9's dialog ("folder / name", the button's title
        the download URL, which is returned as a third item), or the error overlay's list that
        1.45.21 opens in its right-hand panel (then closed again)."""
        overlay = self.page.locator("[data-testid=error-overlay]")
        if not (overlay.count() and overlay.first.is_visible()):
            return [tuple(row) for row in self.page.evaluate(MISSING_MODELS_DIALOG_JS)]
        overlay.get_by_text("Show missing models").click()
        group = self.page.locator("[data-testid=error-group-missing-model]")
        group.wait_for(state="visible", timeout=10_000)
        self.page.wait_for_timeout(300)
        listed = [tuple(row) for row in group.evaluate(MISSING_MODELS_PANEL_JS)]
        self.page.get_by_role("button", name="Toggle properties panel").click()
        group.wait_for(state="hidden", timeout=10_000)
        return listed

    def graph_nodes(self):
        """[{id, type, title, known, has_errors, box: [x, y, width, height] as drawn, title bar
        included, widgets: {name: value}}] of the graph on the canvas."""
        return self.page.evaluate("""() => app.graph._nodes.map(n => ({
            id: n.id, type: n.type, title: n.title, known: n.type in LiteGraph.registered_node_types,
            has_errors: !!n.has_errors, box: [...(n.boundingRect ?? n.getBounding())],
            widgets: Object.fromEntries((n.widgets || []).map(w => [w.name, w.value]))}))""")

    def clear_graph(self):
        self.page.evaluate("() => { app.graph.clear(); app.canvas.setDirty(true, true) }")

    def add_node(self, node_type, pos, size=None):
        """Adds a node (as LiteGraph's createNode, which the search dialog also calls); returns its id."""
        return self.page.evaluate("""([type, pos, size]) => {
            const n = LiteGraph.createNode(type); n.pos = pos; if (size) n.size = size;
            app.graph.add(n); app.canvas.setDirty(true, true); return n.id }""", [node_type, pos, size])

    def reset_view(self, scale=1.0, offset=(0, 0)):
        self.page.evaluate("([s, o]) => { app.canvas.ds.scale = s; app.canvas.ds.offset = o; app.canvas.setDirty(true, true) }",
                           [scale, list(offset)])

    def graph_bounds(self, node_ids=None):
        """[x, y, width, height] in graph units of the nodes (with their titles) and groups, or of the nodes node_ids."""
        return self.page.evaluate("""(ids) => { let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
            const items = ids ? ids.map(id => app.graph.getNodeById(id)) : [...app.graph._nodes, ...(app.graph._groups || [])];
            for (const item of items) { const [x, y, w, h] = item.boundingRect;
                x0 = Math.min(x0, x); y0 = Math.min(y0, y); x1 = Math.max(x1, x + w); y1 = Math.max(y1, y + h) }
            return [x0, y0, x1 - x0, y1 - y0] }""", node_ids)

    def fit_view(self):
        """Zooms the canvas to show the whole graph, as the UI's "fit view" does (without its animation)."""
        self.page.evaluate("(b) => { app.canvas.ds.fitToBounds(b); app.canvas.setDirty(true, true) }", self.graph_bounds())

    def fit_to(self, region, bounds=None, fill=0.92, max_scale=1.0):
        """Zooms and pans so that bounds (default: the whole graph) fill `fill` of region
        {x, y, width, height} of the page, centred, at most at max_scale; returns bounds' box on the page."""
        x, y, w, h = bounds or self.graph_bounds()
        scale = min(fill * region["width"] / w, fill * region["height"] / h, max_scale)
        self.page.evaluate("""([s, cx, cy]) => { const c = app.canvas, r = c.canvas.getBoundingClientRect();
            c.ds.scale = s; c.ds.offset = [(cx - r.left) / s, (cy - r.top) / s]; c.setDirty(true, true) }""",
                           [scale, region["x"] + region["width"] / 2 - (x + w / 2) * scale,
                            region["y"] + region["height"] / 2 - (y + h / 2) * scale])
        x0, y0 = self.to_screen(x, y)
        return {"x": x0, "y": y0, "width": w * scale, "height": h * scale}

    def to_screen(self, x, y):
        """Page coordinates (CSS px) of a point of the graph."""
        return self.page.evaluate("""([x, y]) => { const c = app.canvas, r = c.canvas.getBoundingClientRect();
            return [r.left + (x + c.ds.offset[0]) * c.ds.scale, r.top + (y + c.ds.offset[1]) * c.ds.scale] }""", [x, y])

    def node_geometry(self, node_id):
        """The node's pos, size, title height, widgets' [name, y, height] and inputs' [name, slot pos]."""
        return self.page.evaluate("""(id) => { const n = app.graph.getNodeById(id);
            return {pos: [...n.pos], size: [...n.size], title: LiteGraph.NODE_TITLE_HEIGHT,
                    widgets: (n.widgets || []).map(w => [w.name, w.y, w.computedHeight || LiteGraph.NODE_WIDGET_HEIGHT]),
                    inputs: n.inputs.map((inp, i) => [inp.name, [...n.getConnectionPos(true, i)], inp.widget ? true : false])} }""",
                                  node_id)

    def node_box(self, node_id, margin=10):
        """{x, y, width, height} on the page of a node with its title, for a clipped screenshot."""
        g = self.node_geometry(node_id)
        x0, y0 = self.to_screen(g["pos"][0] - margin, g["pos"][1] - g["title"] - margin)
        x1, y1 = self.to_screen(g["pos"][0] + g["size"][0] + margin, g["pos"][1] + g["size"][1] + margin)
        return {"x": x0, "y": y0, "width": x1 - x0, "height": y1 - y0}

    @property
    def client_id(self):
        """The tab's client id: a prompt queued with it shows its outputs on this tab's canvas."""
        return self.page.evaluate("() => window.app.api.clientId || sessionStorage.getItem('clientId')")

    def screenshot(self, path, box=None, margin=0):
        """A PNG of the page, or of box {x, y, width, height} grown by margin (kept on the page): its bytes, also written to path unless None."""
        self.page.evaluate("() => app.canvas.setDirty(true, true)")
        self.page.wait_for_timeout(300)  # a frame or two for the canvas
        clip = None
        if box is not None:
            size = self.page.viewport_size
            x0, y0 = max(0, box["x"] - margin), max(0, box["y"] - margin)
            x1 = min(size["width"], box["x"] + box["width"] + margin)
            y1 = min(size["height"], box["y"] + box["height"] + margin)
            clip = {"x": round(x0), "y": round(y0), "width": round(x1 - x0), "height": round(y1 - y0)}
        return self.page.screenshot(path=None if path is None else str(path), clip=clip)

    def tooltip_at(self, x, y, timeout=5_000):
        """Hovers a page point and returns the text of the canvas tooltip that appears (None if none)."""
        self.page.mouse.move(5, 5)  # leave whatever was hovered, so that the tooltip starts anew
        self.page.wait_for_timeout(100)
        self.page.mouse.move(x - 3, y - 3)
        self.page.mouse.move(x, y)
        try:
            self.page.locator(".node-tooltip").first.wait_for(state="visible", timeout=timeout)
        except Exception:
            return None
        self.page.wait_for_timeout(100)
        return self.page.locator(".node-tooltip").first.inner_text()

    def sidebar_button(self, name):
        """A sidebar tab's button: aria-label "Node Library (n)" and "Templates" on both frontends."""
        return self.page.get_by_role("button", name=re.compile(rf"^{re.escape(name)}( \(|$)"))


class Browser:
    """Chromium with a fresh profile; new_page() gives a ComfyPage."""

    def __init__(self, viewport=(1600, 1000)):
        self.viewport = viewport
        self._pw = self._context = None
        self._profile = tempfile.TemporaryDirectory(prefix="pladis-chromium-")

    def __enter__(self):
        if not Path(CHROMIUM).is_file():
            raise BrowserError(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set CHROMIUM)")
        self._pw = sync_playwright().start()
        try:
            self._context = self._pw.chromium.launch_persistent_context(
                self._profile.name, executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True,
                viewport={"width": self.viewport[0], "height": self.viewport[1]}, device_scale_factor=1,
            )
        except Exception:
            self._pw.stop()
            raise
        return self

    def new_page(self, base_url):
        page = self._context.pages[0] if self._context.pages else self._context.new_page()
        return ComfyPage(page, base_url)

    def __exit__(self, *exc):
        try:
            self._context.close()
        finally:
            self._pw.stop()
            self._profile.cleanup()


def seed_settings(server, settings=SETTINGS):
    """Writes the user's settings file (the default user's comfy.settings.json) before the page opens."""
    folder = Path(server.base) / "user" / "default"
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / "comfy.settings.json"
    old = json.loads(file.read_text()) if file.is_file() else {}
    file.write_text(json.dumps({**old, **settings}, indent=4))
