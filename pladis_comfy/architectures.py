"""Where PLADIS goes in each architecture, and how it is registered on a ModelPatcher.

UNets: attn2 replace patches and their host hooks (patch_unet). Transformers (DiTs): one
entry per diffusion-model class (matched along the class hierarchy by qualified name):
which module lists hold its blocks, which module inside a block carries the attention,
and how that attention is laid out. A new architecture is one entry here.
"""
from dataclasses import dataclass

import comfy.patcher_extension
from comfy.ldm.hydit.attn_layers import apply_rotary_emb

from ..pladis_core.attention import merge_heads
from .dit import CROSS, JOINT, BlockTag, CaptureForward, CaptureOverride, DitEvaluation, PladisForward, PladisOverride
from .patching import foreign
from .tgate import CachedForward
from .unet import UnetEvaluation, copy_on_clone, record_context_lengths, register_attn2_patches

WRAPPER_KEY = "pladis_dit"
UNET_KEY = "pladis_unet"


@dataclass(frozen=True)
class Architecture:
    blocks: tuple  # (kind, attribute of the diffusion model that lists the blocks), e.g. ("double", "double_blocks")
    layout: str  # JOINT: text then image tokens in one sequence; CROSS: image queries, text keys
    module: str = ""  # the attention module inside each block ("" = the block itself)
    text_tokens: object = None  # JOINT: (diffusion_model, context, extra conds) -> text tokens leading the sequence
    text_call: object = None  # CROSS: module -> which of its attention calls attends to the text
    forward: object = None  # for modules that call attention without transformer_options (see PladisForward)


def _context_tokens(diffusion_model, context, conds):
    return context.shape[1]


def _sd3_tokens(diffusion_model, context, conds):
    return context.shape[1] + diffusion_model.register_length  # learned register tokens lead the context


def _lumina_tokens(diffusion_model, context, conds):
    if conds.get("ref_latents") is not None or conds.get("direct_context") is not None:
        # Newer ComfyUI: Z-Image Omni puts one caption per image first; MingImage adds context.
        raise NotImplementedError("the multi-caption layout of Z-Image Omni / MingImage is not supported yet")
    multiple = getattr(diffusion_model, "pad_tokens_multiple", None)  # Z-Image pads the caption
    return context.shape[1] + (-context.shape[1] % multiple if multiple else 0)


def _wan_text_call(module):
    return 1 if hasattr(module, "k_img") else 0  # I2V: the CLIP image tokens first, then the text


def _pixart_qkv(module, x, cond, mask=None):
    b, n, _ = x.shape
    q = module.q_linear(x).view(b, n, module.num_heads, module.head_dim)
    k, v = module.kv_linear(cond).view(b, -1, 2, module.num_heads, module.head_dim).unbind(2)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), lambda out: module.proj_drop(module.proj(merge_heads(out)))


def _hunyuan_qkv(module, x, y, freqs_cis_img=None):
    b, n, _ = x.shape
    q = module.q_norm(module.q_proj(x).view(b, n, module.num_heads, module.head_dim))
    k, v = module.kv_proj(y).view(b, y.shape[1], 2, module.num_heads, module.head_dim).unbind(2)
    k = module.k_norm(k)
    if freqs_cis_img is not None:
        q, _ = apply_rotary_emb(q, None, freqs_cis_img)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), lambda out: (module.proj_drop(module.out_proj(merge_heads(out))),)


_FLUX = Architecture((("double", "double_blocks"), ("single", "single_blocks")), JOINT, text_tokens=_context_tokens)

JOINT_ARCHITECTURES = {
    "comfy.ldm.flux.model.Flux": _FLUX,  # Flux dev/schnell/Kontext, Flux.2
    "comfy.ldm.chroma.model.Chroma": _FLUX,  # and Chroma Radiance
    "comfy.ldm.modules.diffusionmodules.mmdit.MMDiT": Architecture((("double", "joint_blocks"),), JOINT, text_tokens=_sd3_tokens),
    "comfy.ldm.qwen_image.model.QwenImageTransformer2DModel": Architecture((("double", "transformer_blocks"),), JOINT, text_tokens=_context_tokens),
    "comfy.ldm.lumina.model.NextDiT": Architecture((("single", "layers"),), JOINT, text_tokens=_lumina_tokens),  # Lumina2, Z-Image
}
CROSS_ARCHITECTURES = {
    "comfy.ldm.wan.model.WanModel": Architecture((("block", "blocks"),), CROSS, "cross_attn", text_call=_wan_text_call),
    "comfy.ldm.pixart.pixartms.PixArtMS": Architecture((("block", "blocks"),), CROSS, "cross_attn", forward=_pixart_qkv),
    "comfy.ldm.hydit.models.HunYuanDiT": Architecture((("block", "blocks"),), CROSS, "attn2", forward=_hunyuan_qkv),
}


