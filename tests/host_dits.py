"""Small transformer (DiT) models built from ComfyUI's own classes, sampled for real.

Like host_models.py: each entry of DITS keeps the real architecture's block structure
(which block types, which conditioning inputs, which positional scheme) at toy widths, so a
3-step KSampler run on a CPU takes well under a second. Weights are random (init_weights).

    model = build_dit("sd3")
    latent = sample_dit(model, "sd3", steps=3, cfg=4.0, seed=0)

Each entry says what it mirrors, its text token count ("text_tokens"; TEXT_TOKENS has them all),
the width of its text features ("context_dim") and whether ComfyUI 0.3.75 passes a text
attention mask from the conditioning to the model ("text_mask"; MASK_SUPPORT has them all).
"""
import importlib

import torch

from host_models import init_weights

DITS = {
    # Flux dev: double-stream blocks (text first) then single-stream blocks over [text, image],
    # guidance embedding, pooled CLIP vector; 1 + 1 blocks. A full (tokens x tokens) attention mask
    # and Kontext reference latents reach it through the conditioning (see dit_conditioning).
    "flux": {
        "config": "Flux", "text_tokens": 32, "context_dim": 32, "pooled_dim": 32, "latent": (16, None),
        "latent_size": 16, "text_mask": True,
        "unet": {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 32, "context_in_dim": 32,
                 "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 4, "depth": 1, "depth_single_blocks": 1,
                 "axes_dim": [4, 6, 6], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True},
    },
    # SD3 medium: MMDiT (joint blocks, the last one's text stream pre-only), CLIP-L/G + T5 context
    # of 77 + 77 tokens, a pooled CLIP vector as "y", learned 2D position table cropped to the image.
    # Hidden width is fixed by the class at 64 * depth, heads = depth.
    "sd3": {
        "config": "SD3", "text_tokens": 154, "context_dim": 32, "pooled_dim": 32, "latent": (16, None),
        "latent_size": 16, "text_mask": False,
        "unet": {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "input_size": None,
                 "adm_in_channels": 32, "pos_embed_scaling_factor": None, "pos_embed_max_size": 16, "num_patches": 256,
                 "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 32, "out_features": 128}},
                 "x_block_self_attn_layers": []},
    },
    # Chroma: Flux double + single stream blocks without per-block modulation; one "approximator"
    # MLP makes every block's modulation from timestep + guidance (guidance fixed at 0). T5 context,
    # no pooled vector. in_dim must stay 64 (16 timestep + 16 guidance + 32 index features).
    "chroma": {
        "config": "Chroma", "text_tokens": 32, "context_dim": 32, "pooled_dim": None, "latent": (16, None),
        "latent_size": 16, "text_mask": False,
        "unet": {"image_model": "chroma", "in_channels": 64, "out_channels": 64, "context_in_dim": 32, "hidden_size": 64,
                 "mlp_ratio": 2.0, "num_heads": 4, "depth": 1, "depth_single_blocks": 1, "axes_dim": [4, 6, 6],
                 "theta": 10000, "patch_size": 2, "qkv_bias": True, "in_dim": 64, "out_dim": 64, "hidden_dim": 64,
                 "n_layers": 2},
    },
    # Qwen-Image: MMDiT-style dual-stream blocks (joint attention over text + image), Qwen2.5-VL
    # hidden states as context, 3-axis RoPE, 5D Wan-2.1-format latent (one frame).
    "qwen_image": {
        "config": "QwenImage", "text_tokens": 24, "context_dim": 32, "pooled_dim": None, "latent": (16, 1),
        "latent_size": 16, "text_mask": False,
        "unet": {"image_model": "qwen_image", "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 2,
                 "attention_head_dim": 16, "num_attention_heads": 4, "joint_attention_dim": 32,
                 "axes_dims_rope": (4, 6, 6)},
    },
    # Lumina 2.0: NextDiT, Gemma-2 hidden states refined by context_refiner blocks, noise_refiner
    # blocks on the image, then joint self-attention layers over [text, image]; grouped-query
    # attention (n_kv_heads < n_heads). The text mask (padding) reaches the context refiner.
    "lumina2": {
        "config": "Lumina2", "text_tokens": 24, "context_dim": 32, "pooled_dim": None, "latent": (16, None),
        "latent_size": 16, "text_mask": True,
        "unet": {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 64, "cap_feat_dim": 32,
                 "n_layers": 2, "n_refiner_layers": 2, "n_heads": 4, "n_kv_heads": 2, "qk_norm": True,
                 "axes_dims": [4, 6, 6], "axes_lens": [300, 512, 512], "rope_theta": 10000.0,
                 "ffn_dim_multiplier": 4.0, "multiple_of": 16},
    },
    # Z-Image (Turbo): NextDiT with Z-Image modulation (256-wide time embedding; dim must be >= 256
    # for the class to be consistent), timesteps scaled by 1000, Qwen3 context, and learned pad
    # tokens that pad text and image sequences to a multiple of 32 (text_tokens is not a multiple on
    # purpose, so the padding runs).
    "z_image": {
        "config": "ZImage", "text_tokens": 24, "context_dim": 32, "pooled_dim": None, "latent": (16, None),
        "latent_size": 16, "text_mask": False,
        "unet": {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 256, "cap_feat_dim": 32,
                 "n_layers": 2, "n_refiner_layers": 2, "n_heads": 8, "n_kv_heads": 8, "qk_norm": True,
                 "axes_dims": [8, 12, 12], "axes_lens": [1536, 512, 512], "rope_theta": 256.0,
                 "ffn_dim_multiplier": 8.0 / 3.0, "multiple_of": 16, "z_image_modulation": True, "time_scale": 1000.0,
                 "pad_tokens_multiple": 32},
    },
    # Hunyuan-DiT v1.2: self-attention + cross-attention blocks with U-Net-like long skips (second
    # half), cross-attending to BERT (text_len tokens) and mT5 (text_len_t5 tokens, projected by
    # mlp_t5) concatenated; attention-pooled mT5 vector added to the timestep; v-prediction with
    # learned sigma. Both text masks are mandatory conditioning: masked tokens are replaced by
    # learned padding embeddings (no masking inside attention).
    "hunyuan_dit": {
        "config": "HunyuanDiT", "text_tokens": 16, "t5_tokens": 24, "context_dim": 32, "t5_dim": 32, "pooled_dim": None,
        "latent": (4, None), "latent_size": 16, "text_mask": True,
        "unet": {"image_model": "hydit", "input_size": 16, "patch_size": 2, "in_channels": 4, "hidden_size": 64,
                 "depth": 4, "num_heads": 4, "mlp_ratio": 4.0, "text_states_dim": 32, "text_states_dim_t5": 32,
                 "text_len": 16, "text_len_t5": 24, "qk_norm": True, "learn_sigma": True},
    },
    # PixArt Sigma: self-attention, cross-attention to T5 (modules called without transformer_options);
    # its position embedding needs a 64x64 latent.
    "pixart": {
        "config": "PixArtSigma", "text_tokens": 77, "context_dim": 32, "pooled_dim": None, "latent": (4, None),
        "latent_size": 64, "text_mask": False,
        "unet": {"image_model": "pixart_sigma", "num_heads": 4, "patch_size": 2, "hidden_size": 64, "in_channels": 4,
                 "depth": 2, "input_size": 8, "pe_interpolation": 1, "micro_condition": False, "caption_channels": 32,
                 "model_max_length": 77},
    },
    # Wan 2.1 T2V: self-attention and cross-attention to UMT5 in every block.
    "wan": {
        "config": "WAN21_T2V", "text_tokens": 77, "context_dim": 32, "pooled_dim": None, "latent": (16, 2),
        "latent_size": 8, "text_mask": False,
        "unet": {"image_model": "wan2.1", "model_type": "t2v", "dim": 64, "out_dim": 16, "num_heads": 2, "ffn_dim": 128,
                 "num_layers": 2, "patch_size": (1, 2, 2), "freq_dim": 256, "window_size": (-1, -1), "qk_norm": True,
                 "cross_attn_norm": True, "eps": 1e-6, "in_dim": 16, "text_dim": 32},
    },
    # Wan 2.1 I2V: Wan blocks whose cross-attention has a second key/value pair for 257 CLIP-vision
    # tokens (projected from 1280 wide by img_emb, a width the class fixes), prepended to the UMT5
    # text context; the input is 16 noise + 4 mask + 16 start-image latent channels (in_dim 36).
    "wan_i2v": {
        "config": "WAN21_I2V", "text_tokens": 77, "image_tokens": 257, "clip_vision_dim": 1280, "context_dim": 32,
        "pooled_dim": None, "latent": (16, 2), "latent_size": 8, "text_mask": False,
        "unet": {"image_model": "wan2.1", "model_type": "i2v", "dim": 64, "out_dim": 16, "num_heads": 2, "ffn_dim": 128,
                 "num_layers": 2, "patch_size": (1, 2, 2), "freq_dim": 256, "window_size": (-1, -1), "qk_norm": True,
                 "cross_attn_norm": True, "eps": 1e-6, "in_dim": 36, "text_dim": 32},
    },
}

