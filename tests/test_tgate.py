"""Apply TGATE in the real ComfyUI, against an independent float64 implementation of its schedule."""
import copy
import logging

import pytest

from host import host_patch_category
import torch

from host_dits import build_dit, dit_conditioning, on_this_host, sample_dit
from host_models import build_unet, conditioning, sample
from reference import pladis_ref_projected

SIZE, STEPS, CFG = 64, 6, 5.0
MODEL_SEED = 7


@pytest.fixture(scope="module")
def nodes(host):
    tgate = lambda model, **kw: host.node("ApplyTGATE").execute(model, **kw).result[0]  # noqa: E731
    pladis = lambda model, **kw: host.node("ApplyPLADIS").execute(model, **kw).result[0]  # noqa: E731
    return tgate, pladis


@pytest.fixture(scope="module")
def models(host):
    return {kind: build_unet(kind, seed=MODEL_SEED) for kind in ("sd15", "sdxl")}


@pytest.fixture(scope="module")
def models64(host):
    """float64 weights: the sampler's result can then be held to the reference at 1e-5."""
    return {kind: build_unet(kind, seed=MODEL_SEED, dtype=torch.float64) for kind in ("sd15", "sdxl")}


def reference_sample(kind, gate_step, sp_interval, fi_interval, warm_up, after_gate, pladis=None, steps=STEPS, seed=0):
    """Euler with CFG in float64 on its own copy of the model, TGATE done by hand on its modules.

    Independent of the pack: cond and uncond run as separate calls, and the attention
    modules' forwards are replaced by closures that follow the schedule of methods.md.
    pladis: (scale, alpha) to compute cross-attention as PLADIS (float64, entmax package).
    """
    import comfy.samplers

    model = build_unet(kind, seed=MODEL_SEED, dtype=torch.float64).model  # the same weights as models64
    model.diffusion_model.dtype = torch.float64  # what BaseModel casts inputs to
    state = {"i": 0, "branch": 0}
    cross, selfs = {}, {}

    def self_action(i):
        if i < gate_step - 1:
            if i < warm_up:
                return "compute"
            return "cache" if i == warm_up or i % sp_interval == 0 else "reuse"
        if i == gate_step - 1:
            return "cache"
        return "cache" if i % fi_interval == 0 else "reuse"

    def cross_forward(module, name):
        original = module.forward

        def forward(x, context=None, value=None, mask=None, transformer_options={}):
            i, branch = state["i"], state["branch"]
            if i >= gate_step:
                parts = list(cross[name].values())
                return sum(parts) / len(parts)
            if pladis and not name.startswith("middle_block"):  # Apply PLADIS's default blocks
                q, k, v = module.to_q(x), module.to_k(context), module.to_v(context)
                out = module.to_out(pladis_ref_projected(q, k, v, module.heads, *pladis))
            else:
                out = original(x, context=context, value=value, mask=mask, transformer_options=transformer_options)
            if i == gate_step - 1:
                cross.setdefault(name, {})[branch] = out
            return out

        return forward

    def self_forward(module, name):
        original = module.forward

        def forward(x, context=None, value=None, mask=None, transformer_options={}):
            action, key = self_action(state["i"]), (name, state["branch"])
            if action == "reuse" and key in selfs:
                return selfs[key]
            out = original(x, context=context, value=value, mask=mask, transformer_options=transformer_options)
            if action == "cache":
                selfs[key] = out
            return out

        return forward

    for name, block in model.diffusion_model.named_modules():
        if getattr(block, "attn2", None) is not None and hasattr(block, "attn1"):
            block.attn2.forward = cross_forward(block.attn2, name)
            if sp_interval > 1 or fi_interval > 1:
                block.attn1.forward = self_forward(block.attn1, name)

    sigmas = comfy.samplers.calculate_sigmas(model.model_sampling, "normal", steps).double()
    noise = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(seed)).double()
    contexts = {}
    for branch, s in ((0, seed + 1), (1, seed + 2)):
        context, extras = conditioning(kind, s)[0]
        kwargs = {}
        if "pooled_output" in extras:
            kwargs["y"] = model.encode_adm(pooled_output=extras["pooled_output"], width=SIZE, height=SIZE).double()
        contexts[branch] = (context.double(), kwargs)

    def denoise(x, sigma, branch):
        state["branch"] = branch
        context, kwargs = contexts[branch]
        return model.apply_model(x, sigma.reshape(1), c_crossattn=context, **kwargs)

    x = noise * torch.sqrt(1.0 + sigmas[0] ** 2)  # ComfyUI's noise scaling at the full schedule
    with torch.inference_mode():
        for i in range(steps):
            state["i"], sigma = i, sigmas[i]
            if i < gate_step:
                cond, uncond = denoise(x, sigma, 0), denoise(x, sigma, 1)
                denoised = uncond + CFG * (cond - uncond)
            else:
                denoised = denoise(x, sigma, 1 if after_gate == "uncond" else 0)
            x = x + (x - denoised) / sigma * (sigmas[i + 1] - sigma)
        return model.process_latent_out(x).float()


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


