"""Every architecture the pack knows: one entry per diffusion-model class.

An entry holds all the pack knows of that model: where PLADIS goes (which block lists, which
attention module in a block, how its text is laid out, how many text tokens an evaluation
has), which modules TGATE caches or why it does not apply, what stays dense and why, and what
users call the models. The nodes, their tooltips and errors, the registration and the
README's model table all read it. A new architecture is one entry here and its small test
model in tests/host_dits.py. Entries are matched along the class hierarchy by qualified name.
"""
from dataclasses import dataclass

from ..pladis_core.attention import merge_heads
from .dit import CROSS, TEXT_AFTER_QUERIES, TEXT_FIRST, TEXT_LAST

UNET = "unet"  # attn2 replace patches (pladis_comfy/unet.py)
APPLY_PLADIS, FLUX_PATCH, APPLY_TGATE = "Apply PLADIS", "PLADIS Flux Patch", "Apply TGATE"
JOINT_TGATE = "text and image share one joint attention; there is no cross-attention module to cache"


@dataclass(frozen=True)
class Blocks:
    """One kind of block the nodes select by index (kind: "block", "double", "single", "vace").

    lists: attributes of the diffusion model that hold these blocks, in order; module: the
    dotted path of the attention module in a block ("" = the block itself); of_class: when set,
    the blocks are the submodules of that class name found anywhere in the lists.
    """

    kind: str
    lists: tuple
    module: str = ""
    of_class: str = ""

    def found(self, diffusion_model):
        """[(path in the diffusion model, the attention module)] of these blocks, in order."""
        found = []
        for attribute in self.lists:
            container = getattr(diffusion_model, attribute, None)
            if container is None:
                continue
            if self.of_class:
                found += [(f"{attribute}.{name}", m) for name, m in container.named_modules() if type(m).__name__ == self.of_class]
            else:
                found += [(f"{attribute}.{i}", block) for i, block in enumerate(container)]
        if self.module:
            found = [(f"{path}.{self.module}", _attribute(block, self.module)) for path, block in found]
        return found


@dataclass(frozen=True)
class Architecture:
    models: str  # what users call these models
    layout: object = CROSS  # UNET, CROSS or a joint layout (dit.py), or diffusion_model -> one of them
    blocks: tuple = ()  # Blocks
    text_tokens: object = None  # joint: (diffusion_model, context, model conds) -> text tokens of an evaluation
    text_call: object = 0  # cross: which attention call of the module attends to the text (or module -> that index)
    adapter: object = None  # attention called without transformer_options: (module, *args, **kw) -> (q, k, v, finish)
    text_cond: str = "c_crossattn"  # the model cond that carries the text (its length, where the host repeats it)
    tgate: object = ()  # ((cross attribute, self attribute), ...) of TGATE's modules in a block, or why it does not apply
    patch: tuple = None  # (frames, height, width) of latent per image token, where the model's patch_size does not say
    dense: str = ""  # what stays dense, and why
    refused: str = ""  # why neither node applies, for a model the pack knows but cannot patch

    def layout_of(self, diffusion_model):
        return self.layout(diffusion_model) if callable(self.layout) else self.layout

    @property
    def node(self):
        """The PLADIS node for this model, or None."""
        if self.refused:
            return None
        return APPLY_PLADIS if self.layout in (UNET, CROSS) else FLUX_PATCH


def _attribute(obj, dotted):
    for name in dotted.split("."):
        obj = getattr(obj, name)
    return obj


# --- how many text tokens a joint sequence holds (diffusion_model, context, model conds) ---


def _context(dm, context, conds):
    return context.shape[1]


def _sd3(dm, context, conds):
    return context.shape[1] + dm.register_length  # learned register tokens lead the context


def _auraflow(dm, context, conds):
    return dm.register_tokens.shape[1] + context.shape[1]  # learned register tokens lead the context


