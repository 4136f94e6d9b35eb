"""The one interleaved A/B(/C...) timer of every bench (`bert-jax bench`, `gpu-check`, `ensemble.timing`).

Machines here are shared and noisy, so arms are never timed in blocks: repetition r runs every arm once,
in the given order on even r and reversed on odd r (ABBA...), and each call's wall and process-CPU time
(all threads) is kept. Warm-up and compilation are the caller's, before `interleave`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping


@dataclasses.dataclass
class Timings:
    """Seconds of each repetition per arm: wall time, and this process's CPU time (on a shared machine wall
    time also counts waiting for the cores, CPU time only this process's work)."""

    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]


def interleave(arms: Mapping[str, Callable[[], Any]], reps: int) -> Timings:
    """`reps` timings of each arm (each call must block until its work is done), ABBA-interleaved."""
    if reps < 1 or not arms:
        raise ValueError(f"need >= 1 arm and reps >= 1, got {len(arms)} arms, reps={reps}")
    order = list(arms)
    t = Timings({a: [] for a in order}, {a: [] for a in order})
    for r in range(reps):
        for arm in (order if r % 2 == 0 else order[::-1]):
            c0, t0 = time.process_time(), time.perf_counter()
            arms[arm]()
            t.wall[arm].append(time.perf_counter() - t0)
            t.cpu[arm].append(time.process_time() - c0)
    return t
