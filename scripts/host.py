"""Process-wide host settings every `bert-jax` command makes before its heavy work (the CLI's edge).

`prepare_process` runs once in `scripts.cli.main`, for training, evaluation, prediction and every bench
alike, so that a bench measures the same process a training run is (`--no-malloc-tuning`, a flag of
`bert-jax` itself or of `bert-jax bench`, leaves glibc's allocator at its defaults).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys
from typing import Any

# glibc <malloc.h>
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def tune_host_malloc() -> bool:
    """Keep freed host memory for reuse instead of returning it to the OS (glibc only).

    XLA's CPU client allocates each execution's temporary buffer (~1 GB for the train step at
    batch 8, seq 64) with posix_memalign from a worker thread; glibc serves that from a fresh mmap
    and munmaps it on free, so every step pays ~250k first-touch page faults (26% of the step's CPU
    samples in `perf`) plus a ~0.1 s munmap. One arena, no mmap and no trimming make the buffer come
    from (and return to) the heap. Measured on the 2-core family-25 EPYC (cpu-recipe step, batch 16,
    seq 64): 4.17 s per step tuned vs 4.91 s untuned. Best applied before the XLA / torch thread
    pools start. Returns whether it was applied.
    """
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_ARENA_MAX, 1) and libc.mallopt(_M_MMAP_MAX, 0)
                    and libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(2**31 - 1)))
    except (OSError, AttributeError):
        return False


CORES_ENV = "BERT_JAX_CPU_CORES"  # e.g. "1" or "0,1": pin the process to these cores (`bert-jax experiments --workers`)


def prepare_process(malloc: bool = True) -> dict[str, Any]:
    """Host settings for the whole process (JAX and the PyTorch baseline alike); returns what was set.

    `$BERT_JAX_CPU_CORES` (comma-separated core ids): the process runs on those cores only, so XLA's and
    torch's thread pools, created later, size themselves to them (a parallel study job gets one core each).

    OMP_WAIT_POLICY=PASSIVE (unless set): on a loaded machine torch's OpenMP workers otherwise
    busy-wait at every barrier (measured here under load ~10 on 2 cores: 9.9 CPU-s per baseline
    step instead of 1.26). `malloc`: `tune_host_malloc`.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    cores = os.environ.get(CORES_ENV)
    if cores:
        try:
            os.sched_setaffinity(0, {int(c) for c in cores.split(",")})
        except (ValueError, OSError) as e:
            raise ValueError(f"${CORES_ENV}={cores!r}: not a list of this machine's core ids ({e})") from None
    late = [m for m in ("torch", "jaxlib") if m in sys.modules]
    return {"omp_wait_policy": os.environ["OMP_WAIT_POLICY"], "cores": cores or None, "malloc_tuned": tune_host_malloc() if malloc else False,
            "imported_before_setup": late}
