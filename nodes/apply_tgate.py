"""The "Apply TGATE" node: cross-attention caching and CFG dropping after a gate step."""
import logging

from comfy_api.latest import io

from ..pladis_comfy.architectures import APPLY_TGATE, find_architecture, supported
from ..pladis_comfy.register import patch_tgate
from ..pladis_comfy.tgate import TgateSettings
from ..pladis_core.tgate import TgateSchedule
from .common import model_type_name, patch_category, schema_extras, unsupported_model_error

NODE = APPLY_TGATE
MINIMA = {"gate_step": 1, "sp_interval": 1, "fi_interval": 1, "warm_up": 0}
MAXIMUM = 10000


class ApplyTGATE(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ApplyTGATE",
            display_name=NODE,
            category=patch_category(),
            description="TGATE (arXiv 2404.02747): after gate_step, cross-attention is frozen to its cached output "
            "and CFG runs one branch only, for about 1.6x faster sampling.",
            inputs=[
                io.Model.Input("model", tooltip=f"A model with text cross-attention modules: {supported(NODE)}. Combine freely with Apply PLADIS."),
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
            **schema_extras(["tgate", "t-gate", "speed up", "faster sampling", "cross attention cache", "drop cfg"]),
        )

    @classmethod
    def execute(cls, model, gate_step=10, sp_interval=5, fi_interval=1, warm_up=2, after_gate="uncond") -> io.NodeOutput:
        values = {"gate_step": gate_step, "sp_interval": sp_interval, "fi_interval": fi_interval, "warm_up": warm_up}
        for name, value in values.items():
            if not (isinstance(value, int) and MINIMA[name] <= value <= MAXIMUM):
                raise ValueError(f"Apply TGATE: {name} must be a whole number from {MINIMA[name]} to {MAXIMUM}, got {value}.")
        if after_gate not in ("uncond", "cond"):
            raise ValueError(f"Apply TGATE: after_gate must be 'uncond' or 'cond', got {after_gate!r}.")
        architecture = find_architecture(model.get_model_object("diffusion_model"))
        if architecture is None or architecture.refused or isinstance(architecture.tgate, str):
            raise unsupported_model_error(NODE, model)

        m = model.clone()
        caching_self_attention = sp_interval > 1 or fi_interval > 1
        layers = patch_tgate(m, architecture, TgateSettings(TgateSchedule(**values), after_gate), caching_self_attention)
        logging.info(
            f"Apply TGATE: {layers} cross-attention layers of {model_type_name(model)} frozen after step {gate_step}, "
            f"then the {after_gate} branch alone; self-attention "
            + (f"cached (sp_interval {sp_interval}, fi_interval {fi_interval}, warm_up {warm_up})" if caching_self_attention else "always computed")
        )
        return io.NodeOutput(m)

