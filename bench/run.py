"""PLADIS benchmark suite: per-layer speed, end-to-end sampling, memory of one call.

    scripts/bench.sh [--parts layers,e2e,memory] [--quick]

Every ratio is measured side by side in this one run, on this machine; nothing is a
pass/fail assertion. Results go to bench/results/latest.json and latest.md (the table
that the README carries).
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

PACK = Path(__file__).resolve().parent.parent
sys.path.append(str(PACK / "tests"))
sys.path.append(str(PACK))
RESULTS = PACK / "bench" / "results"

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
ALPHAS = (1.5, 2.0, 1.25)
SCALE = 2.0
# End to end: full-width architectures with random weights, small on a CPU.
E2E = {"sd15": {"cpu": 256, "cuda": 512}, "sdxl": {"cpu": 256, "cuda": 1024}}
# Joint attention, Flux: (text tokens, image tokens, heads, dim_head) at 1024px and 512px.
JOINT_SHAPES = {"Flux 1024px": (512, 4096, 24, 128), "Flux 512px": (512, 1024, 24, 128)}
TGATE_STEPS = 25
PAPER_TGATE_SPEEDUP = {"sd15": 1.63, "sdxl": 1.68}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="layers,joint,e2e,memory,tgate")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and shapes, for a smoke run")
    parser.add_argument("--steps", type=int, default=4, help="sampler steps end to end")
    parser.add_argument("--size", type=int, help="image size of the end-to-end and TGATE runs (default: small on a CPU)")
    args = parser.parse_args()

    from host import Host, comfyui_host

    host = Host(comfyui_host.find_comfyui() or comfyui_host.comfyui_path())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = {"machine": machine(host), "scale": SCALE}
    parts = args.parts.split(",")
    if "layers" in parts:
        report["layers"] = bench_layers(device, args.quick)
    if "joint" in parts:
        report["joint"] = bench_joint(device, args.quick)
    if "memory" in parts:
        report["memory"] = bench_memory(device, args.quick)
    if "e2e" in parts:
        report["e2e"] = bench_e2e(host, device, args.steps, args.quick, args.size)
    if "tgate" in parts:
        report["tgate"] = bench_tgate(host, device, args.quick, args.size)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(report, indent=2))
    table = markdown(report)
    (RESULTS / "latest.md").write_text(table)
    print(table)


def machine(host):
    import comfyui_version

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "comfyui": comfyui_version.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }


def shapes(device, quick):
    for name, (b, h, n, m, d) in LAYER_SHAPES.items():
        if name.startswith("Wan") and device.type == "cpu":
            n, name = CPU_WAN_QUERIES, name + f" ({CPU_WAN_QUERIES} queries)"
        if quick and not name.startswith("SD1.5"):
            continue
        yield name, (b, h, n, m, d)


def median_time(fn, device, repeats):
    fn()  # warm-up: compiles, caches
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def inputs(shape, device, seed=0):
    b, h, n, m, d = shape
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, length, d, generator=g).to(device) for length in (n, m, m))
    return q, k * 2.0, v  # logits of a few units, as in trained models


def with_compile(enabled, fn):
    """fn() with the compiled kernel on or off (PLADIS_COMPILE), then the default again."""
    os.environ["PLADIS_COMPILE"] = "1" if enabled else "0"
    try:
        return fn()
    finally:
        del os.environ["PLADIS_COMPILE"]


def naive_port(q, k, v, alpha):
    """What existing ports do: the entmax package's sort-based map on the full logits."""
    from entmax import entmax15, entmax_bisect, sparsemax

    z = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    sparse = entmax15(z, dim=-1) if alpha == 1.5 else sparsemax(z, dim=-1) if alpha == 2.0 else entmax_bisect(z, alpha, dim=-1)
    dense = torch.softmax(z, -1)
    return (dense + SCALE * (sparse - dense)) @ v