def _lumina(dm, context, conds):
    """Z-Image pads each caption to a multiple of its pad; Z-Image Omni puts one caption per
    reference image first, then the main caption, then the captions left over, all text."""
    if conds.get("direct_context") is not None:  # newer ComfyUI's MingImage; not on the test hosts
        raise NotImplementedError("MingImage's direct context is not supported yet")
    multiple = getattr(dm, "pad_tokens_multiple", None)
    pad = (lambda n: n + (-n % multiple)) if multiple else (lambda n: n)
    refs, captions = conds.get("ref_latents") or [], conds.get("ref_contexts") or []
    per_ref = [pad(captions[i].shape[1]) if i < len(captions) else multiple for i in range(len(refs))]
    return sum(per_ref) + pad(context.shape[1]) + sum(pad(c.shape[1]) for c in captions[len(refs):])


def _hidream(dm, context, conds):
    llama = conds["encoder_hidden_states_llama3"]  # (batch, llama layers, tokens, width)
    return context.shape[1] + 2 * llama.shape[2]  # T5, then the last llama layer's and the block's own


def _hunyuan_video(dm, context, conds):
    tokens = context.shape[1]
    if getattr(dm, "byt5_in", None) is not None and conds.get("txt_byt5") is not None:
        tokens += conds["txt_byt5"].shape[1]
    if conds.get("clip_fea") is not None:
        tokens += conds["clip_fea"].shape[1]  # CLIP vision tokens join the text (HunyuanVideo 1.5 I2V)
    return tokens


def _hunyuan_video_layout(dm):
    # ComfyUI 0.3.75 put HunyuanVideo's text after the image (flipped double blocks); 0.28 before it.
    return TEXT_LAST if getattr(dm.double_blocks[0], "flipped_img_txt", False) else TEXT_FIRST


def _mochi(dm, context, conds):
    return min(int(conds["num_tokens"]), context.shape[1])  # the text is cropped to its valid tokens


def _cascade(dm, context, conds):
    return conds["clip_text"].shape[1]


def _wan_text_call(module):
    return 1 if hasattr(module, "k_img") else 0  # I2V: the CLIP image tokens first, then the text


# --- adapters: the projections of modules that call attention without transformer_options ---


def _pixart_qkv(module, x, cond, mask=None):
    b, n, _ = x.shape
    q = module.q_linear(x).view(b, n, module.num_heads, module.head_dim)
    k, v = module.kv_linear(cond).view(b, -1, 2, module.num_heads, module.head_dim).unbind(2)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), lambda out: module.proj_drop(module.proj(merge_heads(out)))


def _hunyuan_dit_qkv(module, x, y, freqs_cis_img=None):
    from comfy.ldm.hydit.attn_layers import apply_rotary_emb

    b, n, _ = x.shape
    q = module.q_norm(module.q_proj(x).view(b, n, module.num_heads, module.head_dim))
    k, v = module.kv_proj(y).view(b, y.shape[1], 2, module.num_heads, module.head_dim).unbind(2)
    k = module.k_norm(k)
    if freqs_cis_img is not None:
        q, _ = apply_rotary_emb(q, None, freqs_cis_img)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), lambda out: (module.proj_drop(module.out_proj(merge_heads(out))),)


def _ernie_qkv(module, x, attention_mask=None, image_rotary_emb=None):
    import comfy.quant_ops

    b, n, _ = x.shape
    q = module.norm_q(module.to_q(x).view(b, n, module.heads, module.head_dim))
    k = module.norm_k(module.to_k(x).view(b, n, module.heads, module.head_dim))
    if image_rotary_emb is not None:
        q, k = comfy.quant_ops.ck.apply_rope_split_half(q, k, image_rotary_emb)
    v = module.to_v(x).view(b, n, module.heads, module.head_dim)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), lambda out: module.to_out[0](merge_heads(out))


DOUBLE_SINGLE = (Blocks("double", ("double_blocks",)), Blocks("single", ("single_blocks",)))
_FLUX = Architecture(
    "Flux (dev, schnell, Kontext), Flux.2, LongCat-Image", TEXT_FIRST, DOUBLE_SINGLE, _context, tgate=JOINT_TGATE,
    dense="the text tokens' own attention rows; Kontext reference tokens count as image",
)
_WAN = dict(
    layout=CROSS, blocks=(Blocks("block", ("blocks",), "cross_attn"), Blocks("vace", ("vace_blocks",), "cross_attn")), text_call=_wan_text_call,
    dense="self-attention; in I2V models (and Animate, SCAIL, WanDancer, Camera) the attention to the CLIP image tokens; HuMo's and S2V's audio attention",
)

