"""PLADIS benchmark suite: per-call speed, end-to-end sampling at native resolution, a Flux
step, memory of one call, the first-use compile pause, TGATE.

    scripts/bench.sh [--parts layers,joint,e2e,flux,memory,cold,tgate] [--quick]

Every ratio is measured side by side in this one run, on this machine; nothing is a
pass/fail assertion. Results go to bench/results/latest.json and latest.md: a table of the
targets first (met or not), then the tables behind it.
"""
import argparse
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

PACK = Path(__file__).resolve().parent.parent
sys.path.append(str(PACK / "tests"))
RESULTS = PACK / "bench" / "results"
PACKAGE = "pladis_bench_pack"

# (batch, heads, queries, keys, dim_head) of the cross-attention calls, batch 2 = CFG.
LAYER_SHAPES = {
    "SD1.5 512px, 64x64 level": (2, 8, 4096, 77, 40),
    "SD1.5 512px, 32x32 level": (2, 8, 1024, 77, 80),
    "SDXL 1024px, 64x64 level": (2, 10, 4096, 77, 64),
    "SDXL 1024px, 32x32 level": (2, 20, 1024, 77, 64),
    "Flux 1024px, image x text block": (1, 24, 4096, 512, 128),
    "Wan2.1 1.3B 480p, text cross-attention": (1, 12, 32760, 512, 128),
}
# On a CPU, Wan runs 5 of its 21 latent frames so that the naive port fits in time.
CPU_WAN_QUERIES = 7800
ALPHAS = (1.5, 2.0, 1.25, 1.75)
SCALE = 2.0
# End to end: full-width architectures with random weights at their native resolution; on a
# CPU (minutes per SDXL step) fewer steps and runs. (size, steps, interleaved runs) per device.
E2E = {"sd15": {"cpu": (512, 2, 3), "cuda": (512, 20, 5)}, "sdxl": {"cpu": (1024, 1, 3), "cuda": (1024, 20, 5)}}
# TGATE: the papers' setting, 25 steps, at a size a CPU runs in minutes.
TGATE_SIZES = {"sd15": {"cpu": 256, "cuda": 512}, "sdxl": {"cpu": 256, "cuda": 1024}}
# A Flux dev step at full width with one double and one single block (a random-weight 12B model
# would not fit here): image sizes, and (steps, interleaved runs) per device.
FLUX_SIZES = (512, 1024)
FLUX_RUNS = {"cpu": (1, 3), "cuda": (4, 5)}
# The targets: PLADIS time / plain time.
TARGETS = {"compiled": 1.5, "plain": 2.5, "e2e": 1.02, "joint": 1.3, "flux": 1.05}
# Joint attention, Flux: (text tokens, image tokens, heads, dim_head) at 1024px and 512px.
JOINT_SHAPES = {"Flux 1024px": (512, 4096, 24, 128), "Flux 512px": (512, 1024, 24, 128)}
TGATE_STEPS = 25
PAPER_TGATE_SPEEDUP = {"sd15": 1.63, "sdxl": 1.68}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="layers,joint,e2e,flux,memory,cold,tgate")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and shapes, for a smoke run")
    parser.add_argument("--size", type=int, help="image size of the TGATE runs (default: small on a CPU)")
    parser.add_argument("--name", default="latest", help="results go to bench/results/NAME.json and NAME.md")
    parser.add_argument("--pytorch-attention", action="store_true",
                        help="the host's attention is torch's SDPA (ComfyUI's --use-pytorch-cross-attention, its default on CUDA)")
    args = parser.parse_args()

    host = load_host(use_pytorch_cross_attention=True) if args.pytorch_attention else load_host()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = {"machine": machine(), "scale": SCALE}
    parts = args.parts.split(",")
    if host is None:  # the parts that sample with ComfyUI's models need it; the others its attention, or torch's SDPA
        print(f"No ComfyUI imports here: {', '.join(p for p in parts if p in HOST_PARTS)} left out", flush=True)
        parts = [p for p in parts if p not in HOST_PARTS]
    runs = {
        "layers": lambda: bench_layers(device, args.quick),
        "joint": lambda: bench_joint(device, args.quick),
        "memory": lambda: bench_memory(device, args.quick),
        "e2e": lambda: bench_e2e(host, device, args.quick),
        "flux": lambda: bench_flux_step(host, device, args.quick),
        "cold": lambda: bench_cold_start(device),
        "tgate": lambda: bench_tgate(host, device, args.quick, args.size),
    }
    RESULTS.mkdir(exist_ok=True)
    for part in parts:
        report[part] = runs[part]()
        # Written after each part: a run stopped at a time limit keeps what it measured.
        (RESULTS / f"{args.name}.json").write_text(json.dumps(report, indent=2))
        (RESULTS / f"{args.name}.md").write_text(markdown(report))
    print(markdown(report))


