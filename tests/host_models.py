"""Small models built from ComfyUI's own classes with random weights, and real sampling runs."""
import math

import torch

# The real architectures' block structure (which blocks hold how many transformers),
# at small widths so that sampling on a CPU takes seconds.
SMALL_UNETS = {
    "sd15": {
        "config": "SD15",
        "unet": {
            "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32,
            "use_spatial_transformer": True, "legacy": False, "adm_in_channels": None, "num_res_blocks": [2, 2, 2, 2],
            "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1,
            "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "channel_mult": [1, 2, 4, 4],
            "use_linear_in_transformer": False, "context_dim": 64, "num_heads": 8, "num_head_channels": -1,
            "use_temporal_attention": False, "use_temporal_resblock": False,
        },
        "context_dim": 64,
        "pooled_dim": None,
    },
    "sdxl": {
        "config": "SDXL",
        "unet": {
            "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32,
            "use_spatial_transformer": True, "legacy": False, "num_classes": "sequential", "adm_in_channels": 64 + 6 * 256,
            "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_middle": 10,
            "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "channel_mult": [1, 2, 4],
            "use_linear_in_transformer": True, "context_dim": 96, "num_head_channels": 16,
            "use_temporal_attention": False, "use_temporal_resblock": False,
        },
        "context_dim": 96,
        "pooled_dim": 64,
    },
}


# The widths that make the small UNets the real SD1.5 and SDXL (for benchmarks).
FULL_WIDTH = {
    "sd15": {"model_channels": 320, "context_dim": 768},
    "sdxl": {"model_channels": 320, "context_dim": 2048, "num_head_channels": 64, "adm_in_channels": 2816},
}
FULL_CONDITIONING = {"sd15": (768, None), "sdxl": (2048, 1280)}


def build_unet(kind, seed=0, full_width=False, device=None, dtype=torch.float32):
    """A ModelPatcher around a UNet of the given architecture, weights drawn from seed."""
    import comfy.model_patcher
    import comfy.supported_models

    spec = SMALL_UNETS[kind]
    unet = dict(spec["unet"], **(FULL_WIDTH[kind] if full_width else {}), dtype=dtype)
    model_config = getattr(comfy.supported_models, spec["config"])(unet)
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({})
    init_weights(model.diffusion_model, seed)
    model.eval()
    device = device or torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))


def init_weights(module, seed):
    """ComfyUI leaves weights uninitialised: draw them, scaled so activations keep unit size."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                fan_in = math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
            elif name.endswith("weight"):  # norms
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def conditioning(kind, seed, tokens=77, batch=1, full_width=False):
    """[[context, extras]] as ComfyUI's samplers take it."""
    spec = SMALL_UNETS[kind]
    context_dim, pooled_dim = FULL_CONDITIONING[kind] if full_width else (spec["context_dim"], spec["pooled_dim"])
    gen = torch.Generator().manual_seed(seed)
    context = torch.randn(batch, tokens, context_dim, generator=gen)
    extras = {}
    if pooled_dim:
        extras["pooled_output"] = torch.randn(batch, pooled_dim, generator=gen)
    return [[context, extras]]


def sample(model, kind="sd15", steps=3, cfg=5.0, sampler="euler", scheduler="normal", size=32, seed=0, batch=1, full_width=False,
           positive=None, negative=None, **kwargs):
    """The final latent of a real KSampler run (comfy.sample.sample) on fixed noise and prompts
    (positive / negative replace the default conditioning, seeds seed + 1 and seed + 2)."""
    import comfy.sample

    latent = torch.zeros(batch, 4, size // 8, size // 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    if positive is None:
        positive = conditioning(kind, seed + 1, batch=batch, full_width=full_width)
    if negative is None:
        negative = conditioning(kind, seed + 2, batch=batch, full_width=full_width)
    with torch.inference_mode():  # as ComfyUI runs its nodes
        return comfy.sample.sample(
            model, noise, steps, cfg, sampler, scheduler, positive, negative, latent, seed=seed, disable_pbar=True, **kwargs
        )