SETTINGS = {
    "v1": {"gate_step": 3, "sp_interval": 1, "fi_interval": 1, "warm_up": 2},
    "v2": {"gate_step": 4, "sp_interval": 2, "fi_interval": 2, "warm_up": 1},
}


# With PLADIS only on SD1.5: through SDXL's 60 PLADIS layers the rounding of its float32
# maps alone moves the latent by 3e-3 (PLADIS without TGATE, against its float64 reference),
# as much as the schedule does, so the comparison would not tell anything there.
CASES = [
    (kind, version, after_gate, with_pladis)
    for kind in ("sd15", "sdxl") for version in SETTINGS for after_gate in ("uncond", "cond") for with_pladis in (False, True)
    if not (kind == "sdxl" and with_pladis)
]


@pytest.mark.parametrize("kind, version, after_gate, with_pladis", CASES)
def test_final_latent_matches_the_float64_schedule(models64, nodes, kind, version, after_gate, with_pladis):
    tgate, pladis = nodes
    settings = dict(SETTINGS[version], after_gate=after_gate)
    method = (2.0, 1.5) if with_pladis else None
    model = pladis(models64[kind]) if with_pladis else models64[kind]
    ours = sample(tgate(model, **settings), kind, steps=STEPS, cfg=CFG, size=SIZE)
    ref = reference_sample(kind, pladis=method, **settings)
    untouched = reference_sample(kind, gate_step=STEPS, sp_interval=1, fi_interval=1, warm_up=0, after_gate=after_gate, pladis=method)
    error, effect = relative(ours, ref), relative(ref, untouched)
    assert error < (1e-3 if with_pladis else 1e-5)  # PLADIS's maps are float32 by design
    assert effect > 20 * error  # the schedule changed the result, and we followed it


def test_pladis_and_tgate_compose_in_either_order(models, nodes):
    tgate, pladis = nodes
    model = models["sd15"]
    first = sample(tgate(pladis(model), gate_step=3), "sd15", steps=STEPS, size=SIZE)
    second = sample(pladis(tgate(model, gate_step=3)), "sd15", steps=STEPS, size=SIZE)
    assert relative(first, second) < 1e-4


