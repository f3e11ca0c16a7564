"""The pack's nodes, as one V3 extension."""
from comfy_api.latest import ComfyExtension, io

from .apply_pladis import ApplyPLADIS
from .apply_tgate import ApplyTGATE
from .attention_preview import PladisAttentionPreview
from .pladis_flux_patch import PladisFluxPatch


class PladisExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [ApplyPLADIS, PladisFluxPatch, ApplyTGATE, PladisAttentionPreview]


async def comfy_entrypoint() -> PladisExtension:
    return PladisExtension()
