"""What one PLADIS node asked for, shared by every place that applies it."""
from dataclasses import dataclass

from .attention import DEFAULT_CHUNK_BYTES


@dataclass(frozen=True)
class PladisSettings:
    """scale (lambda) and alpha, and the sigmas that bound the active range (sigma_start >= sigma_end)."""

    scale: float
    alpha: float
    sigma_start: float = float("inf")
    sigma_end: float = 0.0
    chunk_bytes: int = DEFAULT_CHUNK_BYTES

    @property
    def is_identity(self):
        return self.scale == 0 or self.alpha == 1.0

    def method(self):
        """The keyword arguments of the attention functions."""
        return {"scale": self.scale, "alpha": self.alpha, "chunk_bytes": self.chunk_bytes}

    def samples_in_range(self, sigmas, batch):
        """None when every sample of the batch is in the step range, else the indices of those
        that are (maybe none). Reads sigmas on the host: once per model evaluation, not per call."""
        if sigmas is None or (self.sigma_start == float("inf") and self.sigma_end <= 0.0):
            return None
        values = sigmas.flatten().tolist()
        if len(values) != batch:
            values = values[:1] * batch
        inside = [sample for sample, sigma in enumerate(values) if self.sigma_end <= sigma <= self.sigma_start]
        return None if len(inside) == batch else inside
