"""End to end through the real ComfyUI server, as a user runs it.

A temporary base directory holds the pack (a symlink in custom_nodes/) and a checkpoint with
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
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from host import comfyui_host

PACK = Path(__file__).resolve().parent.parent
WORKFLOW = PACK / "example_workflows" / "pladis_sd15.json"
CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
START_TIMEOUT = 180  # seconds for the server to answer, and for the checkpoint to be written
RUN_TIMEOUT = 300  # seconds for one prompt
# Node types that only the frontend knows: they never reach the server.
FRONTEND_ONLY = {"Note", "MarkdownNote"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
BYPASS, NEVER = 4, 2  # LiteGraph node modes


def log_tail(path, lines=60):
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"(no log: {e})"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


class Server:
    def __init__(self, url, base, log):
        self.url, self.base, self.log = url, base, log
        self.proc = None

    def fail(self, message):
        pytest.fail(f"{message}\n--- end of the server log ({self.log}) ---\n{log_tail(self.log)}")

    def request(self, path, payload=None, timeout=30):
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            self.fail(f"{'POST' if data else 'GET'} {path}: HTTP {e.code}: {e.read().decode(errors='replace')}")

    def answers(self):
        try:
            with urllib.request.urlopen(self.url + "/system_stats", timeout=5) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def run(self, prompt):
        """Queues an API prompt and waits for it; returns its history entry."""
        queued = self.request("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})
        if queued.get("node_errors"):
            self.fail(f"the server refused the prompt: {queued['node_errors']}")
        prompt_id = queued["prompt_id"]
        deadline = time.monotonic() + RUN_TIMEOUT
        while time.monotonic() < deadline:
            entry = self.request(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status.get("status_str") != "success":
                    self.fail(f"the prompt failed: {json.dumps(status.get('messages'), indent=1)[-4000:]}")
                return entry
            if self.proc.poll() is not None:
                self.fail(f"the server exited with code {self.proc.returncode} while running the prompt")
            time.sleep(0.25)
        self.fail(f"the prompt did not finish in {RUN_TIMEOUT} s")


@pytest.fixture(scope="module")
def server():
    root = comfyui_host.find_comfyui()
    if root is None:
        pytest.fail("No ComfyUI found: set COMFYUI_PATH, or run scripts/setup.sh to lay down the pinned one.")
    base = Path(tempfile.mkdtemp(prefix="pladis-server-"))
    procs = []
    try:
        (base / "models" / "checkpoints").mkdir(parents=True)
        (base / "custom_nodes").mkdir()
        (base / "user").mkdir()
        (base / "custom_nodes" / comfyui_host.PACK_NAME).symlink_to(PACK, target_is_directory=True)
        # Written beside the server's start-up (both take seconds); renamed into place when complete.
        checkpoint_log = base / "checkpoint.log"
        with open(checkpoint_log, "wb") as out:
            writer = subprocess.Popen(
                [sys.executable, str(PACK / "tests" / "random_checkpoint.py"), str(root),
                 str(base / "models" / "checkpoints" / CHECKPOINT)],
                stdout=out, stderr=subprocess.STDOUT,
            )
        procs.append(writer)
        port = free_port()
        srv = Server(f"http://127.0.0.1:{port}", base, base / "server.log")
        with open(srv.log, "wb") as out:
            srv.proc = subprocess.Popen(
                [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                 "--base-directory", str(base),
                 # ComfyUI's database defaults to a file in its own tree, whatever the base directory.
                 "--database-url", f"sqlite:///{base / 'user' / 'comfyui.db'}"],
                cwd=root, stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        procs.append(srv.proc)
        started = time.monotonic()
        while not srv.answers():
            if srv.proc.poll() is not None:
                srv.fail(f"the server exited with code {srv.proc.returncode} before answering")
            if time.monotonic() - started > START_TIMEOUT:
                srv.fail(f"the server did not answer within {START_TIMEOUT} s")
            time.sleep(0.25)
        try:
            code = writer.wait(timeout=max(1, START_TIMEOUT - (time.monotonic() - started)))
        except subprocess.TimeoutExpired:
            code = "none (timed out)"
        if code != 0:
            pytest.fail(f"writing the random checkpoint failed, exit code {code}:\n{log_tail(checkpoint_log)}")
        yield srv
    finally:
        for proc in reversed(procs):
            stop(proc)
        shutil.rmtree(base, ignore_errors=True)


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
    info = server.request("/object_info")
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
        assert node["category"] == "model_patches/unet", node_id
    pladis = info["ApplyPLADIS"]["input"]
    defaults = {k: v[1].get("default") for k, v in pladis["required"].items() if k != "model"}
    assert defaults == {"scale": 2.0, "alpha": 1.5, "start_percent": 0.0, "end_percent": 1.0, "include_middle": False}
    assert info["ApplyTGATE"]["input"]["required"]["after_gate"][1]["options"] == ["uncond", "cond"]
    assert CHECKPOINT in info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]


def test_sd15_example_workflow_runs_and_pladis_changes_the_image(server):
    info = server.request("/object_info")
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
