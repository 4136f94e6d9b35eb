"""Timing of a vmapped K-member ensemble (A) against the K members evaluated one after another (B).

Both arms score the same device-resident batches with the same params; both use ahead-of-time compiled
executables (one per distinct batch shape), so compilation is timed separately and never inside a
repetition. After one warm-up pass of each arm, repetitions alternate A/B (ABBA order) and medians are
reported. Used by `bert-jax bench --what ensemble`.

Measure with the machine otherwise idle: on a shared CPU the wall times follow the other processes' load.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from typing import Any, Sequence

import jax
import numpy as np

import bert_jax
from ensemble.stack import CPU_CHUNK_TOKENS, make_stacked_eval_fn, stack
from train import data as D
from train.heads import HeadConfig, init_heads
from train.step import ModelSpec, make_eval_fn


def _batches(checkpoint: str, tasks: Sequence[str], n_examples: int, batch_size: int, max_len: int,
             buckets: Sequence[int], data_dir: str | None, seed: int) -> tuple[list[tuple[str, dict]], str]:
    """Eval batches of the first `n_examples` dev examples per task (synthetic tokens when no data)."""
    try:
        root = D.resolve_data_dir(data_dir)
    except D.DataError:
        root = None
    out: list[tuple[str, dict]] = []
    if root is not None:
        tok = bert_jax.load_tokenizer(checkpoint)
        for t in tasks:
            td = D.load_task(root, t, "dev")
            td = dataclasses.replace(td, ids=td.ids[:n_examples], sentences1=td.sentences1[:n_examples],
                                     sentences2=None if td.sentences2 is None else td.sentences2[:n_examples],
                                     labels=td.labels[:n_examples])
            out += [(t, b) for b in D.eval_batches(D.encode_task(td, tok, max_len), batch_size, buckets)]
        return out, f"{'+'.join(tasks)} dev, first {n_examples} examples per task ({root})"
    rng = np.random.default_rng(seed)
    for t in tasks:
        lens = rng.integers(8, max_len + 1, size=n_examples)
        toks = tuple(np.concatenate([[101], rng.integers(1000, 30000, size=n - 2), [102]]).astype(np.int32) for n in lens)
        enc = D.Encoded(task=t, ids=tuple(map(str, range(n_examples))), tokens1=toks,
                        tokens2=toks[::-1] if t in D.PAIR_TASKS else None,
                        labels=np.zeros(n_examples, np.float32 if t in D.PAIR_TASKS else np.int32), has_labels=False)
        out += [(t, b) for b in D.eval_batches(enc, batch_size, buckets)]
    return out, f"synthetic tokens, {n_examples} examples per task of {'+'.join(tasks)} (no data dir found)"


def _signature(task: str, batch: dict) -> tuple:
    return (task,) + tuple((k, v.shape) for k, v in sorted(batch.items()))


def time_ensemble(
    k: int,
    checkpoint: str = "embedded",
    n_examples: int = 512,
    batch_size: int = 64,
    reps: int = 5,
    *,
    tasks: Sequence[str] = ("sst",),
    data_dir: str | None = None,
    max_len: int = 64,
    buckets: Sequence[int] = (16, 32, 64),
    seed: int = 0,
    chunk_tokens: int | None | str = "auto",
    include_unchunked: bool = False,
) -> dict[str, Any]:
    """Dev-evaluation wall time of K members: vmapped (A) vs one after another (B).

    Members are the checkpoint's encoder with differently seeded random heads (the cost does not depend
    on the values). Returns medians and spreads in seconds per full pass over the batches, `a_over_b`,
    `compile_s` (A's ahead-of-time compile of all batch shapes; `compile_b_s` likewise for B),
    `max_abs_diff` between the two arms' scores, the data used and the device. A uses
    `make_stacked_eval_fn(spec, chunk_tokens)`; with `include_unchunked` a third arm C (plain vmap, no
    micro-batches) is interleaved too (`c_median_s`, `c_over_b`).
    """
    if k < 1 or reps < 1:
        raise ValueError(f"k and reps must be >= 1, got k={k}, reps={reps}")
    bert, bert_params = bert_jax.load_pretrained(checkpoint)
    spec = ModelSpec(bert=bert.replace(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), heads=HeadConfig())
    members = [{"bert": bert_params, "heads": init_heads(spec.heads, bert.hidden_size, jax.random.key(seed + i))}
               for i in range(k)]
    stacked = stack(members)
    members = [jax.tree.map(jax.numpy.array, m) for m in members]  # k separate device copies, like k loaded runs
    host_batches, data_desc = _batches(checkpoint, tasks, n_examples, batch_size, max_len, buckets, data_dir, seed)
    batches = [(t, jax.device_put({k_: v for k_, v in b.items() if k_ not in ("labels", "valid")})) for t, b in host_batches]

    def compile_all(fn, params) -> tuple[dict[tuple, Any], float]:
        exe: dict[tuple, Any] = {}
        t0 = time.perf_counter()
        for t, b in batches:
            if _signature(t, b) not in exe:
                exe[_signature(t, b)] = fn.lower(params, t, b).compile()
        return exe, time.perf_counter() - t0

    exe_a, compile_a = compile_all(make_stacked_eval_fn(spec, chunk_tokens), stacked)
    exe_b, compile_b = compile_all(make_eval_fn(spec), members[0])
    exe_c, compile_c = compile_all(make_stacked_eval_fn(spec, None), stacked) if include_unchunked else ({}, 0.0)

    def run_a() -> list:
        outs = [exe_a[_signature(t, b)](stacked, b) for t, b in batches]
        return jax.block_until_ready(outs)

    def run_c() -> list:
        outs = [exe_c[_signature(t, b)](stacked, b) for t, b in batches]
        return jax.block_until_ready(outs)

    def run_b() -> list:
        outs = [[exe_b[_signature(t, b)](m, b) for t, b in batches] for m in members]
        return jax.block_until_ready(outs)

    t0 = time.perf_counter()
    out_a = run_a()
    warm_a = time.perf_counter() - t0
    t0 = time.perf_counter()
    out_b = run_b()
    warm_b = time.perf_counter() - t0
    diff = max(float(np.max(np.abs(np.asarray(out_a[j])[i] - np.asarray(out_b[i][j]))))
               for i in range(k) for j in range(len(batches)))
    del out_a, out_b

    arms = "abc" if include_unchunked else "ab"
    if include_unchunked:
        run_c()  # warm-up
    runs = {"a": run_a, "b": run_b, "c": run_c}
    times: dict[str, list[float]] = {a: [] for a in arms}
    for r in range(reps):
        for arm in (arms if r % 2 == 0 else arms[::-1]):
            t0 = time.perf_counter()
            runs[arm]()
            times[arm].append(time.perf_counter() - t0)
    a_med, b_med = statistics.median(times["a"]), statistics.median(times["b"])
    extra: dict[str, Any] = {}
    if include_unchunked:
        c_med = statistics.median(times["c"])
        extra = {"c": f"vmapped ensemble of {k}, no micro-batches", "c_median_s": c_med, "c_over_b": c_med / b_med,
                 "c_times_s": times["c"], "compile_c_s": compile_c}
    dev = jax.devices()[0]
    return {
        "what": "ensemble", "a": f"vmapped ensemble of {k}", "b": f"{k} members one after another",
        "k": k, "checkpoint": checkpoint, "n_examples": n_examples, "batch_size": batch_size, "reps": reps,
        "tasks": list(tasks), "max_len": max_len, "buckets": list(buckets), "n_batches": len(batches),
        "batch_shapes": len(exe_a), "data": data_desc,
        "a_median_s": a_med, "b_median_s": b_med, "a_over_b": a_med / b_med,
        "a_times_s": times["a"], "b_times_s": times["b"],
        "a_spread_s": max(times["a"]) - min(times["a"]), "b_spread_s": max(times["b"]) - min(times["b"]),
        "compile_s": compile_a, "compile_b_s": compile_b, "warmup_a_s": warm_a, "warmup_b_s": warm_b,
        "max_abs_diff": diff, "chunk_tokens": chunk_tokens if chunk_tokens != "auto" else (
            CPU_CHUNK_TOKENS if jax.default_backend() == "cpu" else None), **extra,
        "device": f"{dev.platform}:{dev.device_kind}", "host": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
    }