HOST_PARTS = ("e2e", "flux", "tgate")


def load_host(**options):
    """The test host (ComfyUI imported, with these command-line options), or None where no
    ComfyUI imports (a bare GPU machine)."""
    from host import Host, comfyui_host

    try:
        return Host(comfyui_host.find_comfyui() or comfyui_host.comfyui_path(), **options)
    except Exception as error:  # noqa: BLE001 - any reason ComfyUI does not import: report it, run the rest
        print(f"ComfyUI did not load: {error}", flush=True)
        return None


def host_attention():
    """The host's dense attention (optimized_attention); without ComfyUI, torch's SDPA with its
    signature, which is what ComfyUI runs on CUDA by default."""
    try:
        from comfy.ldm.modules.attention import optimized_attention
    except ImportError:
        return sdpa_attention
    return optimized_attention


def sdpa_attention(q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False, **kwargs):
    if not skip_reshape:
        q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out if skip_output_reshape else out.transpose(1, 2).flatten(-2)


def machine():
    try:
        import comfyui_version

        comfyui = comfyui_version.__version__
    except ImportError:
        comfyui = None

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "comfyui": comfyui,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "host_attention": host_attention().__name__,
    }


def shapes(device, quick):
    for name, (b, h, n, m, d) in LAYER_SHAPES.items():
        if name.startswith("Wan") and device.type == "cpu":
            n, name = CPU_WAN_QUERIES, name + f" ({CPU_WAN_QUERIES} queries)"
        if quick and not name.startswith("SD1.5"):
            continue
        yield name, (b, h, n, m, d)


def median_times(fns, device, repeats):
    """{name: median seconds of fn()}, the functions run in turn in each repetition, so that
    the machine's drift (it is shared and noisy) hits them alike and their ratios hold."""
    for fn in fns.values():
        fn()  # warm-up: compiles, caches
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def inputs(shape, device, seed=0):
    b, h, n, m, d = shape
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, length, d, generator=g).to(device) for length in (n, m, m))
    return q, k * 2.0, v  # logits of a few units, as in trained models


def with_compile(enabled, fn):
    """fn, to be run with the compiled kernel on or off (PLADIS_COMPILE), then the default again."""

    def run():
        os.environ["PLADIS_COMPILE"] = "1" if enabled else "0"
        try:
            return fn()
        finally:
            del os.environ["PLADIS_COMPILE"]

    return run


def naive_port(q, k, v, alpha):
    """What existing ports do: the entmax package's sort-based map on the full logits."""
    from entmax import entmax15, entmax_bisect, sparsemax

    z = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    sparse = entmax15(z, dim=-1) if alpha == 1.5 else sparsemax(z, dim=-1) if alpha == 2.0 else entmax_bisect(z, alpha, dim=-1)
    dense = torch.softmax(z, -1)
    return (dense + SCALE * (sparse - dense)) @ v


def glue_call(attention, merged, heads, alpha):
    """PLADIS as the glue calls it (unet.py): the host's (batch, tokens, heads * dim) in and out, as the host's call."""
    return attention.merge_heads(attention.pladis_attention(*attention.split_heads(heads, *merged), SCALE, alpha))


