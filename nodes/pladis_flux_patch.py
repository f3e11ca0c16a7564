"""The "PLADIS Flux Patch" node: PLADIS on the joint attention of Flux-like models."""
import logging

from comfy_api.latest import io

from ..pladis_comfy.architectures import FLUX_PATCH, attention_blocks, find_architecture, supported, with_blocks
from ..pladis_comfy.register import patch_dit
from ..pladis_core.settings import PladisSettings
from .common import (
    check_pladis_inputs, model_type_name, patch_category, percent_range_to_sigmas, pladis_inputs, schema_extras, select_indexes,
    unsupported_model_error,
)

NODE = FLUX_PATCH


class PladisFluxPatch(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        block_list = "'all', 'none', or indexes such as 0-9,12."
        return io.Schema(
            node_id="PladisFluxPatch",
            display_name=NODE,
            category=patch_category(),
            description="PLADIS (arXiv 2503.07677) for joint attention: in every image token's attention, the text keys "
            "are sharpened from softmax towards alpha-entmax, keeping their share of the attention; no extra model evaluations.",
            inputs=[
                io.Model.Input("model", tooltip=f"A joint-attention model: {supported(NODE)}."),
                *pladis_inputs(),
                io.String.Input(
                    "double_blocks", default="all",
                    tooltip=f"Two-stream blocks to patch ({with_blocks('double')}): " + block_list,
                ),
                io.String.Input(
                    "single_blocks", default="all",
                    tooltip=f"Single-stream blocks to patch ({with_blocks('single')}): " + block_list,
                ),
            ],
            outputs=[io.Model.Output(display_name="MODEL")],
            **schema_extras(["pladis", "flux", "joint attention", "entmax", "prompt following", "mmdit"]),
        )

    @classmethod
    def execute(cls, model, scale=2.0, alpha=1.5, start_percent=0.0, end_percent=1.0, double_blocks="all", single_blocks="all") -> io.NodeOutput:
        check_pladis_inputs(NODE, scale, alpha, start_percent, end_percent)
        diffusion_model = model.get_model_object("diffusion_model")
        architecture = find_architecture(diffusion_model)
        if architecture is None or architecture.node != NODE:
            raise unsupported_model_error(NODE, model)
        counts = attention_blocks(diffusion_model, architecture)
        chosen = {
            (kind, index)
            for kind, text in (("double", double_blocks), ("single", single_blocks))
            for index in select_indexes(NODE, f"{kind}_blocks", text, counts.get(kind, 0))
        }
        sigma_start, sigma_end = percent_range_to_sigmas(model, start_percent, end_percent)
        settings = PladisSettings(float(scale), float(alpha), sigma_start, sigma_end)

        effect = "no change (scale 0 or alpha 1 is plain attention)" if settings.is_identity else f"scale {scale}, alpha {alpha}"
        steps = f"steps {start_percent:.0%}-{end_percent:.0%}"
        m = model.clone()
        patch_dit(m, architecture, chosen, settings, f"{NODE} ({effect}, {steps}) on {len(chosen)} blocks of {model_type_name(model)}")
        patched = ", ".join(f"{sum(k == kind for k, _ in chosen)} of {n} {kind}" for kind, n in counts.items())
        logging.info(f"{NODE}: {model_type_name(model)}, joint attention patched in {patched} blocks: {effect}, {steps}")
        return io.NodeOutput(m)
