"""One log line per sampling run: what PLADIS did, and what TGATE did, as ComfyUI's caching nodes report theirs."""
import logging
import re

import pytest

from host_dits import build_dit, sample_dit
from host_models import build_unet, sample

STEPS = 6


def steps_in_range(model, start, end, steps=STEPS):
    """The steps of the host's normal schedule whose sigma lies in the percent range, by the model's own sampling."""
    import comfy.samplers

    sampling = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling, "normal", steps)
    high, low = float(sampling.percent_to_sigma(start)), float(sampling.percent_to_sigma(end))
    return sum(low <= float(sigma) <= high for sigma in sigmas[:-1])


@pytest.mark.parametrize("kind", ["sd15", "flux"])
def test_pladis_says_in_how_many_steps_it_acted(host, caplog, kind):
    model = build_unet(kind) if kind == "sd15" else build_dit(kind)
    node = host.node("ApplyPLADIS" if kind == "sd15" else "PladisFluxPatch")
    patched = node.execute(model, start_percent=0.3, end_percent=0.7).result[0]
    with caplog.at_level(logging.INFO):
        (sample(patched, kind, steps=STEPS, size=64) if kind == "sd15" else sample_dit(patched, kind, steps=STEPS))
    lines = [r.getMessage() for r in caplog.records if ": acted in " in r.getMessage()]
    assert len(lines) == 1  # one line for the run
    expected = steps_in_range(model, 0.3, 0.7)
    assert 0 < expected < STEPS
    where = "15 cross-attention layers" if kind == "sd15" else "2 blocks"
    assert re.search(rf"\(scale 2\.0, alpha 1\.5, steps 30%-70%\) on {where} of \w+: acted in {expected} of {STEPS} steps$", lines[0]), lines[0]


def test_tgate_says_how_many_steps_it_gated_and_how_much_faster_the_run_was(host, caplog):
    model = host.node("ApplyTGATE").execute(build_unet("sd15"), gate_step=2, sp_interval=1).result[0]
    with caplog.at_level(logging.INFO):
        sample(model, "sd15", steps=STEPS, size=64)
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("TGATE: ") and "gated" in r.getMessage()]
    found = re.fullmatch(r"TGATE: 4 of 6 steps gated \(cross-attention from its cache, the uncond branch alone\); "
                         r"a gated step took (\d+\.\d\d)x an ungated one, so the gate made this run (\d+\.\d\d)x faster", line)
    assert found, line
    ratio, speedup = map(float, found.groups())
    # Measured, so not asserted against a bound (a noisy machine); the two figures agree: the run
    # against one where every step takes as long as an ungated one.
    assert speedup == pytest.approx(6 / (2 + 4 * ratio), abs=0.02)
    with caplog.at_level(logging.INFO):
        caplog.clear()
        sample(host.node("ApplyTGATE").execute(build_unet("sd15"), gate_step=STEPS).result[0], "sd15", steps=STEPS, size=64)
    assert any(r.getMessage() == "TGATE: 0 of 6 steps gated (cross-attention from its cache, the uncond branch alone)" for r in caplog.records)