# SD3.5 medium: as SD3, plus RMS q/k norms and an extra image self-attention (attn2) in the
# x_block of the listed layers (MMDiT-X).
DITS["sd35"] = dict(DITS["sd3"], unet=dict(DITS["sd3"]["unet"], qk_norm="rms", x_block_self_attn_layers=[0]))
# Hunyuan-DiT v1.0/1.1: as v1.2 plus image-size and style conditioning in the extra vector.
DITS["hunyuan_dit1"] = dict(
    DITS["hunyuan_dit"], config="HunyuanDiT1",
    unet=dict(DITS["hunyuan_dit"]["unet"], image_model="hydit1", size_cond=True, use_style_cond=True),
)
# Fields that newer ComfyUI (0.28) requires in a model's parameters and that its model
# detection fills for the real checkpoints: (module, parameters class, {field: value}).
NEWER_HOST_FIELDS = {
    "flux": ("comfy.ldm.flux.model", "FluxParams", {"txt_ids_dims": []}),
    "chroma": ("comfy.ldm.chroma.model", "ChromaParams", {"txt_ids_dims": [], "vec_in_dim": None}),
}
TEXT_TOKENS = {kind: spec["text_tokens"] for kind, spec in DITS.items()}
MASK_SUPPORT = {kind: spec["text_mask"] for kind, spec in DITS.items()}


