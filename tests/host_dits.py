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
import importlib.util

import torch

from host import loaded
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
        "config": "WAN21_I2V", "text_tokens": 77, "image_tokens": 257, "clip_vision_dim": 1280, "start_image": True, "context_dim": 32,
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
def _clip_vision(tokens, width, attribute="penultimate_hidden_states"):
    """A CLIP-vision output as the host's encoders make it, with `tokens` random features."""
    def make(gen, batch):
        import comfy.clip_vision

        output = comfy.clip_vision.Output()
        setattr(output, attribute, torch.randn(batch, tokens, width, generator=gen))
        return output
    return make


def _tensor(*shape, dtype=torch.float32, ones=False):
    """A per-sample conditioning tensor of this shape (random, or ones)."""
    return lambda gen, batch: torch.ones(batch, *shape, dtype=dtype) if ones else torch.randn(batch, *shape, generator=gen).to(dtype)


def _padding_mask(tokens, valid):
    """The encoder's [batch, tokens] 0/1 mask: `valid` tokens, then padding."""
    return lambda gen, batch: torch.arange(tokens).expand(batch, tokens).lt(valid).long()


_WAN = DITS["wan"]["unet"]
_FLUX = DITS["flux"]["unet"]
_HUNYUAN_VIDEO = {"image_model": "hunyuan_video", "mlp_ratio": 2.0, "hidden_size": 64, "num_heads": 4, "depth": 1,
                  "depth_single_blocks": 1, "theta": 256, "qkv_bias": True, "context_in_dim": 32, "byt5": False,
                  "meanflow": False, "use_cond_type_embedding": False, "vision_in_dim": None}
_PREDICT2 = {"image_model": "cosmos_predict2", "max_img_h": 240, "max_img_w": 240, "max_frames": 128, "in_channels": 16,
             "out_channels": 16, "patch_spatial": 2, "patch_temporal": 1, "model_channels": 64, "concat_padding_mask": True,
             "crossattn_emb_channels": 32, "pos_emb_cls": "rope3d", "pos_emb_learnable": True, "pos_emb_interpolation": "crop",
             "min_fps": 1, "max_fps": 30, "use_adaln_lora": True, "adaln_lora_dim": 32, "num_blocks": 2, "num_heads": 4,
             "extra_per_block_abs_pos_emb": False, "rope_h_extrapolation_ratio": 4.0, "rope_w_extrapolation_ratio": 4.0,
             "rope_t_extrapolation_ratio": 1.0, "extra_h_extrapolation_ratio": 1.0, "extra_w_extrapolation_ratio": 1.0,
             "extra_t_extrapolation_ratio": 1.0, "rope_enable_fps_modulation": False}
_KANDINSKY5 = {"image_model": "kandinsky5", "in_visual_dim": 16, "out_visual_dim": 16, "in_text_dim": 32, "in_text_dim2": 24,
               "time_dim": 32, "model_dim": 64, "ff_dim": 128, "visual_embed_dim": 132, "patch_size": (1, 2, 2),
               "num_text_blocks": 1, "num_visual_blocks": 2, "axes_dims": (4, 6, 6)}
