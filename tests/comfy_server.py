"""The real ComfyUI server in a temporary base directory: for the web UI test and scripts/screenshots.py.

The same set-up as tests/test_server.py: ComfyUI's own main.py on the CPU on a free local port,
--base-directory a temporary folder whose custom_nodes/ holds the pack (a symlink under its
package name) and whose user/ holds the database (--database-url: ComfyUI's default is a file
in its own tree, which may be read-only). With checkpoint=True the folder also gets the random
SD1.5 checkpoint of tests/random_checkpoint.py (2 GB, written beside the start-up).

    with comfyui_server(checkpoint=False) as srv:
        srv.get("/object_info")

Failures raise ServerError with the end of the server's log; the server is stopped and the
folder removed whatever happens. Standard library only (the scripts use it outside pytest).
"""
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
from contextlib import contextmanager
from pathlib import Path

from host import comfyui_host

PACK = Path(__file__).resolve().parent.parent
CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
START_TIMEOUT = 180  # seconds for the server to answer, and for the checkpoint to be written
RUN_TIMEOUT = 300  # seconds for one prompt


class ServerError(RuntimeError):
    pass


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


class ComfyServer:
    def __init__(self, root, url, base, log):
        self.root, self.url, self.base, self.log = root, url, base, log
        self.version = comfyui_host.version(root)
        self.proc = None

    def error(self, message):
        return ServerError(f"{message}\n--- end of the server log ({self.log}) ---\n{log_tail(self.log)}")

    def request(self, path, payload=None, timeout=30):
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            raise self.error(f"{'POST' if data else 'GET'} {path}: HTTP {e.code}: {e.read().decode(errors='replace')}") from None

    get = request

    def answers(self):
        try:
            with urllib.request.urlopen(self.url + "/system_stats", timeout=5) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait(self, prompt_id, timeout=RUN_TIMEOUT):
        """Waits for a queued prompt; returns its history entry, or raises if it failed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.request(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status.get("status_str") != "success":
                    raise self.error(f"the prompt failed: {json.dumps(status.get('messages'), indent=1)[-4000:]}")
                return entry
            if self.proc.poll() is not None:
                raise self.error(f"the server exited with code {self.proc.returncode} while running the prompt")
            time.sleep(0.25)
        raise self.error(f"the prompt did not finish in {timeout} s")

    def run(self, prompt, client_id=None):
        """Queues an API prompt (for client_id: a browser tab's id shows the outputs there) and waits for it."""
        queued = self.request("/prompt", {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex})
        if queued.get("node_errors"):
            raise self.error(f"the server refused the prompt: {queued['node_errors']}")
        return self.wait(queued["prompt_id"])


@contextmanager
def comfyui_server(root=None, checkpoint=False):
    """Starts ComfyUI (root: default as scripts/comfyui_host.py finds it) and yields a ComfyServer."""
    root = Path(root) if root else comfyui_host.find_comfyui()
    if root is None:
        raise ServerError("No ComfyUI found: set COMFYUI_PATH, or run scripts/setup.sh to lay down the pinned one.")
    base = Path(tempfile.mkdtemp(prefix="pladis-ui-"))
    procs = []
    try:
        (base / "models" / "checkpoints").mkdir(parents=True)
        (base / "custom_nodes").mkdir()
        (base / "user").mkdir()
        (base / "custom_nodes" / comfyui_host.PACK_NAME).symlink_to(PACK, target_is_directory=True)
        writer = None
        if checkpoint:
            checkpoint_log = base / "checkpoint.log"
            with open(checkpoint_log, "wb") as out:
                writer = subprocess.Popen(
                    [sys.executable, str(PACK / "tests" / "random_checkpoint.py"), str(root),
                     str(base / "models" / "checkpoints" / CHECKPOINT)],
                    stdout=out, stderr=subprocess.STDOUT, cwd=PACK / "tests",
                )
            procs.append(writer)
        port = free_port()
        srv = ComfyServer(root, f"http://127.0.0.1:{port}", base, base / "server.log")
        with open(srv.log, "wb") as out:
            srv.proc = subprocess.Popen(
                [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                 "--base-directory", str(base),
                 "--database-url", f"sqlite:///{base / 'user' / 'comfyui.db'}"],
                cwd=root, stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        procs.append(srv.proc)
        started = time.monotonic()
        while not srv.answers():
            if srv.proc.poll() is not None:
                raise srv.error(f"the server exited with code {srv.proc.returncode} before answering")
            if time.monotonic() - started > START_TIMEOUT:
                raise srv.error(f"the server did not answer within {START_TIMEOUT} s")
            time.sleep(0.25)
        if writer is not None:
            try:
                code = writer.wait(timeout=max(1, START_TIMEOUT - (time.monotonic() - started)))
            except subprocess.TimeoutExpired:
                code = "none (timed out)"
            if code != 0:
                raise ServerError(f"writing the random checkpoint failed, exit code {code}:\n{log_tail(checkpoint_log)}")
        yield srv
    finally:
        for proc in reversed(procs):
            stop(proc)
        shutil.rmtree(base, ignore_errors=True)