class Recorder:
    """For every model evaluation: its sigma, its batch, and the cross-attention projections it ran."""

    def __init__(self, model):
        import comfy.patcher_extension

        self.calls, self.projections = [], 0
        self.model = model.clone()
        self.model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test", self.apply_model)
        self.handles = [
            block.attn2.to_q.register_forward_hook(self.projected)
            for block in model.model.diffusion_model.modules()
            if getattr(block, "attn2", None) is not None and hasattr(block, "attn1")
        ]

    def apply_model(self, executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        self.schedule = transformer_options["sample_sigmas"]  # the sigmas this sampler runs
        before = self.projections
        out = executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        self.calls.append((float(t.max()), x.shape[0], self.projections - before))
        return out

    def projected(self, *args):
        self.projections += 1

    def remove(self):
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpm_2", "dpmpp_sde", "dpmpp_2m_sde"])
def test_after_the_gate_nothing_of_cross_attention_runs_and_one_branch(models, nodes, sampler):
    """Steps are counted on the schedule: an evaluation at sigma in (s[j+1], s[j]] is step j."""
    tgate, pladis = nodes
    model, gate = models["sd15"], 3
    recorder = Recorder(tgate(pladis(model), gate_step=gate, sp_interval=1))
    try:
        sample(recorder.model, "sd15", steps=STEPS, size=SIZE, sampler=sampler)
    finally:
        recorder.remove()
    for sigma, batch, projections in recorder.calls:
        before_gate = sigma > float(recorder.schedule[gate]) * (1 + 1e-5)
        assert (batch, projections) == ((2, 16) if before_gate else (1, 0)), (sampler, sigma)
    assert len(recorder.calls) > STEPS or sampler in ("euler", "dpmpp_2m_sde")
    assert any(batch == 1 for _, batch, _ in recorder.calls) and any(batch == 2 for _, batch, _ in recorder.calls)


def test_runs_start_clean(models, nodes):
    """Another prompt, a hires-fix pass at another size, another batch size, then the first again."""
    tgate, _ = nodes
    model = models["sd15"]
    patched = tgate(model, gate_step=2, sp_interval=2, warm_up=0)
    fresh = lambda **kw: sample(tgate(model, gate_step=2, sp_interval=2, warm_up=0), "sd15", steps=5, **kw)  # noqa: E731
    first = sample(patched, "sd15", steps=5, size=SIZE)
    assert torch.equal(sample(patched, "sd15", steps=5, size=SIZE, seed=3), fresh(size=SIZE, seed=3))
    assert torch.equal(sample(patched, "sd15", steps=5, size=96, denoise=0.5), fresh(size=96, denoise=0.5))
    assert torch.equal(sample(patched, "sd15", steps=5, size=SIZE, batch=2), fresh(size=SIZE, batch=2))
    assert torch.equal(sample(patched, "sd15", steps=5, size=SIZE), first)


def test_an_interrupted_run_leaves_nothing_behind(models, nodes):
    tgate, _ = nodes
    model = models["sd15"]
    patched = tgate(model, gate_step=2, sp_interval=2, warm_up=0)

    def interrupt(step, *args):
        if step == 3:
            raise KeyboardInterrupt("stopped by the user")

    options = patched.model_options["transformer_options"]
    settings = options["pladis_tgate"]
    with pytest.raises(KeyboardInterrupt):
        sample(patched, "sd15", steps=5, size=SIZE, callback=interrupt)
    assert patched.model_options["transformer_options"] is options and options["pladis_tgate"] is settings
    assert "pladis_tgate_run" not in options  # the run lived in the run's own options only
    assert torch.equal(sample(patched, "sd15", steps=5, size=SIZE), sample(tgate(model, gate_step=2, sp_interval=2, warm_up=0), "sd15", steps=5, size=SIZE))


def test_ksampler_advanced_counts_from_its_first_step(models, nodes):
    """start_step 2 of 8: the gate at 2 falls after this run's second step, sigma s[4] of the full schedule."""
    tgate, _ = nodes
    recorder = Recorder(tgate(models["sd15"], gate_step=2, sp_interval=1))
    try:
        sample(recorder.model, "sd15", steps=8, size=SIZE, start_step=2, last_step=7)
    finally:
        recorder.remove()
    assert [batch for _, batch, _ in recorder.calls] == [2, 2, 1, 1, 1]


def test_gate_at_or_beyond_the_steps_changes_nothing(models, nodes, caplog):
    tgate, _ = nodes
    model = models["sd15"]
    with caplog.at_level(logging.INFO):
        result = sample(tgate(model, gate_step=STEPS, sp_interval=1), "sd15", steps=STEPS, size=SIZE)
    assert torch.equal(result, sample(model, "sd15", steps=STEPS, size=SIZE))
    assert "cross-attention is never frozen and CFG never dropped" in caplog.text


def test_without_cfg_the_cache_is_the_single_branch(models, nodes):
    """cfg 1: ComfyUI runs the cond branch alone from the start; TGATE then only freezes it."""
    tgate, _ = nodes
    model = models["sd15"]
    recorder = Recorder(tgate(model, gate_step=2, sp_interval=1))
    try:
        sample(recorder.model, "sd15", steps=4, size=SIZE, cfg=1.0)
    finally:
        recorder.remove()
    assert [(batch, projections) for _, batch, projections in recorder.calls] == [(1, 16), (1, 16), (1, 0), (1, 0)]


def test_applying_twice_the_later_settings_win(models, nodes):
    tgate, _ = nodes
    model = models["sd15"]
    twice = tgate(tgate(model, gate_step=2), gate_step=4, sp_interval=1)
    assert len(twice.model_options["transformer_options"]["patches"]["attn2_output_patch"]) == 1
    assert torch.equal(sample(twice, "sd15", steps=STEPS, size=SIZE), sample(tgate(model, gate_step=4, sp_interval=1), "sd15", steps=STEPS, size=SIZE))


def test_an_evaluation_outside_a_sampling_run_is_plain_and_stores_nothing(models, nodes):
    """After a run the model stays patched; another node that then calls it (with or without the
    patcher's wrappers) gets the plain model's output, and the next run is as if none happened."""
    tgate, _ = nodes
    model = models["sd15"]
    patched = tgate(model, gate_step=2, sp_interval=2, warm_up=0)
    settings = patched.model_options["transformer_options"]["pladis_tgate"]
    first = sample(patched, "sd15", steps=4, size=SIZE)
    attn2 = patched.model.diffusion_model.output_blocks[3][1].transformer_blocks[0].attn2
    assert type(attn2.__dict__.get("forward")).__name__ == "CachedForward"  # still patched: the case at hand
    x = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([5.0])
    context = conditioning("sd15", 9)[0][0]
    with_wrappers = {**patched.model_options["transformer_options"], "wrappers": patched.wrappers}
    with torch.inference_mode():
        outs = [patched.model.apply_model(x, t, c_crossattn=context, transformer_options=options) for options in ({}, with_wrappers)]
        patched.unpatch_model()
        plain = model.model.apply_model(x, t, c_crossattn=context)
    assert all(torch.equal(out, plain) for out in outs)
    assert patched.model_options["transformer_options"]["pladis_tgate"] is settings and "pladis_tgate_run" not in patched.model_options["transformer_options"]
    assert torch.equal(sample(patched, "sd15", steps=4, size=SIZE), first)


def test_the_settings_shared_by_clones_cannot_be_written(models, nodes):
    """ComfyUI 0.28's clones share the objects in model_options: the node's settings are frozen."""
    import dataclasses

    settings = nodes[0](models["sd15"]).clone().model_options["transformer_options"]["pladis_tgate"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.after_gate = "cond"


def test_incoming_model_is_untouched(models, nodes):
    tgate, _ = nodes
    model = models["sd15"]
    before_options, before_objects = copy.deepcopy(model.model_options), dict(model.object_patches)
    tgate(model)
    assert model.model_options == before_options and model.object_patches == before_objects


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"gate_step": 0}, r"gate_step must be a whole number from 1"),
        ({"sp_interval": 0}, r"sp_interval must be a whole number from 1"),
        ({"fi_interval": 2.5}, r"fi_interval must be a whole number from 1"),
        ({"warm_up": -1}, r"warm_up must be a whole number from 0"),
        ({"after_gate": "both"}, r"after_gate must be 'uncond' or 'cond'"),
    ],
)
def test_bad_inputs_are_refused(models, nodes, settings, message):
    with pytest.raises(ValueError, match=message):
        nodes[0](models["sd15"], **settings)