_NEXT = dict(text_mask=False, pooled_dim=None, context_dim=32, text_tokens=24)
# The architectures of the pack's table that ComfyUI 0.28 added or changed, at toy widths. Each
# also says what its attention should look like: "joint" (where its text is: "first", "last" or
# "after" the queries' own keys; how many text tokens; how many tokens a joint call has, or for
# "after" how many non-text tokens follow the text), or "text_keys" for cross-attention models
# (the key count of the text call). "extras": the conds the model needs beside the context.
# "unet_update": config values the class's fixed extra config would overwrite.
DITS.update({
    # HiDream I1: double then single stream blocks over [image, T5, last Llama layer, the block's Llama layer].
    "hidream": dict(_NEXT, config="HiDream", pooled_dim=32, latent=(16, None), latent_size=16,
                    unet={"image_model": "hidream", "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 1,
                          "num_single_layers": 1, "attention_head_dim": 16, "num_attention_heads": 4, "caption_channels": [32, 32],
                          "text_emb_dim": 32, "num_routed_experts": 4, "num_activated_experts": 2, "axes_dims_rope": [8, 4, 4],
                          "max_resolution": [16, 16], "llama_layers": [0, 1]},
                    extras={"conditioning_llama3": _tensor(2, 20, 32)}, joint={"position": "last", "text": 24 + 2 * 20, "tokens": 64 + 64}),
    # HunyuanVideo 1.0: Flux-style double and single blocks, LLaVA text (0.3.75 puts it after the video, 0.28 before).
    "hunyuan_video": dict(_NEXT, config="HunyuanVideo", pooled_dim=32, latent=(16, 2), latent_size=8,
                          unet=dict(_HUNYUAN_VIDEO, in_channels=16, out_channels=16, vec_in_dim=32, axes_dim=[4, 6, 6],
                                    patch_size=[1, 2, 2], guidance_embed=True),
                          joint={"position": "hunyuan", "text": 24, "tokens": 24 + 2 * 4 * 4}),
    # HunyuanVideo 1.5 I2V-style conditioning: ByT5 glyph tokens and CLIP vision tokens join the text.
    "hunyuan_video15": dict(_NEXT, config="HunyuanVideo15", latent=(32, 2), latent_size=4,
                            unet=dict(_HUNYUAN_VIDEO, in_channels=65, out_channels=32, vec_in_dim=None, axes_dim=[4, 6, 6],
                                      patch_size=[1, 1, 1], guidance_embed=False, byt5=True, use_cond_type_embedding=True,
                                      vision_in_dim=1152),
                            extras={"conditioning_byt5small": _tensor(10, 1472), "clip_vision_output": _clip_vision(12, 1152, "last_hidden_state")},
                            joint={"position": "hunyuan", "text": 24 + 10 + 12, "tokens": 46 + 2 * 4 * 4}),
    # HunyuanImage 2.1: the same class, 2D, with ByT5 glyph tokens after the text.
    "hunyuan_image21": dict(_NEXT, config="HunyuanImage21", latent=(64, None), latent_size=6,
                            unet=dict(_HUNYUAN_VIDEO, in_channels=64, out_channels=64, vec_in_dim=None, axes_dim=[8, 8],
                                      patch_size=[1, 1], guidance_embed=True, byt5=True),
                            extras={"conditioning_byt5small": _tensor(10, 1472)}, joint={"position": "hunyuan", "text": 24 + 10, "tokens": 34 + 36}),
    # AuraFlow: MMDiT double layers then single layers, 8 learned register tokens before the text.
    "auraflow": dict(_NEXT, config="AuraFlow", latent=(4, None), latent_size=16,
                     unet={"max_seq": 64, "cond_seq_dim": 32, "n_double_layers": 1, "n_layers": 2, "dim": 64, "n_heads": 4,
                           "global_conddim": 64, "patch_size": 2, "in_channels": 4, "out_channels": 4},
                     joint={"position": "first", "text": 8 + 24, "tokens": 32 + 64}),
    # OmniGen2: text, image and reference refiners, then joint layers over [text, references, image]; grouped-query attention.
    "omnigen2": dict(_NEXT, config="Omnigen2", latent=(16, None), latent_size=16,
                     unet={"image_model": "omnigen2", "patch_size": 2, "in_channels": 16, "out_channels": None, "hidden_size": 64,
                           "num_layers": 2, "num_refiner_layers": 1, "num_attention_heads": 4, "num_kv_heads": 2, "multiple_of": 16,
                           "ffn_dim_multiplier": None, "norm_eps": 1e-5, "axes_dim_rope": [4, 6, 6], "axes_lens": [1024, 1664, 1664],
                           "text_feat_dim": 32, "timestep_scale": 1000.0},
                     extras={"attention_mask": _tensor(24, dtype=torch.long, ones=True)}, joint={"position": "first", "text": 24, "tokens": 88}),
    # Boogu: OmniGen2's refiners, then double-stream layers (image-only self-attention, joint instruct attention) and single-stream layers.
    "boogu": dict(_NEXT, config="Boogu", latent=(16, None), latent_size=16,
                  unet={"image_model": "boogu", "patch_size": 2, "in_channels": 16, "hidden_size": 64, "num_layers": 1,
                        "num_double_stream_layers": 1, "num_refiner_layers": 1, "num_attention_heads": 4, "num_kv_heads": 2,
                        "multiple_of": 16, "norm_eps": 1e-5, "axes_dim_rope": (4, 6, 6), "axes_lens": (300, 512, 512),
                        "instruction_feat_dim": 32, "timestep_scale": 1000.0},
                  extras={"attention_mask": _tensor(24, dtype=torch.long, ones=True)}, joint={"position": "first", "text": 24, "tokens": 88}),
    # JoyImage: double blocks over [image, references, text] (Wan 2.1 latent format).
    "joyimage": dict(_NEXT, config="JoyImage", latent=(16, 1), latent_size=16,
                     unet={"image_model": "joyimage", "patch_size": [1, 2, 2], "in_channels": 16, "out_channels": 16, "hidden_size": 64,
                           "num_attention_heads": 2, "text_dim": 32, "mlp_width_ratio": 2.0, "num_layers": 2},
                     unet_update={"rope_dim_list": [8, 12, 12]}, joint={"position": "last", "text": 24, "tokens": 88}),
    # Lens: joint blocks over [image, text] of Flux.2-packed latents; a text padding mask always goes with them.
    "lens": dict(_NEXT, config="Lens", context_dim=64, latent=(128, None), latent_size=8,
                 unet={"image_model": "lens", "patch_size": 2, "in_channels": 128, "out_channels": 32, "num_layers": 2,
                       "attention_head_dim": 16, "num_attention_heads": 4, "enc_hidden_dim": 16, "axes_dims_rope": (4, 6, 6),
                       "rms_norm": True, "multi_layer_encoder_feature": True, "selected_layer_index": (5, 11, 17, 23)},
                 extras={"attention_mask": _padding_mask(24, 20)}, joint={"position": "last", "text": 24, "tokens": 88}),
    # Ideogram 4: single-stream layers over [text, image]; a padded prompt gives a segment mask.
    "ideogram4": dict(_NEXT, config="Ideogram4", context_dim=48, latent=(128, None), latent_size=8,
                      unet={"image_model": "ideogram4", "in_channels": 128, "num_layers": 2},
                      unet_update={"num_attention_heads": 4, "attention_head_dim": 16, "intermediate_size": 128, "adaln_dim": 32,
                                   "llm_features_dim": 48, "rope_theta": 10000, "mrope_section": [2, 3, 3], "norm_eps": 1e-5},
                      extras={"attention_mask": _padding_mask(24, 20)}, joint={"position": "first", "text": 24, "tokens": 88}),
    # Mochi: asymmetric joint blocks over [video, the prompt's valid tokens].
    "mochi": dict(_NEXT, config="GenmoMochi", latent=(12, 2), latent_size=16,
                  unet={"image_model": "mochi_preview", "depth": 2, "patch_size": 2, "num_heads": 4, "hidden_size_x": 64,
                        "hidden_size_y": 32, "mlp_ratio_x": 192.0, "mlp_ratio_y": 4.0, "learn_sigma": False, "in_channels": 12,
                        "qk_norm": True, "qkv_bias": False, "out_bias": True, "attn_drop": 0.0, "patch_embed_bias": True,
                        "posenc_preserve_area": True, "timestep_mlp_bias": True, "attend_to_padding": False, "timestep_scale": 1000.0,
                        "use_t5": True, "t5_feat_dim": 32, "t5_token_length": 256, "rope_theta": 10000.0},
                  extras={"attention_mask": _padding_mask(24, 20)}, joint={"position": "last", "text": 20, "tokens": 128 + 20}),
    # CogVideoX 1.0: blocks with the attention inline over [text, video]; its context repeats when batched (CONDCrossAttn).
    "cogvideox": dict(_NEXT, config="CogVideoX_T2V", latent=(16, 2), latent_size=16,
                      unet={"image_model": "cogvideox", "num_attention_heads": 2, "attention_head_dim": 48, "in_channels": 16,
                            "out_channels": 16, "time_embed_dim": 32, "text_embed_dim": 32, "num_layers": 2, "sample_width": 16,
                            "sample_height": 16, "sample_frames": 5, "max_text_seq_length": 24},
                      joint={"position": "first", "text": 24, "tokens": 24 + 128}),
    # Krea 2: text fusion blocks (text only), then single-stream blocks over [text, image].
    "krea2": dict(_NEXT, config="Krea2", context_dim=64, latent=(16, 1), latent_size=16,
                  unet={"image_model": "krea2", "features": 64, "tdim": 32, "txtdim": 32, "heads": 4, "kvheads": 2, "multiplier": 2,
                        "layers": 2, "patch": 2, "channels": 16, "theta": 1000.0, "txtlayers": 2, "txtheads": 2, "txtkvheads": 2},
                  joint={"position": "first", "text": 24, "tokens": 88}),
    # Ernie Image: single-stream layers over [image, text]; its attention gets no transformer_options.
    "ernie": dict(_NEXT, config="ErnieImage", latent=(128, None), latent_size=8,
                  unet={"image_model": "ernie", "hidden_size": 64, "num_attention_heads": 4, "num_layers": 2, "ffn_hidden_size": 128,
                        "in_channels": 128, "out_channels": 128, "patch_size": 1, "text_in_dim": 32, "rope_theta": 256, "rope_axes_dim": (4, 6, 6)},
                  joint={"position": "last", "text": 24, "tokens": 88}),
    # Stable Cascade stage C: its image tokens attend to [themselves, CLIP text, 4 pooled-text and 4 image-prompt tokens].
    "cascade_c": dict(_NEXT, config="Stable_Cascade_C", text_tokens=77, latent=(16, None), latent_size=12,
                      unet={"stable_cascade_stage": "c", "c_in": 16, "c_out": 16, "c_r": 64, "patch_size": 1, "c_cond": 32,
                            "c_hidden": [32, 32], "nhead": [2, 2], "blocks": [[1, 1], [1, 1]], "block_repeat": [[1, 1], [1, 1]],
                            "level_config": ["CTA", "CTA"], "c_clip_text": 32, "c_clip_text_pooled": 32, "c_clip_img": 768,
                            "c_clip_seq": 4, "switch_level": [False]},
                      extras={"pooled_output": _tensor(1, 32)}, joint={"position": "after", "text": 77, "beyond": 8}),
    # Stable Cascade stage B: only the pooled prompt (refused).
    "cascade_b": dict(_NEXT, config="Stable_Cascade_B", latent=(4, None), latent_size=32,
                      unet={"stable_cascade_stage": "b", "c_in": 4, "c_out": 4, "c_r": 64, "patch_size": 2, "c_cond": 32,
                            "c_hidden": [16, 16, 32, 32], "nhead": [-1, -1, 2, 2], "blocks": [[1, 1, 1, 1], [1, 1, 1, 1]],
                            "block_repeat": [[1, 1, 1, 1], [1, 1, 1, 1]], "level_config": ["CT", "CT", "CTA", "CTA"], "c_clip": 32,
                            "c_clip_seq": 4, "c_effnet": 16, "c_pixels": 3},
                      extras={"pooled_output": _tensor(1, 32)}),
    # LTX-Video: attn1 / attn2 (text cross-attention) blocks; the prompt's padding mask is required.
    "ltxv": dict(_NEXT, config="LTXV", text_tokens=16, latent=(128, 2), latent_size=4,
                 unet={"image_model": "ltxv", "in_channels": 128, "cross_attention_dim": 64, "attention_head_dim": 16,
                       "num_attention_heads": 4, "caption_channels": 32, "num_layers": 2},
                 extras={"attention_mask": _padding_mask(16, 12)}, text_keys=16),
    # LTX-2 audio-video: video and audio streams with their own text cross-attention; connectors make the
    # context 1024 tokens (learned registers). Its latent is a video and an audio latent together.
    "ltxav": dict(_NEXT, config="LTXAV", text_tokens=16, latent=(128, 2), latent_size=4, audio_latent=(8, 8, 16),
                  unet={"image_model": "ltxav", "in_channels": 128, "audio_in_channels": 128, "cross_attention_dim": 64,
                        "audio_cross_attention_dim": 32, "attention_head_dim": 16, "num_attention_heads": 4, "audio_attention_head_dim": 8,
                        "audio_num_attention_heads": 4, "caption_channels": 32, "num_layers": 2, "connector_attention_head_dim": 8,
                        "connector_num_attention_heads": 4, "connector_num_layers": 1},
                  text_keys=1024, image_queries=2 * 4 * 4),  # the audio stream's text attention (8 queries) stays dense
    # Cosmos Predict2: self-attention and text cross-attention blocks.
    "cosmos_predict2": dict(_NEXT, config="CosmosT2IPredict2", latent=(16, 1), latent_size=8, unet=_PREDICT2, text_keys=24),
    # Anima: Cosmos Predict2's DiT with an LLM adapter that makes the 512-token context from Qwen features and T5 ids.
    "anima": dict(_NEXT, config="Anima", text_tokens=12, context_dim=1024, latent=(16, 1), latent_size=8,
                  unet=dict(_PREDICT2, image_model="anima", crossattn_emb_channels=1024),
                  extras={"t5xxl_ids": lambda gen, batch: torch.randint(0, 32128, (10,), generator=gen, dtype=torch.int32),
                          "t5xxl_weights": lambda gen, batch: torch.ones(10)},
                  text_keys=512),
    # Kandinsky 5 video: text blocks, then visual blocks with self- and cross-attention; a pooled CLIP vector.
    "kandinsky5": dict(_NEXT, config="Kandinsky5", text_tokens=20, pooled_dim=24, latent=(16, 2), latent_size=8, unet=_KANDINSKY5, text_keys=20),
    "kandinsky5_image": dict(_NEXT, config="Kandinsky5Image", text_tokens=20, pooled_dim=24, latent=(16, None), latent_size=8,
                             unet=dict(_KANDINSKY5, visual_embed_dim=64, rope_scale_factor=(1.0, 1.0, 1.0)), text_keys=20),
    # Subclasses of families the table already had, each built and checked on its own.
    "wan_vace": dict(DITS["wan"], config="WAN21_Vace", unet=dict(_WAN, model_type="vace", vace_layers=1, vace_in_dim=96)),
    "wan_camera": dict(DITS["wan_i2v"], config="WAN21_Camera", start_image=False, unet=dict(_WAN, model_type="camera", in_dim=32),
                       extras={"camera_conditions": _tensor(24, 2, 64, 64)}),
    "wan_humo": dict(DITS["wan"], config="WAN21_HuMo", unet=dict(_WAN, model_type="humo"), reference_tokens=16,
                     extras={"audio_embed": _tensor(2, 8, 5, 1280), "reference_latents": lambda gen, batch: [torch.randn(1, 16, 1, 8, 8, generator=gen)]}),
    "wan_s2v": dict(DITS["wan"], config="WAN22_S2V", reference_tokens=40,  # the reference and motion frames after the video
                    unet=dict(_WAN, model_type="s2v", audio_dim=32, num_audio_token=4, enable_adain=True, cond_dim=16,
                              audio_inject_layers=[0, 1], adain_mode="attn_norm", framepack_drop_mode="padd"),
                    extras={"audio_embed": _tensor(25, 32, 8), "reference_latents": lambda gen, batch: [torch.randn(1, 16, 1, 8, 8, generator=gen)],
                            "reference_motion": _tensor(16, 4, 8, 8), "control_video": _tensor(16, 2, 8, 8)}),
    "wan_causal": dict(DITS["wan"], config="WAN21_CausalAR_T2V", unet=dict(_WAN, model_type="t2v", causal_ar=True)),
    "wan_animate": dict(DITS["wan_i2v"], config="WAN22_Animate", start_image=False, unet=dict(_WAN, model_type="animate", in_dim=36),
                        extras={"pose_video_latent": _tensor(16, 1, 8, 8)}),
    "flux2": dict(DITS["flux"], config="Flux2", pooled_dim=None, latent=(128, None), latent_size=8,
                  unet={"image_model": "flux2", "in_channels": 128, "out_channels": 128, "vec_in_dim": None, "context_in_dim": 32,
                        "hidden_size": 64, "mlp_ratio": 3.0, "num_heads": 4, "depth": 1, "depth_single_blocks": 1, "axes_dim": [4, 4, 4, 4],
                        "theta": 2000, "patch_size": 1, "qkv_bias": False, "guidance_embed": True, "global_modulation": True,
                        "mlp_silu_act": True, "ops_bias": False, "default_ref_method": "index", "ref_index_scale": 10.0},
                  text_mask=False, joint={"position": "first", "text": 512, "tokens": 512 + 64}),
    "longcat": dict(DITS["flux"], config="LongCatImage", pooled_dim=None, unet=dict(_FLUX, guidance_embed=False, vec_in_dim=None),
                    text_mask=False),
    "chroma_radiance": dict(DITS["chroma"], config="ChromaRadiance", latent=(3, None), latent_size=64,
                            unet=dict(DITS["chroma"]["unet"], image_model="chroma_radiance", in_channels=3, out_channels=3, patch_size=8,
                                      nerf_hidden_size=16, nerf_mlp_ratio=2, nerf_depth=2, nerf_max_freqs=4, nerf_tile_size=512,
                                      nerf_final_head_type="conv", nerf_embedder_dtype=torch.float32)),
    "zimage_pixel": dict(DITS["z_image"], config="ZImagePixelSpace", latent=(3, None), latent_size=32,
                         unet=dict(DITS["z_image"]["unet"], image_model="zimage_pixel", patch_size=4, in_channels=3, n_refiner_layers=1,
                                   decoder_in_channels=48, decoder_hidden_size=32, decoder_num_res_blocks=1, decoder_max_freqs=4)),
})

