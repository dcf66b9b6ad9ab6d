"""glibc's malloc on the CPU: keep freed memory for reuse instead of handing it back to the kernel.

With glibc's defaults, every allocation above its mmap threshold (which adapts, but never above 32 MiB on 64-bit
Linux) gets fresh pages from the kernel and returns them when freed. A batch of 128 images at 160 px has many
activations that large, so every forward and backward pass page-faults in, and the kernel zero-fills, gigabytes
of memory: measured on our 2 cores, about 660,000 minor page faults per batch of the frozen trunk and half of the
CPU time spent in the kernel (benchmarks/results/bench_allocator.json). ``mallopt(M_MMAP_MAX, 0)`` serves those blocks from the heap, and a high
``M_TRIM_THRESHOLD`` keeps freed memory there for the next batch. ``benchmarks/bench_allocator.py`` measures
both settings side by side (img/s, page faults, peak memory).

Applied once when ``vericar`` is imported, on glibc only; ``VERICAR_MALLOC=default`` leaves glibc's defaults.
Written by hand: jemalloc or tcmalloc do the same, but must be installed and preloaded (``LD_PRELOAD``) before
Python starts, which a notebook kernel or ``pip install`` cannot promise.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

ENV = "VERICAR_MALLOC"
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's malloc.h
TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB of freed memory at the heap's top before returning it

applied: bool = False


def reuse_freed_memory() -> bool:
    """Tune glibc's malloc as described above; True when applied (glibc, not opted out), else False."""
    global applied
    if applied:
        return True
    if os.environ.get(ENV, "").lower() == "default" or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        applied = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except (OSError, AttributeError):
        applied = False
    return applied