ARCHITECTURES = {
    "comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel": Architecture(
        "SD1.x, SD2.x, SDXL and their fine-tunes and distillations (Turbo, Lightning, DMD2, Hyper, Pony, Illustrious)", UNET,
        tgate=(("attn2", "attn1"),), dense="the middle block (as in the official code; `include_middle` patches it) and self-attention",
    ),
    "comfy.ldm.flux.model.Flux": _FLUX,
    "comfy.ldm.chroma.model.Chroma": Architecture("Chroma, Chroma Radiance", TEXT_FIRST, DOUBLE_SINGLE, _context, tgate=JOINT_TGATE,
                                                 dense="the text tokens' own attention rows"),
    "comfy.ldm.modules.diffusionmodules.mmdit.MMDiT": Architecture(
        "SD3, SD3.5", TEXT_FIRST, (Blocks("double", ("joint_blocks",)),), _sd3, tgate=JOINT_TGATE,
        dense="the text rows; SD3.5's extra image-only attention; the register tokens count as text",
    ),
    "comfy.ldm.qwen_image.model.QwenImageTransformer2DModel": Architecture(
        "Qwen-Image (and Edit)", TEXT_FIRST, (Blocks("double", ("transformer_blocks",)),), _context, tgate=JOINT_TGATE,
        dense="the text rows",
    ),
    "comfy.ldm.lumina.model.NextDiT": Architecture(
        "Lumina 2, Z-Image (Turbo, Omni, pixel space)", TEXT_FIRST, (Blocks("single", ("layers",)),), _lumina, tgate=JOINT_TGATE,
        dense="the caption and image refiners (text-only and image-only); the caption padding counts as text",
    ),
    "comfy.ldm.hidream.model.HiDreamImageTransformer2DModel": Architecture(
        "HiDream I1 (and E1)", TEXT_LAST,
        (Blocks("double", ("double_stream_blocks",), "block.attn1"), Blocks("single", ("single_stream_blocks",), "block.attn1")),
        _hidream, tgate=JOINT_TGATE, dense="the text rows; T5 and both Llama layers count as text",
    ),
    "comfy.ldm.hunyuan_video.model.HunyuanVideo": Architecture(
        "HunyuanVideo 1.0 and 1.5 (T2V, I2V), HunyuanImage 2.1", _hunyuan_video_layout, DOUBLE_SINGLE, _hunyuan_video,
        tgate=JOINT_TGATE, dense="the text token refiner (text-only); ByT5 and CLIP vision tokens count as text",
    ),
    "comfy.ldm.aura.mmdit.MMDiT": Architecture(
        "AuraFlow", TEXT_FIRST, (Blocks("double", ("double_layers",), "attn"), Blocks("single", ("single_layers",), "attn")),
        _auraflow, tgate=JOINT_TGATE, dense="the text rows; the register tokens count as text",
    ),
    "comfy.ldm.omnigen.omnigen2.OmniGen2Transformer2DModel": Architecture(
        "OmniGen2", TEXT_FIRST, (Blocks("single", ("layers",), "attn"),), _context, tgate=JOINT_TGATE,
        dense="the context, image and reference refiners (each on its own tokens); reference images count as image",
    ),
    "comfy.ldm.boogu.model.BooguTransformer2DModel": Architecture(
        "Boogu", TEXT_FIRST,
        (Blocks("double", ("double_stream_layers",), "img_instruct_attn"), Blocks("single", ("single_stream_layers",), "attn")),
        _context, tgate=JOINT_TGATE, dense="the refiners and the image-only self-attention of the double-stream layers",
    ),
    "comfy.ldm.joyimage.model.JoyImageTransformer3DModel": Architecture(
        "JoyImage", TEXT_LAST, (Blocks("double", ("double_blocks",), "attn"),), _context, tgate=JOINT_TGATE,
        dense="the text rows; reference images count as image",
    ),
    "comfy.ldm.lens.model.LensTransformer2DModel": Architecture(
        "Lens", TEXT_LAST, (Blocks("double", ("transformer_blocks",), "attn"),), _context, tgate=JOINT_TGATE, dense="the text rows",
        patch=(1, 1, 1),  # its latents come packed
    ),
    "comfy.ldm.ideogram4.model.Ideogram4Transformer": Architecture(
        "Ideogram 4", TEXT_FIRST, (Blocks("single", ("layers",), "attention"),), _context, tgate=JOINT_TGATE, dense="the text rows",
        patch=(1, 1, 1),  # its latents come packed
    ),
    "comfy.ldm.genmo.joint_model.asymm_models_joint.AsymmDiTJoint": Architecture(
        "Mochi", TEXT_LAST, (Blocks("double", ("blocks",), "attn"),), _mochi, tgate=JOINT_TGATE,
        dense="the text rows; the pooled text only modulates",
    ),
    "comfy.ldm.cogvideo.model.CogVideoXTransformer3DModel": Architecture(
        "CogVideoX (1.0, 1.5; T2V, I2V)", TEXT_FIRST, (Blocks("single", ("blocks",)),), _context, tgate=JOINT_TGATE, dense="the text rows",
    ),
    "comfy.ldm.krea2.model.SingleStreamDiT": Architecture(
        "Krea 2", TEXT_FIRST, (Blocks("single", ("blocks",), "attn"),), _context, tgate=JOINT_TGATE,
        dense="the text fusion blocks (text-only); reference images count as image", patch=(1, 2, 2),
    ),
    "comfy.ldm.ernie.model.ErnieImageModel": Architecture(
        "Ernie Image", TEXT_LAST, (Blocks("single", ("layers",), "self_attention"),), _context, adapter=_ernie_qkv,
        tgate=JOINT_TGATE, dense="the text rows",
    ),
    "comfy.ldm.cascade.stage_c.StageC": Architecture(
        "Stable Cascade (stage C)", TEXT_AFTER_QUERIES,
        (Blocks("single", ("down_blocks", "up_blocks"), "", "AttnBlock"),), _cascade, text_cond="clip_text",
        tgate="its image tokens attend to themselves and the text in one attention: there is no cross-attention module whose output could be cached",
        dense="the image keys, the pooled-text and image-prompt tokens beside the text", patch=(1, 1, 1),  # each level a coarser grid
    ),
    "comfy.ldm.cascade.stage_b.StageB": Architecture(
        "Stable Cascade (stage B)",
        refused="Stable Cascade stage B sees the prompt only as the pooled CLIP vector (4 tokens made from one pooled embedding), "
        "beside stage C's output: it has no attention from image tokens to the prompt's text tokens. Patch stage C",
        tgate="it has no cross-attention to the text",
    ),
    "comfy.ldm.wan.model.WanModel": Architecture(
        "Wan 2.1 and 2.2 (T2V, I2V, VACE, Camera, HuMo, S2V, Animate, FlowRVS, SCAIL, WanDancer)", **_WAN,
        tgate=(("cross_attn", "self_attn"),),
    ),
    "comfy.ldm.wan.ar_model.CausalWanModel": Architecture(
        "Wan CausalAR", **_WAN,
        tgate="its ar_video sampler runs the blocks without ComfyUI's attention options and caches their keys itself",
    ),
    "comfy.ldm.pixart.pixartms.PixArtMS": Architecture(
        "PixArt Alpha, PixArt Sigma", CROSS, (Blocks("block", ("blocks",), "cross_attn"),), adapter=_pixart_qkv,
        tgate=(("cross_attn", "attn"),), dense="self-attention",
    ),
    "comfy.ldm.hydit.models.HunYuanDiT": Architecture(
        "HunyuanDiT 1.0-1.2", CROSS, (Blocks("block", ("blocks",), "attn2"),), adapter=_hunyuan_dit_qkv,
        tgate=(("attn2", "attn1"),), dense="self-attention",
    ),
    "comfy.ldm.lightricks.model.LTXVModel": Architecture(
        "LTX-Video (0.9, LTX-2)", CROSS, (Blocks("block", ("transformer_blocks",), "attn2"),), tgate=(("attn2", "attn1"),),
        dense="self-attention", patch=(1, 1, 1),
    ),
    "comfy.ldm.lightricks.av_model.LTXAVModel": Architecture(
        "LTX-2 audio-video", CROSS, (Blocks("block", ("transformer_blocks",), "attn2"),),
        tgate=(("attn2", "attn1"), ("audio_attn2", "audio_attn1")), patch=(1, 1, 1),
        dense="self-attention, the audio stream's text attention (audio queries, not image) and the audio-video attention",
    ),
    "comfy.ldm.cosmos.predict2.MiniTrainDIT": Architecture(
        "Cosmos Predict2, Anima", CROSS, (Blocks("block", ("blocks",), "cross_attn"),), tgate=(("cross_attn", "self_attn"),),
        dense="self-attention; Anima's LLM adapter (it runs once per prompt, outside sampling)", patch=(1, 2, 2),
    ),
    "comfy.ldm.kandinsky5.model.Kandinsky5": Architecture(
        "Kandinsky 5 (video, image)", CROSS, (Blocks("block", ("visual_transformer_blocks",), "cross_attention"),),
        tgate=(("cross_attention", "self_attention"),), dense="self-attention and the text encoder blocks",
    ),
}