# Where the text of the families above lies in their joint attention, or how many keys their text cross-attention has.
for _kind, _joint in {
    "flux": {"position": "first", "text": 32, "tokens": 32 + 64}, "chroma": {"position": "first", "text": 32, "tokens": 32 + 64},
    "sd3": {"position": "first", "text": 154, "tokens": 154 + 64}, "qwen_image": {"position": "first", "text": 24, "tokens": 24 + 64},
    "lumina2": {"position": "first", "text": 24, "tokens": 24 + 64}, "z_image": {"position": "first", "text": 32, "tokens": 32 + 64},
}.items():
    DITS[_kind]["joint"] = _joint
for _kind in ("sd35", "longcat", "chroma_radiance", "zimage_pixel"):
    DITS[_kind]["joint"] = DITS[{"sd35": "sd3", "longcat": "flux", "chroma_radiance": "chroma", "zimage_pixel": "z_image"}[_kind]]["joint"]
for _kind in ("wan", "wan_i2v", "wan_vace", "wan_camera", "wan_humo", "wan_s2v", "wan_animate", "wan_causal", "pixart", "hunyuan_dit", "hunyuan_dit1"):
    DITS[_kind]["text_keys"] = DITS[_kind]["text_tokens"] + DITS[_kind].get("t5_tokens", 0)  # HunyuanDiT: BERT, then mT5
