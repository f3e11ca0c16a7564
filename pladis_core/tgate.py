"""TGATE's schedule (arXiv 2404.02747): which steps compute, cache or reuse attention.

With i the 0-based step of the run's own schedule:

    i <  gate-1   cross-attention computed; self-attention computed (i < warm_up), cached
                  (i == warm_up, or i % sp_interval == 0) or reused from the cache
    i == gate-1   both computed; cross-attention cached as the mean of cond and uncond
    i >  gate-1   cross-attention returns its cache; one CFG branch only; self-attention
                  cached when i % fi_interval == 0, else reused

Steps are positions in the run's own schedule (its sample sigmas): a partial denoise or
KSamplerAdvanced's start_step counts from its first step, and samplers that evaluate several
times per step still count steps, not calls. pladis_comfy/tgate.py applies it in ComfyUI.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class TgateSchedule:
    gate_step: int = 10
    sp_interval: int = 5
    fi_interval: int = 1
    warm_up: int = 2

    def caches_cross_attention(self, i):
        return i == self.gate_step - 1

    def after_gate(self, i):
        return i >= self.gate_step

    def self_attention(self, i):
        """'compute', 'cache' (compute and cache) or 'reuse' at step i."""
        if i < self.gate_step - 1:
            if i < self.warm_up:
                return "compute"
            return "cache" if i == self.warm_up or i % self.sp_interval == 0 else "reuse"
        if i == self.gate_step - 1:
            return "cache"
        return "cache" if i % self.fi_interval == 0 else "reuse"