def test_joint_attention_models_are_refused_with_the_reason(nodes):
    message = r"Apply TGATE works on SD1\.x.*; this model is Flux\. TGATE does not apply to Flux .*: text and image share one joint attention"
    with pytest.raises(ValueError, match=message):
        nodes[0](build_dit("flux"))


def test_wan_causal_ar_is_refused_with_the_reason(nodes):
    """Its ar_video sampler runs the blocks without transformer_options and keeps its own key cache."""
    if on_this_host("wan_causal"):
        with pytest.raises(ValueError, match=r"this model is WAN21_CausalAR\. TGATE does not apply to Wan CausalAR: its ar_video sampler"):
            nodes[0](build_dit("wan_causal"))


def test_schema(host):
    schema = host.node("ApplyTGATE").define_schema()
    assert (schema.display_name, schema.category) == ("Apply TGATE", host_patch_category())
    inputs = {i.id: i for i in schema.inputs}
    assert list(inputs) == ["model", "gate_step", "sp_interval", "fi_interval", "warm_up", "after_gate"]
    assert all(i.tooltip for i in schema.inputs)
    assert [(inputs[k].default, inputs[k].min) for k in ("gate_step", "sp_interval", "fi_interval", "warm_up")] == [(10, 1), (5, 1), (1, 1), (2, 0)]
    assert inputs["after_gate"].options == ["uncond", "cond"] and inputs["after_gate"].default == "uncond"