# Fields that newer ComfyUI (0.28) requires in a model's parameters and that its model
# detection fills for the real checkpoints: (module, parameters class, {field: value}).
NEWER_HOST_FIELDS = {
    "flux": ("comfy.ldm.flux.model", "FluxParams", {"txt_ids_dims": []}),
    "flux2": ("comfy.ldm.flux.model", "FluxParams", {"txt_ids_dims": [3]}),
    "longcat": ("comfy.ldm.flux.model", "FluxParams", {"txt_ids_dims": [1, 2]}),
    "chroma": ("comfy.ldm.chroma.model", "ChromaParams", {"txt_ids_dims": [], "vec_in_dim": None}),
    "chroma_radiance": ("comfy.ldm.chroma_radiance.model", "ChromaRadianceParams",
                        {"txt_ids_dims": [], "vec_in_dim": None, "use_x0": False, "use_sequential_txt_ids": True}),
    "hunyuan_video": ("comfy.ldm.hunyuan_video.model", "HunyuanVideoParams", {"meanflow_sum": False}),
    "hunyuan_video15": ("comfy.ldm.hunyuan_video.model", "HunyuanVideoParams", {"meanflow_sum": True}),
    "hunyuan_image21": ("comfy.ldm.hunyuan_video.model", "HunyuanVideoParams", {"meanflow_sum": False}),
}
TEXT_TOKENS = {kind: spec["text_tokens"] for kind, spec in DITS.items()}
MASK_SUPPORT = {kind: spec["text_mask"] for kind, spec in DITS.items()}


