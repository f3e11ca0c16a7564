"""Each sample's own text, where the host batches conds whose texts differ in length.

ComfyUI batches conds whose contexts differ in length by repeating the shorter ones to a
common length (CONDCrossAttn.concat: "padding with repeat doesn't change result"). That
holds for softmax over the text alone, not for entmax, nor for joint attention, where the
repeated text keys compete with the image keys. ContextLengths (CALC_COND_BATCH) tells the
patches each cond's own text length; own_text says which text keys of a call are each
sample's own, so that a repeated context counts once.
"""
import functools

import torch

from ..pladis_core.logs import warn_once

# transformer_options key: {(conds list, cond uuid): its text length}, where the lengths of one call differ.
LENGTHS_KEY = "pladis_context_lengths"


class ContextLengths:
    """CALC_COND_BATCH wrapper: each cond's own text length, from the model cond that carries
    the text (`cond`), when the lengths differ."""

    def __init__(self, cond="c_crossattn"):
        self.cond = cond

    def __call__(self, executor, model, conds, x_in, timestep, model_options):
        lengths = {
            (index, c["uuid"]): c["model_conds"][self.cond].cond.shape[1]
            for index, group in enumerate(conds) if group
            for c in group if "uuid" in c and self.cond in c.get("model_conds", {})
        }
        if len(set(lengths.values())) > 1:
            transformer_options = {**model_options.get("transformer_options", {}), LENGTHS_KEY: lengths}
            model_options = {**model_options, "transformer_options": transformer_options}
        return executor(model, conds, x_in, timestep, model_options)


def own_text(options, batch, text, device):
    """(batch, text) bool, True on the text keys that are the sample's own context (once), or
    None where every sample's own text is all `text` keys.

    The rows of a call are its conds in order, each as many rows, and a cond is named by its
    list (options["cond_or_uncond"]) and uuid: the opposite cond the host makes for an area
    cond is a copy that keeps the uuid.
    """
    lengths = options.get(LENGTHS_KEY)
    conds = list(zip(options.get("cond_or_uncond", ()), options.get("uuids", ())))
    if not lengths or not conds or batch % len(conds):
        return None
    own = [lengths.get(cond, text) for cond in conds]
    if all(length == text for length in own):
        return None
    if any(text % length for length in own):
        warn_once("PLADIS: an attention call had text keys that are not the conds' contexts repeated "
                  "(another node added tokens); each sample's entmax there spans every text key")
        return None
    return _own_keys(tuple(own), batch // len(conds), text, device)


@functools.lru_cache(maxsize=32)
def _own_keys(own, repeats, text, device):
    """own_text's mask, made once per layout: a tensor copied from the host every call would wait for the GPU."""
    per_row = torch.tensor(own, device=device).repeat_interleave(repeats)
    return torch.arange(text, device=device) < per_row[:, None]
