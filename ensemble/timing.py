"""Timing of a vmapped K-member ensemble (A) against the K members evaluated one after another (B).

Both arms score the same device-resident batches with the same params; both use ahead-of-time compiled
executables (one per distinct batch shape), so compilation is timed separately and never inside a
repetition. After one warm-up pass of each arm, repetitions alternate A/B (ABBA order, `train.timing`) and
medians are reported. Used by `bert-jax bench --what ensemble`.

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
from ensemble.stack import make_stacked_eval_fn, resolve_chunk_tokens, stack
from train import data as D
from train.heads import HeadConfig, init_heads
from train.step import ModelSpec, make_eval_fn
from train.tasks import get_task
from train.timing import interleave


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
                        tokens2=toks[::-1] if get_task(t).pair else None,
                        labels=np.zeros(n_examples, get_task(t).label_dtype), has_labels=False)
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
    extra_arms: Sequence[str] = (),
) -> dict[str, Any]:
    """Dev-evaluation wall time of K members: vmapped (A) vs one after another (B).

    Members are the checkpoint's encoder with differently seeded random heads (the cost does not depend
    on the values). Returns medians and spreads in seconds per full pass over the batches, `a_over_b`,
    `compile_s` (A's ahead-of-time compile of all batch shapes; `compile_b_s` likewise for B),
    `max_abs_diff` between the two arms' scores, the data used and the device. A uses
    `make_stacked_eval_fn(spec, chunk_tokens)`. `extra_arms` adds interleaved arms for diagnosis:
    "unchunked" -> C, the plain vmap without micro-batches; "chunked_sequential" -> D, the members one
    after another, each in A's micro-batch size (separates the effect of vmap from that of micro-batching);
    each reported as `<arm>_median_s`, `<arm>_over_b`.
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

    resolved_chunk = resolve_chunk_tokens(chunk_tokens)
    one = stack(members[:1])  # a 1-member stack, for arm d
    # arm -> (description, params per call, compiled executables, compile seconds)
    arms: dict[str, tuple[str, list, dict, float]] = {}
    exe, c = compile_all(make_stacked_eval_fn(spec, resolved_chunk), stacked)
    arms["a"] = (f"vmapped ensemble of {k}" + (f" (micro-batches of <= {resolved_chunk} member-tokens)" if resolved_chunk else ""),
                 [stacked], exe, c)
    exe, c = compile_all(make_eval_fn(spec), members[0])
    arms["b"] = (f"{k} members one after another (train.step.make_eval_fn)", members, exe, c)
    if "unchunked" in extra_arms:
        exe, c = compile_all(make_stacked_eval_fn(spec, None), stacked)
        arms["c"] = (f"vmapped ensemble of {k}, no micro-batches", [stacked], exe, c)
    if "chunked_sequential" in extra_arms and resolved_chunk:
        exe, c = compile_all(make_stacked_eval_fn(spec, max(1, resolved_chunk // k)), one)
        arms["d"] = (f"{k} members one after another, each in A's micro-batches", [stack([m]) for m in members], exe, c)

    def run(arm: str) -> list:
        _, params, exe, _ = arms[arm]
        outs = [[exe[_signature(t, b)](p, b) for t, b in batches] for p in params]
        return jax.block_until_ready(outs)

    warm: dict[str, float] = {}
    outs: dict[str, list] = {}
    for arm in arms:
        t0 = time.perf_counter()
        outs[arm] = run(arm)
        warm[arm] = time.perf_counter() - t0
    diff = max(float(np.max(np.abs(np.asarray(outs["a"][0][j])[i] - np.asarray(outs["b"][i][j]))))
               for i in range(k) for j in range(len(batches)))
    del outs

    times = interleave({arm: (lambda arm=arm: run(arm)) for arm in arms}, reps).wall
    med = {a: statistics.median(t) for a, t in times.items()}
    extra: dict[str, Any] = {}
    for arm in arms:
        if arm in "ab":
            continue
        extra.update({arm: arms[arm][0], f"{arm}_median_s": med[arm], f"{arm}_over_b": med[arm] / med["b"],
                      f"{arm}_times_s": times[arm], f"compile_{arm}_s": arms[arm][3], f"warmup_{arm}_s": warm[arm]})
    dev = jax.devices()[0]
    return {
        "what": "ensemble", "a": arms["a"][0], "b": arms["b"][0],
        "k": k, "checkpoint": checkpoint, "n_examples": n_examples, "batch_size": batch_size, "reps": reps,
        "tasks": list(tasks), "max_len": max_len, "buckets": list(buckets), "n_batches": len(batches),
        "batch_shapes": len(arms["a"][2]), "data": data_desc,
        "a_median_s": med["a"], "b_median_s": med["b"], "a_over_b": med["a"] / med["b"],
        "a_times_s": times["a"], "b_times_s": times["b"],
        "a_spread_s": max(times["a"]) - min(times["a"]), "b_spread_s": max(times["b"]) - min(times["b"]),
        "compile_s": arms["a"][3], "compile_b_s": arms["b"][3], "warmup_a_s": warm["a"], "warmup_b_s": warm["b"],
        "max_abs_diff": diff, "chunk_tokens": resolved_chunk, **extra,
        "device": f"{dev.platform}:{dev.device_kind}", "host": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
    }