def find_architecture(diffusion_model, table):
    for cls in type(diffusion_model).__mro__:
        found = table.get(f"{cls.__module__}.{cls.__name__}")
        if found is not None:
            return found
    return None


def attention_blocks(diffusion_model, architecture):
    """{kind: number of blocks} for the block lists this architecture patches."""
    return {kind: len(getattr(diffusion_model, attribute, ())) for kind, attribute in architecture.blocks}


def patch_unet(model, blocks, settings, dense_attention):
    """Register PLADIS on a cloned UNet ModelPatcher for the chosen {(stage, number): depth}
    blocks; returns (layers patched, layers an earlier Apply PLADIS patched that are plain again)."""
    counts = register_attn2_patches(model, blocks, settings, dense_attention)
    layers = [(stage, number, index) for (stage, number), depth in blocks.items() for index in range(depth)]
    hooks = (
        (comfy.patcher_extension.WrappersMP.APPLY_MODEL, UnetEvaluation(layers, settings, dense_attention)),
        (comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, record_context_lengths),
    )
    for kind, wrapper in hooks:
        model.remove_wrappers_with_key(kind, UNET_KEY)
        model.add_wrapper_with_key(kind, UNET_KEY, wrapper)
    model.remove_callbacks_with_key(comfy.patcher_extension.CallbacksMP.ON_CLONE, UNET_KEY)
    model.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_CLONE, UNET_KEY, copy_on_clone)
    return counts


def remove_unet_hooks(model):
    """Take Apply PLADIS's evaluation hook off a cloned ModelPatcher (the preview measures plain attention)."""
    model.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, UNET_KEY)


def patch_dit(model, architecture, chosen, settings):
    """Register PLADIS on a cloned ModelPatcher for the chosen (kind, index) blocks.

    An earlier PLADIS on this model is replaced (the later node's settings are the whole
    truth); a TGATE cache wrapper stays outermost; another node's override, installed before
    or after, serves the dense attention (DitEvaluation).
    """
    register_dit(
        model, architecture, chosen,
        lambda earlier: PladisOverride(settings, chosen, earlier),
        lambda forward, path, module: PladisForward(forward, path, module, architecture.forward, settings),
    )


def capture_dit(model, architecture, collector):
    """Register the preview's recorders on every block of a cloned ModelPatcher (PLADIS taken off)."""
    every = {(kind, i) for kind, n in attention_blocks(model.get_model_object("diffusion_model"), architecture).items() for i in range(n)}
    register_dit(
        model, architecture, every,
        lambda earlier: CaptureOverride(collector, every, earlier),
        lambda forward, path, module: CaptureForward(forward, path, module, architecture.forward, collector),
    )


def register_dit(model, architecture, chosen, make_override, make_forward):
    """The APPLY_MODEL wrapper, and on each block either a BlockTag (the wrapper then installs
    make_override's attention override in every evaluation) or, where attention gets no
    transformer_options, make_forward's forward on the chosen blocks."""
    adapted = architecture.forward is not None
    wrapper = DitEvaluation(architecture.layout, chosen, architecture.text_tokens, None if adapted else make_override)
    model.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY)
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, wrapper)
    diffusion_model = model.get_model_object("diffusion_model")
    for kind, attribute in architecture.blocks:
        for index, block in enumerate(getattr(diffusion_model, attribute)):
            key = (kind, index)
            path = f"{attribute}.{index}" + (f".{architecture.module}" if architecture.module else "")
            module = block if not architecture.module else getattr(block, architecture.module)
            if adapted:
                patch = (lambda forward: make_forward(forward, path, module)) if key in chosen else (lambda forward: forward)
            else:
                call = architecture.text_call(module) if architecture.text_call else 0
                patch = lambda forward: BlockTag(forward, path, module, key, architecture.layout, call)  # noqa: E731
            target = f"diffusion_model.{path}.forward"
            forward = _rewrap(model.get_model_object(target), module, patch)
            if forward is None:  # the module's own forward again
                model.object_patches.pop(target, None)
            else:
                model.add_object_patch(target, forward)


def token_grid(diffusion_model, latent_shape):
    """(frames, height, width) of a DiT's image tokens for a latent of this shape."""
    patch = getattr(diffusion_model, "patch_size", 2)
    patch = tuple(patch) if isinstance(patch, (tuple, list)) else (1, patch, patch)
    frames = latent_shape[2] if len(latent_shape) == 5 else 1
    height, width = latent_shape[-2:]
    return tuple(-(-size // p) for size, p in zip((frames, height, width), patch))


def _rewrap(forward, module, patch):
    """patch(what forward wraps), with any earlier PLADIS patch taken off, inside a TGATE cache
    wrapper; None stands for the module's own forward (see patching.foreign)."""
    if isinstance(forward, CachedForward):
        return forward.rewrapped(_rewrap(forward.forward, module, patch))
    if isinstance(forward, (BlockTag, PladisForward, CaptureForward)):
        return patch(forward.forward)
    return patch(foreign(forward, module))