def find_architecture(diffusion_model):
    """The entry of this diffusion model's class or its nearest known base class, or None."""
    for cls in type(diffusion_model).__mro__:
        found = ARCHITECTURES.get(f"{cls.__module__}.{cls.__name__}")
        if found is not None:
            return found
    return None


def attention_blocks(diffusion_model, architecture):
    """{kind: number of blocks} of the block lists this architecture patches (kinds it lacks count 0)."""
    counts = {}
    for blocks in architecture.blocks:
        counts[blocks.kind] = counts.get(blocks.kind, 0) + len(blocks.found(diffusion_model))
    return counts


def supported(node):
    """What the node patches, for its tooltip and errors: the models of every entry it serves
    (any other node, the preview, serves every model a PLADIS node patches)."""
    if node == APPLY_TGATE:
        return "; ".join(a.models for a in ARCHITECTURES.values() if not isinstance(a.tgate, str))
    pladis = node in (APPLY_PLADIS, FLUX_PATCH)
    return "; ".join(a.models for a in ARCHITECTURES.values() if a.node and (a.node == node or not pladis))


def with_blocks(kind):
    """The models whose blocks of this kind PLADIS Flux Patch selects ("double" or "single"), for its tooltips."""
    return "; ".join(a.models for a in ARCHITECTURES.values() if a.node == FLUX_PATCH and any(b.kind == kind for b in a.blocks))