def build_dit(kind, seed=0):
    """A ModelPatcher (CPU, float32, eval) around the small model of the given kind, weights drawn from seed."""
    import comfy.model_patcher
    import comfy.supported_models

    spec = DITS[kind]
    model_config = getattr(comfy.supported_models, spec["config"])(dict(spec["unet"], **_host_fields(kind), dtype=torch.float32))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    init_weights(model.diffusion_model, seed)
    _init_buffers(model.diffusion_model)
    model.eval()
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def _host_fields(kind):
    """The NEWER_HOST_FIELDS of kind that the running host's parameters class declares."""
    if kind not in NEWER_HOST_FIELDS:
        return {}
    module, name, fields = NEWER_HOST_FIELDS[kind]
    declared = getattr(importlib.import_module(module), name).__dataclass_fields__
    return {field: value for field, value in fields.items() if field in declared}


def _init_buffers(dit):
    """Buffers a checkpoint would fill, left torch.empty by the constructors (init_weights draws parameters only)."""
    pos_embed = getattr(dit, "pos_embed", None)
    if isinstance(pos_embed, torch.Tensor) and getattr(dit, "pos_embed_max_size", None):  # MMDiT's 2D sin-cos table
        from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed_torch

        size = dit.pos_embed_max_size
        with torch.no_grad():
            pos_embed.copy_(get_2d_sincos_pos_embed_torch(pos_embed.shape[-1], size, size).reshape(pos_embed.shape))


def text_mask(kind, valid, batch=1):
    """A [batch, text_tokens] mask with the first `valid` tokens kept (1) and the rest padding (0)."""
    mask = torch.zeros(batch, TEXT_TOKENS[kind], dtype=torch.long)
    mask[:, :valid] = 1
    return mask


def attention_bias(mask):
    """A [batch, tokens] 0/1 mask as the additive [batch, 1, 1, tokens] float mask ComfyUI's attention functions take."""
    keep = mask.reshape(mask.shape[0], 1, 1, mask.shape[-1]).bool()
    return torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)


def _as_mask(kind, attention_mask, batch):
    if attention_mask is None:
        return None
    if kind != "qwen_image" and not MASK_SUPPORT[kind]:
        raise ValueError(f"{kind}: ComfyUI 0.3.75 passes no text attention mask to this model")
    if isinstance(attention_mask, torch.Tensor):
        return attention_mask
    return text_mask(kind, int(attention_mask), batch)