# The text cross-attention module of each transformer with one, by its attribute in a block.
CROSS_ATTENTION = {"pixart": "cross_attn", "wan": "cross_attn", "wan_vace": "cross_attn", "hunyuan_dit": "attn2", "ltxv": "attn2", "ltxav": "attn2",
                   "cosmos_predict2": "cross_attn", "anima": "cross_attn", "kandinsky5": "cross_attention"}
# Where their blocks are (Anima's text adapter has cross-attention too, run once per prompt outside sampling).
BLOCK_LISTS = {"wan_vace": ("blocks", "vace_blocks"), "ltxv": ("transformer_blocks",), "ltxav": ("transformer_blocks",),
               "kandinsky5": ("visual_transformer_blocks",)}


@pytest.mark.parametrize("kind", [kind for kind in CROSS_ATTENTION if on_this_host(kind)])
def test_cross_attention_transformers_freeze_to_the_mean_of_the_gate_step(host, nodes, kind):
    """Their cross-attention modules (PixArt's and HunyuanDiT's take no transformer_options; HunyuanDiT's
    return their output in a 1-tuple; Wan VACE has cross-attention in its control blocks too)."""
    tgate, _ = nodes
    model = build_dit(kind, seed=2)
    diffusion_model = model.model.diffusion_model
    attribute = CROSS_ATTENTION[kind]
    outputs, projections = [], [0]
    lists = [getattr(diffusion_model, name) for name in BLOCK_LISTS.get(kind, ("blocks",))]
    modules = [getattr(block, attribute) for blocks in lists for block in blocks.modules() if getattr(block, attribute, None) is not None]
    first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731
    handles = [module.register_forward_hook(lambda m, a, out, n=n: outputs.append((n, first(out).clone()))) for n, module in enumerate(modules)]
    first_linear = lambda module: next(m for m in module.modules() if isinstance(m, torch.nn.Linear))  # noqa: E731
    handles += [first_linear(module).register_forward_hook(lambda *a: projections.__setitem__(0, projections[0] + 1)) for module in modules]
    try:
        result = sample_dit(tgate(model, gate_step=2, sp_interval=1), kind, steps=4, cfg=5.0)
    finally:
        for handle in handles:
            handle.remove()
    calls = len(outputs) // 4  # module runs per step
    assert calls > 0 and len(outputs) == 4 * calls and projections[0] == 2 * calls  # computed in steps 0 and 1 only
    at_gate = outputs[calls : 2 * calls]  # step 1: cond and uncond batched
    for i, (n, out) in enumerate(outputs[2 * calls :]):
        gate_n, gate_out = at_gate[i % calls]
        assert out.shape[0] == 1 and n == gate_n  # one branch after the gate, the same module in the same order
        assert torch.allclose(out[0], gate_out.mean(0), atol=1e-6)
    assert torch.equal(sample_dit(tgate(model, gate_step=4, sp_interval=1), kind, steps=4, cfg=5.0), sample_dit(model, kind, steps=4, cfg=5.0))
    assert not torch.allclose(result, sample_dit(model, kind, steps=4, cfg=5.0))


