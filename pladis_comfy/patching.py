"""Object patches on a module's `forward` that find the module in the model that is running.

The host copies object patches as they are into clones, and newer ComfyUI can rebuild the
diffusion model inside a clone (dynamic VRAM's non-dynamic delegate, multi-GPU deep clones,
`model_override`). A patch holding a module, or a bound `forward`, of the instance it was made
for would then run that old instance. Ours hold the module's path instead and look it up in
the diffusion model of the evaluation in progress, which the pack's APPLY_MODEL wrappers name
(`running`). Nothing here imports ComfyUI.
"""
import contextlib
import copy
import contextvars
import inspect
import weakref

_RUNNING = contextvars.ContextVar("pladis_running_model")


@contextlib.contextmanager
def running(diffusion_model):
    """Names the diffusion model of the evaluation in progress (this thread's) to the patches."""
    token = _RUNNING.set(diffusion_model)
    try:
        yield
    finally:
        _RUNNING.reset(token)


def foreign(forward, module):
    """What a patch on module.forward wraps: None for the module's own forward (called on the
    running model, never kept bound), else the other pack's patch that was there."""
    return None if inspect.ismethod(forward) and forward.__self__ is module else forward


class ForwardPatch:
    """Base of the pack's object patches on `<path>.forward`.

    forward: what was on that attribute before (see `foreign`); path: the module's path in
    the diffusion model; module: the module as it is now.
    """

    def __init__(self, forward, path, module):
        self.forward = foreign(forward, module)
        self.path = path
        # Only for a call outside any evaluation of the pack's wrappers, where no running model is named.
        self._made_for = weakref.ref(module)

    def module(self):
        model = _RUNNING.get(None)
        if model is None:
            return self._made_for()
        for name in self.path.split("."):
            model = getattr(model, name)
        return model

    def inner(self, *args, **kwargs):
        """The forward this patch wraps, on the running model."""
        if self.forward is not None:
            return self.forward(*args, **kwargs)
        module = self.module()
        return type(module).forward(module, *args, **kwargs)

    def rewrapped(self, forward):
        """This patch around another forward (a later node's settings, the same place)."""
        clone = copy.copy(self)
        clone.forward = forward
        return clone
