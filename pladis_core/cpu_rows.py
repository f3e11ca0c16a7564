"""cpu_rows.cpp: the CPU's kernel for the PLADIS weights.

Built the first time a process needs it, with the machine's C++ compiler (the one that
torch.compile needs on the CPU too: $CXX, else c++), into a cache directory that outlives
restarts ($PLADIS_CACHE_DIR, else ~/.cache/comfyui-pladis), and called through ctypes, which
lets go of the GIL while it runs. Where it cannot be built (no compiler, no OpenMP), the log
says so once and torch.compile's kernel (fused.py) serves instead.
"""
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_rows.cpp")
# -fno-trapping-math lets the compiler vectorise the selects of exp2 and log2 (no code here reads
# floating-point exception flags).
FLAGS = ("-O3", "-march=native", "-fno-trapping-math", "-fopenmp", "-std=c++17", "-shared", "-fPIC")
# The kernel's power for each fused.py family: beta - 1 where beta is an integer, -2 for the cube
# root, else -1.
POWERS = {"sparsemax": 0, "entmax15": 1, **{f"power {n}": n - 1 for n in range(3, 11)}, "cube root": -2, "general": -1}

_loaded = {}  # "kernel": the C function, or None where it could not be built (once per process)


def cpu_pladis_weights(z, scale, alpha, family, residual, row_lse=None):
    """The PLADIS weights of float32 logits z on the CPU, or None where this kernel does not serve.
    row_lse (joint attention, float32, z's shape with 1 keys): each row's weights are scaled by its
    dense mass on z's keys, exp(logsumexp(z) - row_lse)."""
    kernel = _kernel() if z.dtype == torch.float32 and z.device.type == "cpu" else None  # it reads float32 memory
    if kernel is None:
        return None
    z = z.contiguous()
    lse = None if row_lse is None else row_lse.float().expand(*z.shape[:-1], 1).contiguous()
    w = torch.empty_like(z)
    if z.numel():
        kernel(z.data_ptr(), w.data_ptr(), z.numel() // z.shape[-1], z.shape[-1], alpha, scale, POWERS[family], residual,
               None if lse is None else lse.data_ptr(), torch.get_num_threads())
    return w


def cpu_kernel_built():
    return _kernel() is not None


def _kernel():
    if "kernel" not in _loaded:
        _loaded["kernel"] = _build()
    return _loaded["kernel"]


def _build():
    compiler = os.environ.get("CXX") or shutil.which("c++")
    try:
        if compiler is None:
            raise FileNotFoundError("no C++ compiler found (install one, or set CXX)")
        library = _cache_dir() / f"cpu_rows-{_key(compiler)}.so"
        if not library.exists():
            started = time.perf_counter()
            library.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
                built = Path(scratch) / library.name
                subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built)], check=True, capture_output=True, text=True, timeout=600)
                os.replace(built, library)  # whole or not at all where two servers build at once
            logging.info(f"PLADIS: built the CPU kernel in {time.perf_counter() - started:.1f} s "
                         f"({library}; later starts reuse it)")
        function = ctypes.CDLL(str(library)).pladis_rows
    except (OSError, subprocess.SubprocessError) as error:
        logging.warning(f"PLADIS: could not build the CPU kernel; torch.compile's kernel "
                        f"serves instead (slower): {getattr(error, 'stderr', None) or error}")
        return None
    function.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_float, ctypes.c_float,
                         ctypes.c_int, ctypes.c_bool, ctypes.c_void_p, ctypes.c_int)
    function.restype = None
    return function


def _cache_dir():
    if os.environ.get("PLADIS_CACHE_DIR"):
        return Path(os.environ["PLADIS_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "comfyui-pladis"


def _key(compiler):
    """Changes with the source, the flags, the compiler and the CPU (-march=native): a library
    built for another CPU (a home directory shared between machines) is never loaded."""
    return hashlib.sha256(repr((SOURCE.read_bytes(), FLAGS, compiler, _cpu())).encode()).hexdigest()[:16]


def _cpu():
    try:
        with open("/proc/cpuinfo") as info:
            return next((line for line in info if line.startswith(("flags", "Features"))), "")
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