def test_each_run_of_a_module_in_an_evaluation_keeps_its_own_cache(host, nodes):
    """Wan VACE runs its control blocks once per reference video in each evaluation: after the gate
    each run gets back its own cross-attention, not the other reference's."""
    tgate, _ = nodes
    model = build_dit("wan_vace", seed=2)
    vace = model.model.diffusion_model.vace_blocks[0].cross_attn
    outputs = []
    handle = vace.register_forward_hook(lambda m, a, out: outputs.append(out.clone()))
    gen = torch.Generator().manual_seed(3)
    references = {"vace_frames": [torch.randn(1, 32, 2, 8, 8, generator=gen) for _ in range(2)],
                  "vace_mask": [torch.ones(1, 64, 2, 8, 8)] * 2, "vace_strength": [1.0, 0.5]}
    # As WanVaceToVideo sets them: on both prompts, which the host then batches.
    prompt, negative = ([[context, {**extras, **references}]] for (context, extras), in (dit_conditioning("wan_vace", s) for s in (1, 2)))
    try:
        sample_dit(tgate(model, gate_step=2, sp_interval=1), "wan_vace", steps=4, cfg=5.0, positive=prompt, negative=negative)
    finally:
        handle.remove()
    steps = [outputs[2 * i : 2 * i + 2] for i in range(4)]  # two references a step
    assert len(outputs) == 8
    first_at_gate, second_at_gate = (out.mean(0) for out in steps[1])
    assert not torch.allclose(first_at_gate, second_at_gate)
    for first, second in steps[2:]:
        assert torch.allclose(first[0], first_at_gate, atol=1e-6) and torch.allclose(second[0], second_at_gate, atol=1e-6)


def test_tiled_sampling_keeps_one_cache_per_tile(models, nodes):
    """A model wrapper that evaluates the latent as two tiles per step (as tiled-diffusion
    packs do): after the gate each tile gets back its own cross-attention, not the other's."""
    tgate, _ = nodes
    model = tgate(models["sd15"], gate_step=2, sp_interval=1)

    def two_tiles(apply_model, args):
        x, rest = args["input"], {"c": args["c"]}
        left, right = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
        return torch.cat([apply_model(left, args["timestep"], **rest["c"]), apply_model(right, args["timestep"], **rest["c"])], -1)

    model.set_model_unet_function_wrapper(two_tiles)
    outputs = []
    attn2 = model.model.diffusion_model.output_blocks[3][1].transformer_blocks[0].attn2
    handle = attn2.register_forward_hook(lambda m, a, out: outputs.append(out.clone()))
    try:
        sample(model, "sd15", steps=4, size=SIZE)
    finally:
        handle.remove()
    # Steps 0 and 1 compute (two tiles, cond and uncond batched); steps 2 and 3 return caches.
    gate_left, gate_right = outputs[2], outputs[3]
    assert not torch.allclose(gate_left.mean(0), gate_right.mean(0))
    for step in (2, 3):
        left, right = outputs[2 * step], outputs[2 * step + 1]
        assert torch.allclose(left[0], gate_left.mean(0), atol=1e-6) and torch.allclose(right[0], gate_right.mean(0), atol=1e-6)


def test_the_caches_of_a_run_are_freed_when_it_ends(models, nodes):
    import comfy.patcher_extension

    tgate, _ = nodes
    model = tgate(models["sd15"], gate_step=2, sp_interval=2, warm_up=0)
    seen = []

    def spy(executor, model_, conds, x_in, timestep, model_options):
        seen.append(model_options["transformer_options"]["pladis_tgate_run"])
        return executor(model_, conds, x_in, timestep, model_options)

    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, "spy", spy)
    sample(model, "sd15", steps=4, size=SIZE)
    runs = {id(run): run for run in seen}
    assert len(runs) == 1  # one run state for the whole run
    (run,) = runs.values()
    assert run.cross == {} and run.self_attention == {}
