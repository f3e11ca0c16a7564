"""The "Apply PLADIS" node: PLADIS on the cross-attention of UNet models."""
import logging

from comfy.ldm.modules.attention import optimized_attention
from comfy_api.latest import io

from ..pladis_core.selection import parse_stage_blocks
from ..pladis_core.unet import UNET_STAGES, PladisSettings, cross_attention_blocks, is_unet, register_attn2_patches
from .common import check_range, describe_blocks, model_type_name, percent_range_to_sigmas, unsupported_model_error

RANGES = {"scale": (-5.0, 10.0), "alpha": (1.0, 2.0), "start_percent": (0.0, 1.0), "end_percent": (0.0, 1.0)}


class ApplyPLADIS(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ApplyPLADIS",
            display_name="Apply PLADIS",
            category="model_patches/unet",
            description="PLADIS (arXiv 2503.07677): extrapolates cross-attention from softmax towards "
            "sparse alpha-entmax for better prompt following, at no extra model evaluations.",
            inputs=[
                io.Model.Input("model", tooltip="A UNet model: SD1.x, SD2.x or SDXL family (Turbo, Lightning, DMD2, Hyper, Pony, Illustrious)."),
                io.Float.Input(
                    "scale", default=2.0, min=RANGES["scale"][0], max=RANGES["scale"][1], step=0.05,
                    tooltip="lambda: 0 is plain attention, 1 is pure entmax, 2 is the paper's setting. "
                    "Lower it (1.0-1.5) if tag-based models grow extra objects; higher over-smooths like high CFG.",
                ),
                io.Float.Input(
                    "alpha", default=1.5, min=RANGES["alpha"][0], max=RANGES["alpha"][1], step=0.05,
                    tooltip="Sparsity of the entmax map: 1.5 (default) and 2.0 (sparsemax) are the paper's choices; "
                    "1.0 is softmax, which changes nothing.",
                ),
                io.Float.Input(
                    "start_percent", default=0.0, min=RANGES["start_percent"][0], max=RANGES["start_percent"][1], step=0.01,
                    tooltip="Part of the schedule where PLADIS starts (0 = first step); before it attention is plain.",
                ),
                io.Float.Input(
                    "end_percent", default=1.0, min=RANGES["end_percent"][0], max=RANGES["end_percent"][1], step=0.01,
                    tooltip="Part of the schedule where PLADIS stops (1 = last step); after it attention is plain.",
                ),
                io.Boolean.Input(
                    "include_middle", default=False,
                    tooltip="Also patch the middle block. The official code leaves it dense; patching it can make images messy.",
                ),
                io.String.Input(
                    "blocks", default="", optional=True,
                    tooltip="Optional explicit block list that replaces the default set (and include_middle), "
                    "e.g. 'input:4,5 output:3-5' or 'middle:0'. Empty: all input and output blocks.",
                ),
            ],
            outputs=[io.Model.Output(display_name="MODEL")],
        )

    @classmethod
    def execute(cls, model, scale=2.0, alpha=1.5, start_percent=0.0, end_percent=1.0, include_middle=False, blocks="") -> io.NodeOutput:
        for name, value in (("scale", scale), ("alpha", alpha), ("start_percent", start_percent), ("end_percent", end_percent)):
            check_range(name, value, *RANGES[name])
        if start_percent > end_percent:
            raise ValueError(f"Apply PLADIS: start_percent ({start_percent}) is after end_percent ({end_percent}); make start_percent <= end_percent.")
        diffusion_model = model.get_model_object("diffusion_model")
        if not is_unet(diffusion_model):
            raise unsupported_model_error("Apply PLADIS", model)
        available = cross_attention_blocks(diffusion_model)
        chosen = select_blocks(available, blocks or "", include_middle)
        sigma_start, sigma_end = percent_range_to_sigmas(model, start_percent, end_percent)
        settings = PladisSettings(float(scale), float(alpha), sigma_start, sigma_end)

        m = model.clone()
        count, reverted = register_attn2_patches(m, chosen, settings, optimized_attention)
        effect = "no change (scale 0 or alpha 1 is plain attention)" if settings.is_identity else f"scale {scale}, alpha {alpha}"
        earlier = f"; {reverted} layers an earlier Apply PLADIS patched are plain again" if reverted else ""
        logging.info(
            f"Apply PLADIS: patched {count} cross-attention layers in {describe_blocks(chosen)} of {model_type_name(model)}: "
            f"{effect}, steps {start_percent:.0%}-{end_percent:.0%}{earlier}"
        )
        return io.NodeOutput(m)


def select_blocks(available, text, include_middle):
    """The blocks to patch: the user's list, else every input and output block (and middle if asked)."""
    if not text.strip():
        stages = ("input", "output", "middle") if include_middle else ("input", "output")
        return {key: depth for key, depth in available.items() if key[0] in stages}
    try:
        wanted = parse_stage_blocks(text, UNET_STAGES)
    except ValueError as e:
        raise ValueError(f"Apply PLADIS: blocks '{text}': {e}.") from None
    missing = sorted(wanted - available.keys(), key=lambda key: (UNET_STAGES.index(key[0]), key[1]))
    if missing:
        raise ValueError(
            f"Apply PLADIS: blocks names {describe_blocks(missing)}, which have no cross-attention in this model; "
            f"it has {describe_blocks(available)}."
        )
    return {key: available[key] for key in wanted}
