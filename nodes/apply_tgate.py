"""The "Apply TGATE" node: cross-attention caching and CFG dropping after a gate step."""
import logging

import comfy.patcher_extension
from comfy_api.latest import io

from ..pladis_comfy import tgate
from .common import model_type_name, unsupported_model_error

WRAPPERS = {
    comfy.patcher_extension.WrappersMP.OUTER_SAMPLE: tgate.outer_sample_wrapper,
    comfy.patcher_extension.WrappersMP.CALC_COND_BATCH: tgate.calc_cond_batch_wrapper,
    comfy.patcher_extension.WrappersMP.APPLY_MODEL: tgate.apply_model_wrapper,
}
MINIMA = {"gate_step": 1, "sp_interval": 1, "fi_interval": 1, "warm_up": 0}
MAXIMUM = 10000


class ApplyTGATE(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ApplyTGATE",
            display_name="Apply TGATE",
            category="model_patches/unet",
            description="TGATE (arXiv 2404.02747): after gate_step, cross-attention is frozen to its cached output "
            "and CFG runs one branch only, for about 1.6x faster sampling.",
            inputs=[
                io.Model.Input("model", tooltip="SD1.x, SD2.x, SDXL family, PixArt or Wan; combine freely with Apply PLADIS."),
                io.Int.Input(
                    "gate_step", default=10, min=MINIMA["gate_step"], max=MAXIMUM,
                    tooltip="Sampler steps after which cross-attention is frozen and CFG dropped (10 of 25 in the paper). "
                    "For 4-step distilled models try 1-2. At or beyond the step count nothing is frozen.",
                ),
                io.Int.Input(
                    "sp_interval", default=5, min=MINIMA["sp_interval"], max=MAXIMUM,
                    tooltip="Before the gate, self-attention is recomputed every sp_interval steps and reused in between. "
                    "1 computes it every step (TGATE v1, cross-attention caching only).",
                ),
                io.Int.Input(
                    "fi_interval", default=1, min=MINIMA["fi_interval"], max=MAXIMUM,
                    tooltip="After the gate, self-attention is recomputed every fi_interval steps and reused in between.",
                ),
                io.Int.Input(
                    "warm_up", default=2, min=MINIMA["warm_up"], max=MAXIMUM,
                    tooltip="Steps at the start whose self-attention is always computed (0 for LCM-style models).",
                ),
                io.Combo.Input(
                    "after_gate", options=["uncond", "cond"], default="uncond",
                    tooltip="The CFG branch that runs alone after the gate: 'uncond' as in the official pipelines, or 'cond'.",
                ),
            ],
            outputs=[io.Model.Output(display_name="MODEL")],
        )

    @classmethod
    def execute(cls, model, gate_step=10, sp_interval=5, fi_interval=1, warm_up=2, after_gate="uncond") -> io.NodeOutput:
        values = {"gate_step": gate_step, "sp_interval": sp_interval, "fi_interval": fi_interval, "warm_up": warm_up}
        for name, value in values.items():
            if not (isinstance(value, int) and MINIMA[name] <= value <= MAXIMUM):
                raise ValueError(f"Apply TGATE: {name} must be a whole number from {MINIMA[name]} to {MAXIMUM}, got {value}.")
        if after_gate not in ("uncond", "cond"):
            raise ValueError(f"Apply TGATE: after_gate must be 'uncond' or 'cond', got {after_gate!r}.")
        modules = tgate.attention_modules(model.get_model_object("diffusion_model"))
        supported = "models with cross-attention modules (SD1.x, SD2.x, SDXL, PixArt, Wan)"
        if not modules:
            raise unsupported_model_error("Apply TGATE", model, supported)
        if model_type_name(model).startswith("HunyuanDiT"):  # its attention modules return tuples, not outputs
            raise ValueError(f"Apply TGATE works on {supported}; this model is {model_type_name(model)}, which it does not cache yet.")

        m = model.clone()
        schedule = tgate.TgateSchedule(**values)
        m.model_options["transformer_options"][tgate.SETTINGS_KEY] = tgate.TgateSettings(schedule, after_gate)
        for kind, wrapper in WRAPPERS.items():
            m.remove_wrappers_with_key(kind, tgate.SETTINGS_KEY)  # applied again: the later node wins
            m.add_wrapper_with_key(kind, tgate.SETTINGS_KEY, wrapper)
        _set_capture_patch(m)
        caching_self_attention = sp_interval > 1 or fi_interval > 1
        for path, module, kind in modules:
            if kind == "cross" or caching_self_attention:
                _patch_forward(m, path, module, kind)
        layers = sum(kind == "cross" for _, _, kind in modules)
        logging.info(
            f"Apply TGATE: {layers} cross-attention layers of {model_type_name(model)} frozen after step {gate_step}, "
            f"then the {after_gate} branch alone; self-attention "
            + (f"cached (sp_interval {sp_interval}, fi_interval {fi_interval}, warm_up {warm_up})" if caching_self_attention else "always computed")
        )
        return io.NodeOutput(m)


def _set_capture_patch(model):
    options = dict(model.model_options["transformer_options"])
    options["patches"] = dict(options.get("patches", {}))
    kept = [p for p in options["patches"].get("attn2_output_patch", []) if not isinstance(p, tgate.CrossAttentionCapture)]
    options["patches"]["attn2_output_patch"] = kept + [tgate.CrossAttentionCapture()]
    model.model_options["transformer_options"] = options


def _patch_forward(model, path, module, kind):
    target = f"diffusion_model.{path}.forward"
    previous = model.get_model_object(target)
    if isinstance(previous, tgate.CachedForward):  # applied again: wrap what it wrapped
        previous = previous.forward
    model.add_object_patch(target, tgate.CachedForward(previous, path, module, kind))
