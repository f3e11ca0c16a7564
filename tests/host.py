"""The real ComfyUI, imported, with the pack loaded through its custom-node loader."""
import asyncio
import atexit
import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path

import torch

PACK = Path(__file__).resolve().parent.parent

_spec = importlib.util.spec_from_file_location("comfyui_host", PACK / "scripts" / "comfyui_host.py")
comfyui_host = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(comfyui_host)


class Host:
    """The imported ComfyUI and the pack as its custom-node loader loaded it."""

    def __init__(self, root, **options):
        """options: ComfyUI's command-line options to set (use_pytorch_cross_attention=True, ...)."""
        sys.path.insert(0, str(root))
        from comfy.cli_args import args

        if not torch.cuda.is_available():
            args.cpu = True
        for name, value in options.items():
            setattr(args, name, value)
        # Imported before nodes.py puts comfy/ first on sys.path, where comfy/utils.py would
        # hide this package from the extras that import it (as main.py imports it first).
        import utils.install_util  # noqa: F401
        import folder_paths
        import nodes

        # ComfyUI's own input, output, temp and user folders are in its tree, which may be
        # read-only (CI's second host): its nodes write there on import and use.
        self.scratch = Path(tempfile.mkdtemp(prefix="pladis-host-"))
        atexit.register(shutil.rmtree, self.scratch, True)
        for kind in ("input", "output", "temp", "user"):
            (self.scratch / kind).mkdir()
            getattr(folder_paths, f"set_{kind}_directory")(str(self.scratch / kind))

        link, _ = comfyui_host.link_pack()
        if not asyncio.run(nodes.load_custom_node(str(link))):
            raise RuntimeError(f"ComfyUI failed to load the pack from {link}; see the log above")
        self.root = root
        self.nodes = nodes
        # The loader names the package after its path; find it through one of our nodes.
        self.package = nodes.NODE_CLASS_MAPPINGS["ApplyPLADIS"].__module__.rsplit(".nodes.", 1)[0]

    def all_nodes(self):
        """Every node the host registers, its built-in extras (comfy_extras) included, loaded once."""
        if not getattr(self, "_extras_loaded", False):
            asyncio.run(self.nodes.init_builtin_extra_nodes())
            self._extras_loaded = True
        return self.nodes.NODE_CLASS_MAPPINGS

    def node(self, node_id):
        return self.nodes.NODE_CLASS_MAPPINGS[node_id]

    def pack_module(self, name):
        """A module of the pack as ComfyUI imported it, e.g. 'pladis_comfy.unet'."""
        return sys.modules[f"{self.package}.{name}"]


_loaded = None


def loaded():
    """The Host of the ComfyUI that scripts/comfyui_host.py finds, made once per process.
    Modules of the pack's glue import only inside it: pack_module gives them."""
    global _loaded
    if _loaded is None:
        root = comfyui_host.find_comfyui()
        if root is None:
            raise RuntimeError("No ComfyUI found: set COMFYUI_PATH, or run scripts/setup.sh to lay down the pinned one.")
        _loaded = Host(root)
    return _loaded


def host_patch_category():
    """The category of the running host's own model patch nodes (one of them: EpsilonScaling)."""
    from comfy_extras.nodes_eps import EpsilonScaling

    return EpsilonScaling.define_schema().category