def token_grid(diffusion_model, latent_shape, architecture):
    """(frames, height, width) of a transformer's image tokens for a latent of this shape (the preview's maps)."""
    patch = architecture.patch or getattr(diffusion_model, "patch_size", 2)
    patch = tuple(patch) if isinstance(patch, (tuple, list)) else (1, patch, patch)
    patch = (1,) * (3 - len(patch)) + patch
    frames = latent_shape[2] if len(latent_shape) == 5 else 1
    height, width = latent_shape[-2:]
    return tuple(-(-size // p) for size, p in zip((frames, height, width), patch))


def model_table():
    """The README's table of every model the pack knows: the node, what is patched, what stays
    dense and why, and TGATE."""
    rows = ["| models | node | PLADIS patches | left dense | Apply TGATE |", "| --- | --- | --- | --- | --- |"]
    for architecture in ARCHITECTURES.values():
        tgate = "no: " + architecture.tgate if isinstance(architecture.tgate, str) else "yes: " + ", ".join(f"`{c}` (and `{s}`)" for c, s in architecture.tgate)
        if architecture.refused:
            rows.append(f"| {architecture.models} | none | nothing: {architecture.refused} | | {tgate} |")
            continue
        rows.append(f"| {architecture.models} | {architecture.node} | {_patched(architecture)} | {architecture.dense} | {tgate} |")
    return "\n".join(rows)


def _patched(architecture):
    if architecture.layout == UNET:
        return "the cross-attention (`attn2`) of the input and output blocks"
    where = ", ".join(f"{b.kind}: `{'`, `'.join(b.lists)}`" + (f" (every `{b.of_class}`)" if b.of_class else "") + (f" `.{b.module}`" if b.module else "")
                      for b in architecture.blocks)
    if architecture.layout == CROSS:
        return f"the text cross-attention in {where}"
    layout = "text first or last by ComfyUI version" if callable(architecture.layout) else architecture.layout
    return f"the image rows x text keys of the joint attention ({layout}) in {where}"
