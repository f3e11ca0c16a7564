"""The "PLADIS Attention Preview" node: where one text token attends, dense, sparse and PLADIS."""
import comfy.sample
import comfy.samplers
import numpy as np
import torch
from comfy.ldm.modules.attention import optimized_attention
from comfy_api.latest import io
from PIL import Image, ImageDraw

from ..pladis_comfy.architectures import UNET, attention_blocks, find_architecture, token_grid
from ..pladis_comfy.preview import CaptureAttn2
from ..pladis_comfy.register import capture_dit, remove_unet_hooks
from ..pladis_comfy.unet import cross_attention_blocks
from ..pladis_core.preview import MapCollector
from .common import RANGES, check_pladis_inputs, patch_category, schema_extras, unsupported_model_error

NODE = "PLADIS Attention Preview"
LABEL_HEIGHT, GAP = 20, 4


class PladisAttentionPreview(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PladisAttentionPreview",
            display_name=NODE,
            category=patch_category(),
            description="Runs one model evaluation and shows where a text token attends over the image: "
            "the dense softmax map, the alpha-entmax map and the PLADIS map, averaged over heads and layers.",
            inputs=[
                io.Model.Input("model", tooltip="Any model that Apply PLADIS or PLADIS Flux Patch patches."),
                io.Conditioning.Input("positive", tooltip="The prompt whose token is shown."),
                io.Latent.Input("latent", tooltip="Sets the image size (an empty latent is fine)."),
                io.Int.Input(
                    "token_index", default=1, min=0, max=4096,
                    tooltip="Position of the token in the text encoder's sequence: with CLIP, 0 is the start token and 1 the first word.",
                ),
                io.Float.Input("step_percent", default=0.5, min=0.0, max=1.0, step=0.01, tooltip="Where in the schedule the model is evaluated."),
                io.Float.Input("scale", default=2.0, min=RANGES["scale"][0], max=RANGES["scale"][1], step=0.05, tooltip="lambda of the PLADIS map."),
                io.Float.Input("alpha", default=1.5, min=RANGES["alpha"][0], max=RANGES["alpha"][1], step=0.05, tooltip="alpha of the entmax map."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, tooltip="Noise of the evaluated latent."),
            ],
            outputs=[io.Image.Output(display_name="IMAGE")],
            **schema_extras(["pladis", "attention map", "token map", "entmax", "visualize attention"]),
        )

    @classmethod
    def execute(cls, model, positive, latent, token_index=1, step_percent=0.5, scale=2.0, alpha=1.5, seed=0) -> io.NodeOutput:
        check_pladis_inputs(NODE, scale, alpha, 0.0, 1.0)
        if not 0.0 <= step_percent <= 1.0:
            raise ValueError(f"{NODE}: step_percent must lie between 0.0 and 1.0, got {step_percent}.")
        tokens = positive[0][0].shape[1]
        if not 0 <= token_index < tokens:
            raise ValueError(f"{NODE}: token_index {token_index} is outside this prompt's {tokens} tokens (0-{tokens - 1}).")
        samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
        diffusion_model = model.get_model_object("diffusion_model")
        m = model.clone()
        architecture = find_architecture(diffusion_model)
        if architecture is None or architecture.node is None:
            raise unsupported_model_error(NODE, model)
        if architecture.layout == UNET:
            collector = MapCollector(token_index, scale, alpha)
            capture = CaptureAttn2(collector, optimized_attention)
            options = dict(m.model_options["transformer_options"])
            options["patches_replace"] = {**options.get("patches_replace", {}), "attn2": {}}  # PLADIS and others off
            m.model_options["transformer_options"] = options
            remove_unet_hooks(m)
            for (stage, number), depth in cross_attention_blocks(diffusion_model).items():
                for index in range(depth):
                    m.set_model_attn2_replace(capture, stage, number, index if depth > 1 else None)
        else:
            collector = MapCollector(token_index, scale, alpha, token_grid(diffusion_model, samples.shape, architecture))
            every = {(kind, i) for kind, n in attention_blocks(diffusion_model, architecture).items() for i in range(n)}
            capture_dit(m, architecture, collector, every)

        sampling = model.get_model_object("model_sampling")
        sigma = min(float(sampling.percent_to_sigma(step_percent)), float(sampling.sigma_max))
        sigmas = torch.tensor([max(sigma, float(sampling.sigma_min)), 0.0])
        noise = comfy.sample.prepare_noise(samples, seed)
        # One Euler step from that sigma: one evaluation, of the positive prompt only (cfg 1).
        comfy.sample.sample_custom(m, noise, 1.0, comfy.samplers.ksampler("euler"), sigmas, positive, positive, samples, disable_pbar=True, seed=seed)
        ratio = getattr(model.get_model_object("latent_format"), "spacial_downscale_ratio", 8)
        maps = collector.average((samples.shape[-2] * ratio, samples.shape[-1] * ratio))
        labels = ["dense (softmax)", f"entmax, alpha {alpha:g}", f"PLADIS, lambda {scale:g}"]
        return io.NodeOutput(render_grid(maps, labels))


def render_grid(maps, labels):
    """(1, height, width, 3) image: the maps side by side on one colour scale, each under its label."""
    top = float(maps.max()) or 1.0
    x = (maps / top).clamp(0, 1)
    heat = torch.stack([(3 * x).clamp(0, 1), (3 * x - 1).clamp(0, 1), (3 * x - 2).clamp(0, 1)], -1)  # black-red-yellow-white
    _, height, width = maps.shape
    canvas = Image.new("RGB", (3 * width + 2 * GAP, LABEL_HEIGHT + height), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (panel, label) in enumerate(zip(heat, labels)):
        left = i * (width + GAP)
        canvas.paste(Image.fromarray((panel.numpy() * 255).astype(np.uint8)), (left, LABEL_HEIGHT))
        draw.text((left + 4, 4), label, fill="black")
    return torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0)[None]