def dit_conditioning(kind, seed, batch=1, attention_mask=None, clip_vision=True, start_image=True, latent_size=None, reference=False):
    """[[context, extras]] as ComfyUI's text encoders (and conditioning nodes) hand them to the sampler.

    attention_mask: a [batch, text_tokens] 0/1 tensor, or an int (that many valid tokens, then
    padding), or None; it goes in the extras as "attention_mask", the key ComfyUI's encoders use.
    Only kinds with MASK_SUPPORT[kind] act on it: Lumina 2 (masked keys in the context refiner's
    attention; given as attention_bias(mask)) and Hunyuan-DiT (masked BERT tokens replaced by learned
    padding; the mT5 mask keeps the same fraction of tokens). Hunyuan-DiT always gets masks (its
    model requires them): by default the first half of each text is valid. Qwen-Image takes the key
    as its encoder sets it, but the 0.3.75 model ignores it; other kinds raise ValueError.
    Flux: the mask becomes the full additive (tokens x tokens) mask that Flux takes, the padded
    text keys dropped for every query; reference=True adds a Kontext reference latent.
    Wan I2V: clip_vision=False leaves out the CLIP-vision tokens, start_image=False the start-image
    latent and its mask (latent_size: that latent's size, the kind's default if None).
    """
    spec = DITS[kind]
    gen = torch.Generator().manual_seed(seed)
    context = torch.randn(batch, spec["text_tokens"], spec["context_dim"], generator=gen)
    # CLIPTextEncode always sets "pooled_output", None for encoders without one; Flux-family
    # models (Chroma) read the key unconditionally.
    extras = {"pooled_output": None}
    if spec["pooled_dim"]:
        extras["pooled_output"] = torch.randn(batch, spec["pooled_dim"], generator=gen)
    mask = _as_mask(kind, attention_mask, batch)
    if kind.startswith("hunyuan_dit"):
        t5_tokens = spec["t5_tokens"]
        extras["conditioning_mt5xl"] = torch.randn(batch, t5_tokens, spec["t5_dim"], generator=gen)
        if mask is None:
            mask = text_mask(kind, spec["text_tokens"] // 2, batch)
        t5_mask = torch.zeros(batch, t5_tokens, dtype=torch.long)
        t5_mask[:, : max(1, round(t5_tokens * mask[0].float().mean().item()))] = 1
        extras["attention_mask_mt5xl"] = t5_mask
    if mask is not None:
        # Lumina 2: model_base forwards the mask only if it has zeros, straight into the context
        # refiner's attention, which reads a 2D mask as [queries, keys] (the encoder's [batch, tokens]
        # form fails there with the sub-quadratic, basic and pytorch backends), so it goes in the
        # additive 4D form.
        extras["attention_mask"] = attention_bias(mask) if kind == "lumina2" and mask.dim() == 2 else mask
    if kind == "flux" and mask is not None:
        side = (latent_size or spec["latent_size"]) // 2
        tokens = spec["text_tokens"] + side * side
        keys = torch.cat([mask.bool(), torch.ones(batch, tokens - mask.shape[1], dtype=torch.bool)], 1)
        extras["attention_mask"] = torch.zeros(batch, tokens, tokens).masked_fill(~keys[:, None, :], float("-inf"))
        extras["attention_mask_img_shape"] = (side, side)  # the mask's own size: the host keeps it as it is
    if reference:
        extras["reference_latents"] = [torch.randn(latent_shape(kind, 1, latent_size), generator=gen)]
    if kind == "wan_i2v":
        import comfy.clip_vision

        if clip_vision:
            output = comfy.clip_vision.Output()
            output.penultimate_hidden_states = torch.randn(batch, spec["image_tokens"], spec["clip_vision_dim"], generator=gen)
            extras["clip_vision_output"] = output
        if start_image:
            channels, frames = spec["latent"]
            size = latent_size or spec["latent_size"]
            # What WanImageToVideo adds: the encoded start image (later frames grey) and a mask of the
            # frames to generate (0 on the first latent frame, which the start image fixes).
            extras["concat_latent_image"] = torch.randn(1, channels, frames, size, size, generator=torch.Generator().manual_seed(1234))
            concat_mask = torch.ones(1, 1, frames, size, size)
            concat_mask[:, :, :1] = 0.0
            extras["concat_mask"] = concat_mask
    return [[context, extras]]


def latent_shape(kind, batch=1, latent_size=None):
    channels, frames = DITS[kind]["latent"]
    size = latent_size or DITS[kind]["latent_size"]
    return (batch, channels) + ((frames,) if frames else ()) + (size, size)


def sample_dit(model, kind, steps=3, cfg=4.0, seed=0, sampler="euler", scheduler="normal", latent_size=None, batch=1,
               attention_mask=None, reference=False, positive=None, negative=None, **kwargs):
    """The final latent of a real KSampler run (comfy.sample.sample) on fixed noise and prompts.

    latent_size is in latent pixels (square); the default is the kind's "latent_size". positive /
    negative replace the default conditioning (dit_conditioning with seeds seed + 1 and seed + 2);
    attention_mask goes to both defaults. Other keyword arguments go to comfy.sample.sample
    (denoise, sigmas, callback, ...).
    """
    import comfy.sample

    shape = latent_shape(kind, batch, latent_size)
    latent = torch.zeros(shape)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    if positive is None:
        positive = dit_conditioning(kind, seed + 1, batch=batch, attention_mask=attention_mask, latent_size=latent_size, reference=reference)
    if negative is None:
        negative = dit_conditioning(kind, seed + 2, batch=batch, attention_mask=attention_mask, latent_size=latent_size, reference=reference)
    with torch.inference_mode():  # as ComfyUI runs its nodes
        return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, positive, negative, latent,
                                   seed=seed, disable_pbar=True, **kwargs)
