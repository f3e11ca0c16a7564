"""The step of a model evaluation in its sampling run's schedule."""


def step_of(sigma, sample_sigmas):
    """The 0-based step of an evaluation at sigma: the schedule interval (s[j+1], s[j]] it
    lies in. Extra evaluations of multi-step samplers (dpm_2, SDE) fall inside their
    step's interval; heun's corrector at s[j+1] opens step j+1."""
    if sample_sigmas is None:
        return 0
    reached = (sample_sigmas[:-1] >= sigma * (1 - 1e-5)).sum().item()
    return max(0, int(reached) - 1)
