"""One log line per sampling run, as ComfyUI's own caching nodes report theirs: what PLADIS did.

The OUTER_SAMPLE wrapper (run_summary) holds the run's record; the evaluation wrappers
(UnetEvaluation, DitEvaluation) tell it after each model evaluation whether PLADIS acted in
it. The line says in how many of the run's steps it did. Nothing here imports ComfyUI.
"""
import contextvars
import logging

from ..pladis_core.steps import step_of

_RUN = contextvars.ContextVar("pladis_run_summary")


class _Run:
    def __init__(self):
        self.sigmas = set()  # the sigma of every evaluation in which PLADIS acted


def run_summary(what):
    """OUTER_SAMPLE wrapper that logs `what` PLADIS is (the node, its settings, its layers) and
    in how many steps of the run it acted, when the run ends."""

    def wrapper(executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
        run = _Run()
        token = _RUN.set(run)
        try:
            return executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        finally:
            _RUN.reset(token)
            steps = {step_of(sigma, sigmas) for sigma in run.sigmas}
            logging.info(f"{what}: acted in {len(steps)} of {len(sigmas) - 1} steps")

    return wrapper


def evaluated(sigmas, acted):
    """After a model evaluation: did PLADIS act in it (one host sync per evaluation, not per call)."""
    run = _RUN.get(None)
    if run is not None and acted and sigmas is not None:
        run.sigmas.add(float(sigmas.max()))