def bench_layers(device, quick):
    from comfy.ldm.modules.attention import optimized_attention

    from pladis_core.attention import pladis_attention

    repeats = 3 if quick else 7
    rows = []
    for name, shape in shapes(device, quick):
        q, k, v = inputs(shape, device)
        heads = shape[1]
        merged = [t.transpose(1, 2).flatten(-2) for t in (q, k, v)]
        host = median_time(lambda: optimized_attention(*merged, heads), device, repeats)
        sdpa = median_time(lambda: F.scaled_dot_product_attention(q, k, v), device, repeats)
        for alpha in ALPHAS:
            run = lambda: pladis_attention(q, k, v, SCALE, alpha)  # noqa: E731
            compiled = with_compile(True, lambda: median_time(run, device, repeats))
            plain = with_compile(False, lambda: median_time(run, device, repeats))
            naive = median_time(lambda: naive_port(q, k, v, alpha), device, 1 if quick else 2)
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
    """What PLADIS Flux Patch does in one joint-attention call: the host's dense attention of
    every row, plus the correction of the image rows ("pladis"); or the dense part alone."""
    from comfy.ldm.modules.attention import optimized_attention

    from pladis_core.attention import joint_residual

    out = optimized_attention(q, k, v, q.shape[1], skip_reshape=True, skip_output_reshape=True)
    if method == "pladis":
        out[..., text:, :] += joint_residual(q[..., text:, :], k, v, slice(0, text), SCALE, 1.5).to(out.dtype)
    return out


def bench_joint(device, quick):
    """One joint-attention call: the host's dense attention, then with the PLADIS correction added."""
    rows = []
    for name, shape in JOINT_SHAPES.items():
        if quick and name != "Flux 512px":
            continue
        q, k, v, text = joint_inputs(shape, device)
        dense = median_time(lambda: joint_call(q, k, v, text, "dense"), device, 3 if quick else 5)
        pladis = median_time(lambda: joint_call(q, k, v, text, "pladis"), device, 3 if quick else 5)
        rows.append({"shape": name, "dense_ms": dense * 1e3, "pladis_ms": pladis * 1e3, "ratio": pladis / dense})
        print(f"{name} joint attention: with PLADIS {pladis / dense:.2f}x the host's dense call", flush=True)
    return rows


