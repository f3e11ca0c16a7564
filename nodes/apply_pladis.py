"""The "Apply PLADIS" node: PLADIS on cross-attention (UNets and cross-attention transformers)."""
import logging

from comfy_api.latest import io

from ..pladis_comfy.architectures import APPLY_PLADIS, UNET, attention_blocks, find_architecture, supported
from ..pladis_comfy.register import patch_dit, patch_unet
from ..pladis_comfy.unet import UNET_STAGES, cross_attention_blocks
from ..pladis_core.settings import PladisSettings
from .common import (
    check_pladis_inputs, describe_blocks, model_type_name, patch_category, percent_range_to_sigmas, pladis_inputs, schema_extras,
    select_indexes, unsupported_model_error,
)
from .selection import describe_range, parse_stage_blocks

NODE = APPLY_PLADIS


class ApplyPLADIS(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ApplyPLADIS",
            display_name=NODE,
            category=patch_category(),
            description="PLADIS (arXiv 2503.07677): extrapolates cross-attention from softmax towards "
            "sparse alpha-entmax for better prompt following, at no extra model evaluations.",
            inputs=[
                io.Model.Input("model", tooltip=f"A model with text cross-attention: {supported(NODE)}. For joint-attention models use 'PLADIS Flux Patch'."),
                *pladis_inputs(),
                io.Boolean.Input(
                    "include_middle", default=False,
                    tooltip="UNets: also patch the middle block. The official code leaves it dense; patching it can make images messy. "
                    "Transformers have no middle block.",
                ),
                io.String.Input(
                    "blocks", default="", optional=True,
                    tooltip="Optional explicit block list that replaces the default set (and include_middle), "
                    "e.g. 'input:4,5 output:3-5' or 'middle:0'. Empty: all input and output blocks. "
                    "On transformers: block indexes such as 0-9,12 (empty: all, and Wan VACE's control blocks too).",
                ),
            ],
            outputs=[io.Model.Output(display_name="MODEL")],
            **schema_extras(["pladis", "entmax", "sparse attention", "prompt following", "attention sharpening", "cross attention"]),
        )

    @classmethod
    def execute(cls, model, scale=2.0, alpha=1.5, start_percent=0.0, end_percent=1.0, include_middle=False, blocks="") -> io.NodeOutput:
        check_pladis_inputs(NODE, scale, alpha, start_percent, end_percent)
        diffusion_model = model.get_model_object("diffusion_model")
        architecture = find_architecture(diffusion_model)
        if architecture is None or architecture.node != NODE:
            raise unsupported_model_error(NODE, model)
        if architecture.layout == UNET:
            chosen = select_blocks(cross_attention_blocks(diffusion_model), blocks or "", include_middle)
        else:  # a transformer: blocks are indexes of its main blocks, include_middle means nothing
            counts = attention_blocks(diffusion_model, architecture)
            chosen = {("block", i) for i in select_indexes(NODE, "blocks", blocks or "all", counts["block"])}
            if (blocks or "all").strip().lower() == "all":
                chosen |= {(kind, i) for kind, n in counts.items() if kind != "block" for i in range(n)}
        sigma_start, sigma_end = percent_range_to_sigmas(model, start_percent, end_percent)
        settings = PladisSettings(float(scale), float(alpha), sigma_start, sigma_end)
        effect = "no change (scale 0 or alpha 1 is plain attention)" if settings.is_identity else f"scale {scale}, alpha {alpha}"
        steps = f"steps {start_percent:.0%}-{end_percent:.0%}"

        m = model.clone()
        if architecture.layout == UNET:
            layers = sum(chosen.values())
            what = f"{NODE} ({effect}, {steps}) on {layers} cross-attention layers of {model_type_name(model)}"
            count, reverted = patch_unet(m, chosen, settings, what)
            earlier = f"; {reverted} layers an earlier Apply PLADIS patched are plain again" if reverted else ""
            logging.info(
                f"{NODE}: patched {count} cross-attention layers in {describe_blocks(chosen)} of {model_type_name(model)}: "
                f"{effect}, {steps}{earlier}"
            )
            return io.NodeOutput(m)
        patch_dit(m, architecture, chosen, settings, f"{NODE} ({effect}, {steps}) on {len(chosen)} blocks of {model_type_name(model)}")
        patched = ", ".join(f"{sum(k == kind for k, _ in chosen)} of {n} {kind}" for kind, n in counts.items() if n)
        ignored = "; include_middle means nothing on a transformer and was ignored" if include_middle else ""
        logging.info(f"{NODE}: patched the text cross-attention of {patched} blocks of {model_type_name(model)}: {effect}, {steps}{ignored}")
        return io.NodeOutput(m)


def select_blocks(available, text, include_middle):
    """The blocks to patch: the user's list, else every input and output block (and middle if asked)."""
    if not text.strip():
        stages = ("input", "output", "middle") if include_middle else ("input", "output")
        return {key: depth for key, depth in available.items() if key[0] in stages}
    try:
        ranges = parse_stage_blocks(text, UNET_STAGES)
    except ValueError as e:
        raise ValueError(f"{NODE}: blocks '{text}': {e}.") from None
    has = f"it has {describe_blocks(available)}"
    # Every range is bounded by the model before it is expanded.
    top = {stage: max((n for s, n in available if s == stage), default=-1) for stage in UNET_STAGES}
    beyond = [f"{stage} {describe_range(max(first, top[stage] + 1), last)}" for stage, first, last in ranges if last > top[stage]]
    if beyond:
        raise ValueError(f"{NODE}: blocks names {'; '.join(beyond)}, which this model lacks; {has}.")
    wanted = {(stage, number) for stage, first, last in ranges for number in range(first, last + 1)}
    missing = sorted(wanted - available.keys(), key=lambda key: (UNET_STAGES.index(key[0]), key[1]))
    if missing:
        raise ValueError(f"{NODE}: blocks names {describe_blocks(missing)}, which have no cross-attention in this model; {has}.")
    return {key: available[key] for key in wanted}
