"""Registering PLADIS, TGATE and the preview's recorders on a cloned ModelPatcher: which
patches, object patches, wrappers and callbacks go where, by the architecture table."""
import comfy.patcher_extension
import comfy.ldm.modules.attention as host_attention
from comfy.ldm.modules.attention import optimized_attention

from . import tgate
from .conds import ContextLengths
from .dit import BlockTag, CaptureForward, CaptureOverride, DitEvaluation, PladisForward, PladisOverride
from .patching import foreign
from .summary import run_summary
from .unet import UnetEvaluation, copy_on_clone, register_attn2_patches

WRAPPERS, CALLBACKS = comfy.patcher_extension.WrappersMP, comfy.patcher_extension.CallbacksMP
DIT_KEY, UNET_KEY, SUMMARY_KEY = "pladis_dit", "pladis_unet", "pladis_summary"
# The host's exact attention functions (as an attention override receives them), which the pack
# may replace by torch's own kernel in joint calls; not Sage's or other approximate ones.
EXACT_ATTENTION = tuple(
    getattr(f, "__wrapped__", f)
    for f in (getattr(host_attention, name, None) for name in ("attention_basic", "attention_split", "attention_sub_quad", "attention_pytorch"))
    if f is not None
)
TGATE_WRAPPERS = {
    WRAPPERS.OUTER_SAMPLE: tgate.outer_sample_wrapper,
    WRAPPERS.CALC_COND_BATCH: tgate.calc_cond_batch_wrapper,
    WRAPPERS.APPLY_MODEL: tgate.apply_model_wrapper,
}


def patch_unet(model, blocks, settings, what):
    """PLADIS on a UNet's chosen {(stage, number): depth} blocks; returns (layers patched, layers
    an earlier Apply PLADIS patched that are plain again). what: the run summary's words."""
    counts = register_attn2_patches(model, blocks, settings, optimized_attention)
    _set_wrapper(model, WRAPPERS.OUTER_SAMPLE, SUMMARY_KEY, run_summary(what))
    layers = [(stage, number, index) for (stage, number), depth in blocks.items() for index in range(depth)]
    _set_wrapper(model, WRAPPERS.APPLY_MODEL, UNET_KEY, UnetEvaluation(layers, settings, optimized_attention))
    _set_wrapper(model, WRAPPERS.CALC_COND_BATCH, UNET_KEY, ContextLengths())
    model.remove_callbacks_with_key(CALLBACKS.ON_CLONE, UNET_KEY)
    model.add_callback_with_key(CALLBACKS.ON_CLONE, UNET_KEY, copy_on_clone)
    return counts


def remove_unet_hooks(model):
    """Take Apply PLADIS's evaluation hook and summary off a cloned ModelPatcher (the preview measures plain attention)."""
    model.remove_wrappers_with_key(WRAPPERS.APPLY_MODEL, UNET_KEY)
    model.remove_wrappers_with_key(WRAPPERS.OUTER_SAMPLE, SUMMARY_KEY)


def patch_dit(model, architecture, chosen, settings, what):
    """PLADIS on a transformer's chosen (kind, index) blocks (what: the run summary's words).

    An earlier PLADIS on this model is replaced (the later node's settings are the whole
    truth); a TGATE cache wrapper stays outermost; another node's override, installed before
    or after, serves the dense attention (DitEvaluation).
    """
    _set_wrapper(model, WRAPPERS.OUTER_SAMPLE, SUMMARY_KEY, run_summary(what))
    layout = architecture.layout_of(model.get_model_object("diffusion_model"))
    register_dit(
        model, architecture, chosen,
        lambda earlier: PladisOverride(settings, chosen, earlier, EXACT_ATTENTION),
        lambda forward, path, module: PladisForward(forward, path, module, architecture.adapter, layout, settings, optimized_attention, EXACT_ATTENTION),
    )
    _set_wrapper(model, WRAPPERS.CALC_COND_BATCH, DIT_KEY, ContextLengths(architecture.text_cond))


