"""ComfyUI entry point of the PLADIS node pack (PLADIS and TGATE)."""
from .nodes import comfy_entrypoint

__all__ = ["comfy_entrypoint"]