def bench_layers(device, quick):
    attention = pack_module("pladis_core.attention")
    optimized_attention = host_attention()
    repeats = 3 if quick else 7
    rows = []
    for name, shape in shapes(device, quick):
        q, k, v = inputs(shape, device)
        heads = shape[1]
        merged = [t.transpose(1, 2).flatten(-2) for t in (q, k, v)]
        for alpha in ALPHAS:
            run = lambda: glue_call(attention, merged, heads, alpha)  # noqa: E731
            found = median_times({
                "host": lambda: optimized_attention(*merged, heads), "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
                "compiled": with_compile(True, run), "plain": with_compile(False, run),
            }, device, repeats)
            host, sdpa, compiled, plain = found["host"], found["sdpa"], found["compiled"], found["plain"]
            naive = median_times({"naive": lambda: naive_port(q, k, v, alpha)}, device, 1 if quick else 2)["naive"]
            rows.append({
                "shape": name, "alpha": alpha, "host_dense_ms": host * 1e3, "sdpa_ms": sdpa * 1e3,
                "pladis_ms": compiled * 1e3, "pladis_plain_ms": plain * 1e3, "naive_ms": naive * 1e3,
                "pladis_vs_host": compiled / host, "pladis_plain_vs_host": plain / host, "naive_vs_pladis": naive / compiled,
            })
            print(f"{name} alpha {alpha}: PLADIS {compiled / host:.2f}x host dense, naive port {naive / compiled:.1f}x slower", flush=True)
    return rows


def joint_inputs(shape, device):
    text, image, heads, d = shape
    q, k, v = inputs((1, heads, text + image, text + image, d), device)
    return q, k, v, text


def joint_call(q, k, v, text, method):
    """One joint-attention call of Flux (text first), heads first: the host's dense attention
    ("dense"), or through PLADIS Flux Patch's own override in a chosen block of a model
    evaluation ("pladis"), the host's attention being one of its exact functions."""
    attention = host_attention()
    if method == "dense":
        return attention(q, k, v, q.shape[1], skip_reshape=True, skip_output_reshape=True)
    dit, settings = pack_module("pladis_comfy.dit"), pack_module("pladis_core.settings").PladisSettings(SCALE, 1.5)
    block, found = ("double", 0), []

    def model_forward(*args, **kwargs):
        options = args[5]
        found.append(options[dit.OVERRIDE_KEY](attention, q, k, v, q.shape[1], skip_reshape=True, skip_output_reshape=True,
                                                transformer_options=options))

    model = torch.nn.Module()
    model.block = torch.nn.Module()
    tag = dit.BlockTag(model_forward, "block", model.block, block, dit.TEXT_FIRST)
    evaluation = dit.DitEvaluation(dit.TEXT_FIRST, {block}, lambda *args: text,
                                   lambda earlier: dit.PladisOverride(settings, {block}, earlier, (getattr(attention, "__wrapped__", attention),)))
    executor = lambda *args, **kwargs: tag(*args, **kwargs)  # noqa: E731 - what the host's WrapperExecutor is to the wrapper
    executor.class_obj = type("Model", (), {"diffusion_model": model})()
    evaluation(executor, None, None, None, torch.zeros(1, text, 1), None, {"sigmas": torch.ones(q.shape[0])})
    return found[0]


def pack_module(name):
    """A module of the pack, e.g. "pladis_comfy.dit", imported under one package name as ComfyUI
    imports the pack, but without the pack's __init__ (the nodes, which need ComfyUI): the glue
    the bench drives imports none. Every part imports the pack this way, so that one copy of its
    modules (and of its compiled kernels) serves the whole run."""
    if PACKAGE not in sys.modules:
        package = types.ModuleType(PACKAGE)
        package.__path__ = [str(PACK)]
        sys.modules[PACKAGE] = package
    return importlib.import_module(f"{PACKAGE}.{name}")