def build_dit(kind, seed=0):
    """A ModelPatcher (CPU, float32, eval) around the small model of the given kind, weights drawn from seed."""
    import comfy.model_patcher
    import comfy.supported_models

    spec = DITS[kind]
    model_config = getattr(comfy.supported_models, spec["config"])(dict(spec["unet"], **_host_fields(kind), dtype=torch.float32))
    model_config.unet_config.update(spec.get("unet_update", {}))  # over what the class's fixed extra config set
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    init_weights(model.diffusion_model, seed)
    _init_buffers(model.diffusion_model)
    model.eval()
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def on_this_host(kind):
    """Whether the running ComfyUI has this kind's model (a kind a host lacks is left out of its runs)."""
    loaded()  # ComfyUI imported
    import comfy.supported_models

    return hasattr(comfy.supported_models, DITS[kind]["config"])


def _host_fields(kind):
    """The NEWER_HOST_FIELDS of kind that the running host's parameters class declares."""
    if kind not in NEWER_HOST_FIELDS:
        return {}
    module, name, fields = NEWER_HOST_FIELDS[kind]
    declared = getattr(importlib.import_module(module), name).__dataclass_fields__ if importlib.util.find_spec(module) else {}
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
    if "image_tokens" in spec:  # Wan I2V-style: CLIP vision tokens of the start image
        import comfy.clip_vision

        if clip_vision:
            output = comfy.clip_vision.Output()
            output.penultimate_hidden_states = torch.randn(batch, spec["image_tokens"], spec["clip_vision_dim"], generator=gen)
            extras["clip_vision_output"] = output
        if start_image and spec.get("start_image"):
            channels, frames = spec["latent"]
            size = latent_size or spec["latent_size"]
            # What WanImageToVideo adds: the encoded start image (later frames grey) and a mask of the
            # frames to generate (0 on the first latent frame, which the start image fixes).
            extras["concat_latent_image"] = torch.randn(1, channels, frames, size, size, generator=torch.Generator().manual_seed(1234))
            concat_mask = torch.ones(1, 1, frames, size, size)
            concat_mask[:, :, :1] = 0.0
            extras["concat_mask"] = concat_mask
    extras.update({name: make(gen, batch) for name, make in spec.get("extras", {}).items()})
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
    audio = DITS[kind].get("audio_latent")
    if audio:  # LTX-2 audio-video samples a video and an audio latent together
        from comfy.nested_tensor import NestedTensor

        latent = NestedTensor([latent, torch.zeros(batch, *audio)])
        noise = NestedTensor([noise, torch.randn(batch, *audio, generator=torch.Generator().manual_seed(seed + 7))])
    if positive is None:
        positive = dit_conditioning(kind, seed + 1, batch=batch, attention_mask=attention_mask, latent_size=latent_size, reference=reference)
    if negative is None:
        negative = dit_conditioning(kind, seed + 2, batch=batch, attention_mask=attention_mask, latent_size=latent_size, reference=reference)
    with torch.inference_mode():  # as ComfyUI runs its nodes
        out = comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, positive, negative, latent,
                                  seed=seed, disable_pbar=True, **kwargs)
    return torch.cat([t.flatten() for t in out.unbind()]) if audio else out  # one tensor to compare