MEMORY_PROBE = """
import os, sys, torch
sys.path.append({pack!r})
from bench.run import inputs, joint_call, joint_inputs
from pladis_core.attention import pladis_attention
from comfy.ldm.modules.attention import optimized_attention
device = torch.device({device!r})
if {joint!r}:
    q, k, v, text = joint_inputs({shape!r}, device)
    call = lambda: joint_call(q, k, v, text, {method!r})
    joint_call(q[..., :text + 8, :], k, v, text, "pladis")  # compile outside the measurement
else:
    q, k, v = inputs({shape!r}, device)
    heads = {shape!r}[1]
    merged = [t.transpose(1, 2).flatten(-2) for t in (q, k, v)]
    call = (lambda: optimized_attention(*merged, heads)) if {method!r} == "dense" else (lambda: pladis_attention(q, k, v, 2.0, 1.5))
    pladis_attention(q[..., :8, :], k, v, 2.0, 1.5)  # compile outside the measurement
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
    """Peak extra memory of one call over its inputs, each in a fresh process."""
    from host import comfyui_host

    root = str(comfyui_host.find_comfyui() or comfyui_host.comfyui_path())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, str(PACK)]), MALLOC_MMAP_THRESHOLD_="65536")
    calls = [(name, shape, False) for name, shape in shapes(device, quick)]
    calls += [(f"{name} joint attention", shape, True) for name, shape in JOINT_SHAPES.items() if not quick or name == "Flux 512px"]
    rows = []
    for name, shape, joint in calls:
        measured = {}
        for method in ("dense", "pladis"):
            code = "from comfy.cli_args import args; args.cpu = {cpu}\n".format(cpu=device.type == "cpu")
            code += MEMORY_PROBE.format(pack=str(PACK), device=device.type, shape=shape, method=method, joint=joint)
            out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=root)
            if out.returncode:
                raise RuntimeError(out.stderr[-2000:])
            measured[method] = float(out.stdout.split()[-1])
        if joint:
            text, image, h, d = shape
            b, n = 1, text + image
        else:
            b, h, n, _, d = shape
        output_mib = b * h * n * d * 4 / 2**20
        rows.append({"shape": name, "dense_mib": measured["dense"], "pladis_mib": measured["pladis"],
                     "output_mib": output_mib, "extra_over_dense_mib": measured["pladis"] - measured["dense"]})
        print(f"{name}: peak dense {measured['dense']:.0f} MiB, PLADIS {measured['pladis']:.0f} MiB", flush=True)
    return rows


def bench_e2e(host, device, steps, quick, size=None):
    """Sampling time with and without PLADIS, full-width architectures."""
    apply = host.node("ApplyPLADIS").execute
    rows = []
    for kind, size, model in full_width_models(device, quick, size):
        timings = interleaved({"plain": model, "pladis": apply(model).result[0]}, kind, size, steps, device, 1 if quick else 3)
        rows.append({"model": kind, "size": size, "steps": steps, "plain_s": timings["plain"], "pladis_s": timings["pladis"],
                     "ratio": timings["pladis"] / timings["plain"]})
        print(f"{kind} {size}px {steps} steps: ratio {rows[-1]['ratio']:.3f}", flush=True)
    return rows


def bench_tgate(host, device, quick, size=None):
    """Sampling time with and without TGATE at gate_step 10 of 25 steps (the papers' setting)."""
    tgate = host.node("ApplyTGATE").execute
    rows = []
    for kind, size, model in full_width_models(device, quick, size):
        variants = {"plain": model, "tgate": tgate(model, gate_step=10).result[0], "tgate_v1": tgate(model, gate_step=10, sp_interval=1).result[0]}
        timings = interleaved(variants, kind, size, TGATE_STEPS, device, 1)
        rows.append({"model": kind, "size": size, "steps": TGATE_STEPS, "plain_s": timings["plain"], "tgate_s": timings["tgate"],
                     "speedup": timings["plain"] / timings["tgate"], "speedup_v1": timings["plain"] / timings["tgate_v1"],
                     "paper": PAPER_TGATE_SPEEDUP[kind]})
        print(f"{kind} {size}px: TGATE {rows[-1]['speedup']:.2f}x faster (v1 {rows[-1]['speedup_v1']:.2f}x; paper {PAPER_TGATE_SPEEDUP[kind]}x)", flush=True)
    return rows


def full_width_models(device, quick, size=None):
    import comfy.model_management

    from host_models import build_unet

    for kind, sizes in E2E.items():
        if quick and kind != "sd15":
            continue
        yield kind, size or sizes[device.type], build_unet(kind, full_width=True, device=device)
        comfy.model_management.unload_all_models()


def interleaved(models, kind, size, steps, device, repeats):
    """Median seconds per sampling run of each model, runs interleaved so drift hits all alike."""
    from host_models import sample

    timings = {label: [] for label in models}
    for m in models.values():  # warm-up: loading, compiling
        sample(m, kind, steps=2, size=size, full_width=True)
    for _ in range(repeats):
        for label, m in models.items():
            sync(device)
            start = time.perf_counter()
            sample(m, kind, steps=steps, size=size, full_width=True)
            sync(device)
            timings[label].append(time.perf_counter() - start)
    return {label: statistics.median(t) for label, t in timings.items()}


def markdown(report):
    m = report["machine"]
    lines = [
        f"Measured {m['date']} on {m['gpu'] or m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads), "
        f"torch {m['torch']}, ComfyUI {m['comfyui']}; lambda = {report['scale']}.",
        "",
    ]
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
        lines += ["| joint-attention call (alpha 1.5) | host dense ms | dense + PLADIS ms | ratio |", "| --- | --- | --- | --- |"]
        lines += [f"| {r['shape']} | {r['dense_ms']:.0f} | {r['pladis_ms']:.0f} | {r['ratio']:.2f}x |" for r in report["joint"]]
        lines.append("")
    if "e2e" in report:
        lines += ["| model (full width, random weights) | size | steps | without s | with PLADIS s | ratio |", "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['model']} | {r['size']}px | {r['steps']} | {r['plain_s']:.2f} | {r['pladis_s']:.2f} | {r['ratio']:.3f} |" for r in report["e2e"]]
        lines.append("")
    if "tgate" in report:
        lines += ["| model (full width, random weights) | size | steps | without s | with TGATE s | speed-up | v1 speed-up | paper |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['model']} | {r['size']}px | {r['steps']} | {r['plain_s']:.1f} | {r['tgate_s']:.1f} | {r['speedup']:.2f}x "
                  f"| {r['speedup_v1']:.2f}x | {r['paper']}x |" for r in report["tgate"]]
        lines.append("")
    if "memory" in report:
        lines += ["| call (alpha 1.5) | peak dense MiB | peak PLADIS MiB | output MiB | PLADIS - dense MiB |", "| --- | --- | --- | --- | --- |"]
        lines += [
            f"| {r['shape']} | {r['dense_mib']:.0f} | {r['pladis_mib']:.0f} | {r['output_mib']:.0f} | {r['extra_over_dense_mib']:.0f} |"
            for r in report["memory"]
        ]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