def bench_joint(device, quick):
    """One joint-attention call: the host's dense attention, then with the PLADIS correction added."""
    rows = []
    for name, shape in JOINT_SHAPES.items():
        if quick and name != "Flux 512px":
            continue
        q, k, v, text = joint_inputs(shape, device)
        repeats = 3 if quick else 5
        found = median_times({
            "dense": lambda: joint_call(q, k, v, text, "dense"), "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
            "pladis": lambda: joint_call(q, k, v, text, "pladis"),
        }, device, repeats)
        dense, sdpa, pladis = found["dense"], found["sdpa"], found["pladis"]
        rows.append({"shape": name, "dense_ms": dense * 1e3, "sdpa_ms": sdpa * 1e3, "pladis_ms": pladis * 1e3,
                     "ratio": pladis / dense, "ratio_sdpa": pladis / sdpa})
        print(f"{name} joint attention: with PLADIS {pladis / dense:.2f}x the host's dense call, {pladis / sdpa:.2f}x torch's SDPA", flush=True)
    return rows


PROBE_HOST = """
import sys
if {root!r}:
    sys.path.insert(0, {root!r})
    from comfy.cli_args import args
    args.cpu = {cpu!r}
"""
MEMORY_PROBE = """
import os, sys, torch
sys.path.append({pack!r})
from bench.run import glue_call, host_attention, inputs, joint_call, joint_inputs, pack_module
attention = pack_module("pladis_core.attention")
optimized_attention = host_attention()
device = torch.device({device!r})
if {joint!r}:
    q, k, v, text = joint_inputs({shape!r}, device)
    call = lambda: joint_call(q, k, v, text, "dense" if {method!r} == "dense" else "pladis")
    joint_call(*(t[..., :text + 8, :] for t in (q, k, v)), text, "pladis")  # compile outside the measurement
else:
    q, k, v = inputs({shape!r}, device)
    heads = {shape!r}[1]
    merged = [t.transpose(1, 2).flatten(-2) for t in (q, k, v)]
    call = (lambda: optimized_attention(*merged, heads)) if {method!r} == "dense" else (lambda: glue_call(attention, merged, heads, 1.5))
    glue_call(attention, [merged[0][:, :8]] + merged[1:], heads, 1.5)  # compile outside the measurement
if device.type == "cuda":
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
    out = call(); torch.cuda.synchronize()
    print((torch.cuda.max_memory_allocated() - base) / 2**20)
else:
    status = lambda key: int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith(key)))
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS
    base = status("VmRSS:")
    out = call()
    print((status("VmHWM:") - base) / 1024)
"""


