"""The "PLADIS Flux Patch" node: PLADIS on the joint attention of Flux-like models."""
import logging

from comfy_api.latest import io

from ..pladis_core.settings import PladisSettings
from ..pladis_comfy.architectures import JOINT_ARCHITECTURES, attention_blocks, find_architecture, patch_dit
from .common import check_pladis_inputs, model_type_name, percent_range_to_sigmas, pladis_inputs, select_indexes, unsupported_model_error

NODE = "PLADIS Flux Patch"
MODELS = "Flux, Flux Kontext, Flux.2, Chroma, SD3/SD3.5, Qwen-Image, Lumina 2, Z-Image"


class PladisFluxPatch(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        block_list = "'all', 'none', or indexes such as 0-9,12."
        return io.Schema(
            node_id="PladisFluxPatch",
            display_name=NODE,
            category="model_patches/unet",
            description="PLADIS (arXiv 2503.07677) for joint attention: in every image token's attention, the text keys "
            "are sharpened from softmax towards alpha-entmax, keeping their share of the attention; no extra model evaluations.",
            inputs=[
                io.Model.Input("model", tooltip=f"A joint-attention model: {MODELS}."),
                *pladis_inputs(),
                io.String.Input(
                    "double_blocks", default="all",
                    tooltip="Two-stream blocks to patch (Flux/Chroma double blocks, SD3 joint blocks, Qwen-Image blocks): " + block_list,
                ),
                io.String.Input(
                    "single_blocks", default="all",
                    tooltip="Single-stream blocks to patch (Flux/Chroma single blocks, Lumina 2 / Z-Image layers): " + block_list,
                ),
            ],
            outputs=[io.Model.Output(display_name="MODEL")],
        )

    @classmethod
    def execute(cls, model, scale=2.0, alpha=1.5, start_percent=0.0, end_percent=1.0, double_blocks="all", single_blocks="all") -> io.NodeOutput:
        check_pladis_inputs(NODE, scale, alpha, start_percent, end_percent)
        diffusion_model = model.get_model_object("diffusion_model")
        architecture = find_architecture(diffusion_model, JOINT_ARCHITECTURES)
        if architecture is None:
            raise unsupported_model_error(NODE, model, f"joint-attention models ({MODELS})")
        counts = attention_blocks(diffusion_model, architecture)
        chosen = {
            (kind, index)
            for kind, text in (("double", double_blocks), ("single", single_blocks))
            for index in select_indexes(NODE, f"{kind}_blocks", text, counts.get(kind, 0))
        }
        sigma_start, sigma_end = percent_range_to_sigmas(model, start_percent, end_percent)
        settings = PladisSettings(float(scale), float(alpha), sigma_start, sigma_end)

        m = model.clone()
        patch_dit(m, architecture, chosen, settings)
        effect = "no change (scale 0 or alpha 1 is plain attention)" if settings.is_identity else f"scale {scale}, alpha {alpha}"
        patched = ", ".join(f"{sum(k == kind for k, _ in chosen)} of {n} {kind}" for kind, n in counts.items())
        logging.info(f"{NODE}: {model_type_name(model)}, joint attention patched in {patched} blocks: {effect}, steps {start_percent:.0%}-{end_percent:.0%}")
        return io.NodeOutput(m)