def capture_dit(model, architecture, collector, every):
    """The preview's recorders on every block of a transformer (PLADIS taken off)."""
    model.remove_wrappers_with_key(WRAPPERS.OUTER_SAMPLE, SUMMARY_KEY)
    layout = architecture.layout_of(model.get_model_object("diffusion_model"))
    register_dit(
        model, architecture, every,
        lambda earlier: CaptureOverride(collector, every, earlier),
        lambda forward, path, module: CaptureForward(forward, path, module, architecture.adapter, layout, collector),
    )


def register_dit(model, architecture, chosen, make_override, make_forward):
    """The APPLY_MODEL wrapper, and on each block either a BlockTag (the wrapper then installs
    make_override's attention override in every evaluation) or, where attention gets no
    transformer_options, make_forward's forward on the chosen blocks."""
    diffusion_model = model.get_model_object("diffusion_model")
    layout = architecture.layout_of(diffusion_model)
    adapted = architecture.adapter is not None
    _set_wrapper(model, WRAPPERS.APPLY_MODEL, DIT_KEY, DitEvaluation(layout, chosen, architecture.text_tokens, None if adapted else make_override))
    for blocks in architecture.blocks:
        for index, (path, module) in enumerate(blocks.found(diffusion_model)):
            key = (blocks.kind, index)
            if adapted:
                patch = (lambda forward: make_forward(forward, path, module)) if key in chosen else (lambda forward: forward)
            else:
                call = architecture.text_call(module) if callable(architecture.text_call) else architecture.text_call
                patch = lambda forward: BlockTag(forward, path, module, key, layout, call)  # noqa: E731
            target = f"diffusion_model.{path}.forward"
            forward = _rewrap(model.get_model_object(target), module, patch)
            if forward is None:  # the module's own forward again
                model.object_patches.pop(target, None)
            else:
                model.add_object_patch(target, forward)


def patch_tgate(model, architecture, settings, with_self_attention):
    """TGATE's wrappers, its capture of UNet layers, and cache wrappers on the modules of the
    architecture's (cross, self) pairs. Returns the number of cross-attention modules."""
    model.model_options["transformer_options"][tgate.SETTINGS_KEY] = settings
    for kind, wrapper in TGATE_WRAPPERS.items():
        _set_wrapper(model, kind, tgate.SETTINGS_KEY, wrapper)
    _set_capture_patch(model)
    lists = [name for blocks in architecture.blocks for name in blocks.lists]  # not, say, Anima's text adapter
    modules = tgate.attention_modules(model.get_model_object("diffusion_model"), architecture.tgate, lists)
    for path, module, kind in modules:
        if kind == "cross" or with_self_attention:
            target = f"diffusion_model.{path}.forward"
            previous = model.get_model_object(target)
            if isinstance(previous, tgate.CachedForward):  # applied again: wrap what it wrapped
                previous = previous.forward
            model.add_object_patch(target, tgate.CachedForward(previous, path, module, kind))
    return sum(kind == "cross" for _, _, kind in modules)


def _set_capture_patch(model):
    options = dict(model.model_options["transformer_options"])
    options["patches"] = dict(options.get("patches", {}))
    kept = [p for p in options["patches"].get("attn2_output_patch", []) if not isinstance(p, tgate.CrossAttentionCapture)]
    options["patches"]["attn2_output_patch"] = kept + [tgate.CrossAttentionCapture()]
    model.model_options["transformer_options"] = options


def _set_wrapper(model, kind, key, wrapper):
    model.remove_wrappers_with_key(kind, key)  # applied again: the later node wins
    model.add_wrapper_with_key(kind, key, wrapper)


def _rewrap(forward, module, patch):
    """patch(what forward wraps), with any earlier PLADIS patch taken off, inside a TGATE cache
    wrapper; None stands for the module's own forward (see patching.foreign)."""
    if isinstance(forward, tgate.CachedForward):
        return forward.rewrapped(_rewrap(forward.forward, module, patch))
    if isinstance(forward, (BlockTag, PladisForward, CaptureForward)):
        return patch(forward.forward)
    return patch(foreign(forward, module))