def bench_memory(device, quick):
    """Peak extra memory of one call over its inputs, each in a fresh process: the host's dense
    attention, PLADIS compiled, and PLADIS in plain torch (PLADIS_COMPILE=0)."""
    budget = pack_module("pladis_core.attention").DEFAULT_CHUNK_BYTES
    comfy = sys.modules.get("comfy")
    root = str(Path(comfy.__path__[0]).parent) if comfy else None  # the host's attention, where ComfyUI loaded
    env = dict(os.environ, PYTHONPATH=str(PACK), MALLOC_MMAP_THRESHOLD_="65536")
    calls = [(name, shape, False) for name, shape in shapes(device, quick)]
    calls += [(f"{name} joint attention", shape, True) for name, shape in JOINT_SHAPES.items() if not quick or name == "Flux 512px"]
    rows = []
    for name, shape, joint in calls:
        measured = {}
        for method in ("dense", "pladis", "plain"):
            code = PROBE_HOST.format(root=root, cpu=device.type == "cpu") + MEMORY_PROBE.format(pack=str(PACK), device=device.type, shape=shape, method=method, joint=joint)
            out = subprocess.run([sys.executable, "-c", code], env=dict(env, PLADIS_COMPILE="0" if method == "plain" else "1"),
                                 capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(out.stderr[-2000:])
            measured[method] = float(out.stdout.split()[-1])
        if joint:
            text, image, h, d = shape
            b, n = 1, text + image
        else:
            b, h, n, _, d = shape
        output_mib = b * h * n * d * 4 / 2**20
        rows.append({"shape": name, "dense_mib": measured["dense"], "pladis_mib": measured["pladis"], "plain_mib": measured["plain"],
                     "output_mib": output_mib, "budget_mib": budget / 2**20,
                     "extra_over_dense_mib": max(measured["pladis"], measured["plain"]) - measured["dense"]})
        print(f"{name}: peak dense {measured['dense']:.0f} MiB, PLADIS {measured['pladis']:.0f} MiB, plain torch {measured['plain']:.0f} MiB", flush=True)
    return rows


def bench_e2e(host, device, quick):
    """Sampling time with and without PLADIS (Apply PLADIS's defaults), full-width UNets at their
    native resolution, with CFG; runs interleaved."""
    from host_models import build_unet, sample

    apply = host.node("ApplyPLADIS").execute
    rows = []
    for kind, (size, steps, repeats) in ((kind, sizes[device.type]) for kind, sizes in E2E.items()):
        if quick and kind != "sd15":
            continue
        model = build_unet(kind, full_width=True, device=device)
        variants = {"plain": model, "pladis": apply(model).result[0]}
        run = lambda m: sample(m, kind, steps=steps, size=size, full_width=True)  # noqa: E731
        warm_up = lambda m: sample(m, kind, steps=1, size=256, full_width=True)  # noqa: E731
        runs = 1 if quick else repeats
        rows.append(sampling_row(kind, size, steps, runs, interleaved(variants, run, warm_up, device, runs)))
        _unload()
    return rows


def sampling_row(model, size, steps, runs, timings):
    row = {"model": model, "size": size, "steps": steps, "runs": runs, "plain_s": timings["plain"], "pladis_s": timings["pladis"],
           "ratio": timings["pladis"] / timings["plain"]}
    print(f"{model} {size}px, {steps} steps: with PLADIS {row['ratio']:.3f}x the time (median of {runs})", flush=True)
    return row


# Flux dev's widths (hidden 3072, 24 heads, T5-XXL context, CLIP-L pooled vector), one double and one single block.
FLUX_DEV = "flux dev, one double and one single block"


def _flux_dev_spec():
    from host_dits import DITS

    small = DITS["flux"]
    return dict(small, text_tokens=512, context_dim=4096, pooled_dim=768, text_mask=False,
                unet=dict(small["unet"], vec_in_dim=768, context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0, num_heads=24, axes_dim=[16, 56, 56]))


def bench_flux_step(host, device, quick):
    """Sampling steps of a full-width Flux dev (reduced depth), plain and with PLADIS Flux Patch's defaults."""
    import host_dits

    host_dits.DITS[FLUX_DEV] = _flux_dev_spec()  # this process only: the tests never see it
    model = host_dits.build_dit(FLUX_DEV)
    model.load_device = device
    variants = {"plain": model, "pladis": host.node("PladisFluxPatch").execute(model).result[0]}
    steps, repeats = FLUX_RUNS[device.type]
    rows = []
    for size in FLUX_SIZES:
        if quick and size != 512:
            continue
        run = lambda m: host_dits.sample_dit(m, FLUX_DEV, steps=steps, cfg=1.0, latent_size=size // 8)  # noqa: E731
        runs = 1 if quick else repeats
        rows.append(sampling_row(FLUX_DEV, size, steps, runs, interleaved(variants, run, run, device, runs)))
    _unload()
    return rows


COLD_PROBE = """
import logging, sys, torch
sys.path.insert(0, {pack!r})
from bench.run import pack_module
attention = pack_module("pladis_core.attention")
logging.basicConfig(level=logging.INFO, format="%(message)s")
device = torch.device({device!r})
g = torch.Generator().manual_seed(0)
for alpha in (1.5, 2.0, 1.25, 1.75):
    q, k, v = (torch.randn(2, 8, n, 40, generator=g).to(device) for n in (1024, 77, 77))
    attention.pladis_attention(q, k, v, 2.0, alpha)
"""


def bench_cold_start(device):
    """The pause of the first use of each kernel, in fresh processes, as the log gives it: with
    empty caches (a first start), then again with the caches that run left (a restart). On the
    CPU the row kernel is built once for every alpha; on CUDA torch compiles one per alpha kind."""
    import re
    import tempfile

    pauses = {r"built the CPU kernel in ([\d.]+) s": "CPU row kernel, built",
              r"compiled the fused entmax kernel for \w+ \(alpha ([\d.]+)\) in ([\d.]+) s": "alpha {}, compiled"}
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, PLADIS_CACHE_DIR=cache, PYTHONPATH=str(PACK))
        for start in ("first start", "restart"):
            out = subprocess.run([sys.executable, "-c", COLD_PROBE.format(pack=str(PACK), device=device.type)],
                                 env=env, capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(out.stderr[-2000:])
            found = [(kernel.format(*m.groups()[:-1]), float(m.groups()[-1])) for pattern, kernel in pauses.items()
                     for m in re.finditer(pattern, out.stderr)]
            rows += [{"start": start, "kernel": kernel, "seconds": seconds} for kernel, seconds in found or [("nothing built or compiled", 0.0)]]
            print(f"{start}: " + (", ".join(f"{kernel} {seconds} s" for kernel, seconds in found) or "no pause"), flush=True)
    return rows


def bench_tgate(host, device, quick, size=None):
    """Sampling time with and without TGATE at gate_step 10 of 25 steps (the papers' setting)."""
    from host_models import build_unet, sample

    tgate = host.node("ApplyTGATE").execute
    rows = []
    for kind, sizes in TGATE_SIZES.items():
        if quick and kind != "sd15":
            continue
        model, size = build_unet(kind, full_width=True, device=device), size or sizes[device.type]
        variants = {"plain": model, "tgate": tgate(model, gate_step=10).result[0], "tgate_v1": tgate(model, gate_step=10, sp_interval=1).result[0]}
        run = lambda m: sample(m, kind, steps=TGATE_STEPS, size=size, full_width=True)  # noqa: E731
        timings = interleaved(variants, run, lambda m: sample(m, kind, steps=2, size=size, full_width=True), device, 1)
        rows.append({"model": kind, "size": size, "steps": TGATE_STEPS, "plain_s": timings["plain"], "tgate_s": timings["tgate"],
                     "speedup": timings["plain"] / timings["tgate"], "speedup_v1": timings["plain"] / timings["tgate_v1"],
                     "paper": PAPER_TGATE_SPEEDUP[kind]})
        print(f"{kind} {size}px: TGATE {rows[-1]['speedup']:.2f}x faster (v1 {rows[-1]['speedup_v1']:.2f}x; paper {PAPER_TGATE_SPEEDUP[kind]}x)", flush=True)
        _unload()
    return rows


def _unload():
    import comfy.model_management

    comfy.model_management.unload_all_models()


def interleaved(models, run, warm_up, device, repeats):
    """Median seconds of run(model) for each model, runs interleaved so that drift hits all alike."""
    timings = {label: [] for label in models}
    for m in models.values():  # loading, compiling
        warm_up(m)
    for _ in range(repeats):
        for label, m in models.items():
            sync(device)
            start = time.perf_counter()
            run(m)
            sync(device)
            timings[label].append(time.perf_counter() - start)
    return {label: statistics.median(t) for label, t in timings.items()}


def targets(report):
    """(what, case, measured, target) for every measured ratio that the targets bound."""
    found = []
    for r in report.get("layers", []):
        case = f"{r['shape']}, alpha {r['alpha']}"
        found.append(("cross-attention call, compiled / host dense", case, r["pladis_vs_host"], TARGETS["compiled"]))
        found.append(("cross-attention call, plain torch / host dense", case, r["pladis_plain_vs_host"], TARGETS["plain"]))
    for r in report.get("joint", []):
        found.append(("joint-attention call / host dense", f"{r['shape']}, alpha 1.5", r["ratio"], TARGETS["joint"]))
        found.append(("joint-attention call / torch SDPA (the kernel PLADIS runs)", f"{r['shape']}, alpha 1.5", r["ratio_sdpa"], TARGETS["joint"]))
    for r in report.get("e2e", []):
        found.append(("sampling, PLADIS / plain", f"{r['model']} {r['size']}px, {r['steps']} steps, median of {r['runs']}", r["ratio"], TARGETS["e2e"]))
    for r in report.get("flux", []):
        found.append(("Flux step, PLADIS / plain", f"{r['size']}px, {r['steps']} steps, median of {r['runs']}", r["ratio"], TARGETS["flux"]))
    return found


def markdown(report):
    m = report["machine"]
    lines = [
        f"Measured {m['date']} on {m['gpu'] or m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads), "
        f"torch {m['torch']}, ComfyUI {m['comfyui']}; lambda = {report['scale']}. The host's dense attention is "
        f"`{m['host_attention']}`.",
        "",
    ]
    found = targets(report)
    if found:
        lines += ["| measure | case | ratio | target | met |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {what} | {case} | {ratio:.2f}x | <= {target}x | {'yes' if ratio <= target else 'no'} |" for what, case, ratio, target in found]
        lines += [f"| memory: extra peak of a call over the host's dense call | {r['shape']}, alpha 1.5 | {r['extra_over_dense_mib']:.0f} MiB "
                  f"| <= {r['budget_mib']:.0f} MiB | {'yes' if r['extra_over_dense_mib'] <= r['budget_mib'] else 'no'} |" for r in report.get("memory", [])]
        lines += [f"| first use: compile pause | {r['kernel']}, {r['start']} | {r['seconds']:.1f} s | logged | yes |" for r in report.get("cold", [])]
        lines.append("")
    if "layers" in report:
        lines += [
            "| cross-attention call | alpha | host dense ms | PLADIS ms | PLADIS / host | plain-torch PLADIS / host | naive port / PLADIS |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {r['shape']} | {r['alpha']} | {r['host_dense_ms']:.1f} | {r['pladis_ms']:.1f} | {r['pladis_vs_host']:.2f}x "
            f"| {r['pladis_plain_vs_host']:.2f}x | {r['naive_vs_pladis']:.1f}x |"
            for r in report["layers"]
        ]
        lines.append("")
    if "joint" in report:
        lines += ["| joint-attention call (alpha 1.5) | host dense ms | torch SDPA ms | dense + PLADIS ms | / host dense | / torch SDPA |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['shape']} | {r['dense_ms']:.0f} | {r['sdpa_ms']:.0f} | {r['pladis_ms']:.0f} | {r['ratio']:.2f}x | {r['ratio_sdpa']:.2f}x |"
                  for r in report["joint"]]
        lines.append("")
    for part in ("e2e", "flux"):
        if part in report:
            lines += ["| model (full width, random weights) | size | steps | runs | without s | with PLADIS s | ratio |", "| --- | --- | --- | --- | --- | --- | --- |"]
            lines += [f"| {r['model']} | {r['size']}px | {r['steps']} | {r['runs']} | {r['plain_s']:.2f} | {r['pladis_s']:.2f} | {r['ratio']:.3f} |" for r in report[part]]
            lines.append("")
    if "tgate" in report:
        lines += ["| model (full width, random weights) | size | steps | without s | with TGATE s | speed-up | v1 speed-up | paper |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['model']} | {r['size']}px | {r['steps']} | {r['plain_s']:.1f} | {r['tgate_s']:.1f} | {r['speedup']:.2f}x "
                  f"| {r['speedup_v1']:.2f}x | {r['paper']}x |" for r in report["tgate"]]
        lines.append("")
    if "memory" in report:
        lines += ["| call (alpha 1.5) | peak dense MiB | peak PLADIS MiB | peak plain-torch PLADIS MiB | output MiB | chunk budget MiB |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [
            f"| {r['shape']} | {r['dense_mib']:.0f} | {r['pladis_mib']:.0f} | {r['plain_mib']:.0f} | {r['output_mib']:.0f} | {r['budget_mib']:.0f} |"
            for r in report["memory"]
        ]
        lines.append("")
    if "cold" in report:
        lines += ["| first use | kernel | pause s |", "| --- | --- | --- |"]
        lines += [f"| {r['start']} | {r['kernel']} | {r['seconds']:.1f} |" for r in report["cold"]]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
