"""`bert-jax bench`: A/B timings measured in one process, interleaved, after warm-up.

  --what step      A = the JAX train step (train.step.make_train_step, summed losses), B = the PyTorch
                   baseline step (scripts/torch_baseline.py): same checkpoint, same initial weights,
                   same synthetic batches (sst [B, L] + para, sts pairs [B, L] each), dropout on in both.
  --what pcgrad    A = the JAX PCGrad step, B = the JAX summed-loss step, same batches.
  --what split     A = the split step (per-task programs + one update program), B = the fused step.
  --what dtype     A = the JAX step with `dtype=bfloat16` (bf16 compute), B = the same step in fp32.
  --what phases    A = JAX, B = PyTorch, phase by phase: the forward (summed task losses, dropout on), forward +
                   backward, and the whole step (the update is the difference), all six interleaved.
  --what ensemble  A = a vmapped K-member ensemble, B = the K members one after another
                   (ensemble.timing.time_ensemble, dev batches).
  --what population A = one K-member population step (train.population: stacked states, one vmapped
                   program; members differ in lr and seed), B = the K members' single-run steps one after
                   another, same batches. Also reports each arm's compile seconds (every separate run
                   compiles its own step) and a 600-step whole-run estimate from the measured parts.
  --what epoch     A = JAX, B = PyTorch: one full pass over the real training data (train split of
                   sst, para, sts), each timed pass including loading + tokenisation, the epoch plan,
                   bucketed batching and every step; both frameworks see the same batches in the same
                   order. `--limit N` uses the first N examples per task (quick run); without it the pass
                   is the full "max" epoch (ceil(largest task / batch) steps: 1769 steps with the
                   data here, i.e. tens of minutes per framework and pass on a 2-core CPU, plus an
                   untimed warm-up pass in which JAX compiles every batch shape it meets).

Protocol: compile / warm-up first (JAX compile time reported separately, from jax.monitoring's
compile events), then `--reps` repetitions alternating AB, BA, AB, ... Reported per arm: median,
IQR (25th-75th percentile), min / max; `a_over_b` = median(A) / median(B), plus the median of the
per-repetition ratios, and the same statistics of the process CPU time (all threads) of each call,
which a shared machine distorts less than wall time. The result also records the machine (CPU model,
cores, load average), library versions and the settings below.

Process settings, made before jax / torch start their thread pools, for both arms alike: torch uses
`torch.set_num_threads(os.cpu_count())` (XLA's CPU client uses all cores by default);
`OMP_WAIT_POLICY=PASSIVE` unless already set; glibc malloc tuned so that XLA's per-execution temporary
buffer is reused instead of mmapped afresh every step (`scripts.host`, made by every `bert-jax` command,
training included; `--no-malloc-tuning` measures the default allocator).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any, Callable

import numpy as np

from train.compilation import CompileEvents
from train.tasks import get_task
from train.timing import Timings, interleave

STEP_TASKS = ("sst", "para", "sts")


# ----------------------------------------------------------------------------------------- helpers


def cpu_model() -> str:
    """The CPU as /proc/cpuinfo names it, with family / model and its widest SIMD (`platform` elsewhere)."""
    info: dict[str, str] = {}
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "cpu family", "model", "flags") and key not in info:
                info[key] = value.strip()
            if not line.strip() and info:
                break
    except OSError:
        pass
    if "model name" not in info:
        return platform.processor() or platform.machine()
    flags = info.get("flags", "").split()
    simd = "avx512f" if "avx512f" in flags else "avx2" if "avx2" in flags else "no avx2"
    return f"{info['model name']} (family {info.get('cpu family', '?')} model {info.get('model', '?')}, {simd})"


def machine() -> dict[str, Any]:
    """CPU model, core count, load average, JAX device and library versions."""
    import jax
    import torch

    cpu = cpu_model()
    dev = jax.devices()[0]
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "cpu": cpu, "cores": os.cpu_count(), "loadavg_1_5_15": load,
        "jax_device": f"{dev.platform}:{dev.device_kind}", "jax_devices": len(jax.devices()),
        "jax": jax.__version__, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "python": platform.python_version(),
    }


def _device_str(m: dict[str, Any]) -> str:
    return f"{m['jax_device']} ({m['cpu']}, {m['cores']} cores)"


def stats(xs: list[float]) -> dict[str, float]:
    q = np.percentile(xs, [25, 50, 75])
    return {"median_s": float(q[1]), "q25_s": float(q[0]), "q75_s": float(q[2]), "min_s": float(min(xs)),
            "max_s": float(max(xs)), "n": len(xs)}


def result(what: str, a: str, b: str, t: Timings, m: dict[str, Any], **extra: Any) -> dict[str, Any]:
    sa, sb = stats(t.wall["a"]), stats(t.wall["b"])
    ca, cb = stats(t.cpu["a"]), stats(t.cpu["b"])
    return {
        "what": what, "a": a, "b": b, "a_median_s": sa["median_s"], "b_median_s": sb["median_s"],
        "a_over_b": sa["median_s"] / sb["median_s"],
        "paired_ratio_median": float(np.median(np.asarray(t.wall["a"]) / np.asarray(t.wall["b"]))),
        "a_stats": sa, "b_stats": sb, "a_times_s": t.wall["a"], "b_times_s": t.wall["b"],
        "a_cpu_median_s": ca["median_s"], "b_cpu_median_s": cb["median_s"], "cpu_a_over_b": ca["median_s"] / cb["median_s"],
        "a_cpu_stats": ca, "b_cpu_stats": cb,
        "device": _device_str(m), "machine": m, **extra,
    }


def synthetic_batches(vocab: int, batch: int, seq: int, seed: int, tasks=STEP_TASKS,
                      cross: tuple[str, ...] = ()) -> dict[str, dict[str, np.ndarray]]:
    """One fixed-shape batch per task: [batch, seq] token ids, lengths in [seq/2, seq] (row 0 full), all rows valid.
    Pair tasks in `cross` get one cross-encoded [batch, seq] sequence (token types 1 on the second half)."""
    rng = np.random.default_rng(seed)
    cls, sep = (101, 102) if vocab > 1000 else (2, 3)  # BERT uncased ids; the test vocab's otherwise

    def ids():
        lengths = rng.integers(max(2, seq // 2), seq + 1, size=batch)
        lengths[0] = seq
        mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int32)
        x = rng.integers(min(1000, vocab // 2), vocab, size=(batch, seq)).astype(np.int32)
        x[:, 0] = cls
        x[np.arange(batch), lengths - 1] = sep
        return x * mask, mask

    def labels(task: str) -> np.ndarray:  # random labels of the task's registered type and range
        spec = get_task(task)
        if spec.kind == "regression":
            return rng.uniform(*spec.label_range, batch).astype(np.float32)
        return rng.integers(0, max(spec.num_classes, 2), batch).astype(spec.label_dtype)

    out = {}
    valid = np.ones((batch,), np.float32)
    for t in tasks:
        if not get_task(t).pair:
            x, m = ids()
            out[t] = {"input_ids": x, "attention_mask": m, "labels": labels(t), "valid": valid}
        elif t in cross:
            x, m = ids()
            y = labels(t)
            types = ((np.arange(seq)[None, :] >= seq // 2) * m).astype(np.int32)
            out[t] = {"input_ids": x, "attention_mask": m, "token_type_ids": types, "labels": y, "valid": valid}
        else:
            x1, m1 = ids()
            x2, m2 = ids()
            y = labels(t)
            out[t] = {"input_ids_1": x1, "attention_mask_1": m1, "input_ids_2": x2, "attention_mask_2": m2,
                      "labels": y, "valid": valid}
    return out


def _signature(batches: dict[str, dict[str, np.ndarray]]) -> tuple:
    return tuple((t, tuple(b["input_ids" if "input_ids" in b else "input_ids_1"].shape)) for t, b in sorted(batches.items()))


# ---------------------------------------------------------------------------------------- the arms


class JaxArm:
    """The trainer's jitted step on a fresh state; `__call__(batches)` runs one step and blocks."""

    def __init__(self, cfg, seed: int = 0):
        import jax

        from train.step import init_model, init_state, make_train_step, optimizer

        self.spec, params = init_model(cfg, jax.random.key(seed))
        self.params0 = params
        tx = optimizer(cfg, total_steps=1000)  # a linear schedule needs a length; the bench times steps, not the schedule
        self.state = init_state(jax.tree.map(lambda x: x.copy(), params), tx)
        self.fn = make_train_step(self.spec, tx, cfg.tasks, cfg.combine, cfg.pcgrad_reduction, cfg.finetune,
                                  impl=cfg.step_impl)
        self.key = jax.random.key(seed + 1)
        self.shapes: set = set()
        self.events = CompileEvents()

    def __call__(self, batches: dict) -> None:
        import jax

        self.state, m = self.fn(self.state, batches, self.key)
        self.shapes.add(_signature(batches))
        jax.block_until_ready((self.state, m))

    def step_async(self, batches: dict):
        """One step without waiting (as the trainer runs); returns the device metrics."""
        self.state, m = self.fn(self.state, batches, self.key)
        self.shapes.add(_signature(batches))
        return m

    def compiled_shapes(self) -> int | None:
        """Compiled programs of the step: step shapes (fused), or per-task grads + the update (split)."""
        fns = getattr(self.fn, "programs", (self.fn,))
        sizes = [getattr(f, "_cache_size", None) for f in fns]
        return sum(s() for s in sizes) if all(callable(s) for s in sizes) else None


class TorchArm:
    """The PyTorch baseline with the JAX arm's initial params, in train mode (dropout on)."""

    def __init__(self, cfg, jax_params, attn: str, device: str = "cpu", autocast_dtype=None):
        import jax
        import torch

        from scripts import torch_baseline as tb

        hc = cfg.heads
        att = cfg.model.attention_dropout
        self.model = tb.build_model(cfg.checkpoint, hc.heads, pooling=hc.pooling, para_head=hc.para_head,
                                    sts_head=hc.sts_head, hidden_dropout=cfg.model.hidden_dropout, attention_dropout=att,
                                    attn_implementation=attn, jax_params=jax.tree.map(np.asarray, jax_params)).to(device)
        self.model.train()
        self.opt = tb.CS224NAdamW(self.model.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.b1, cfg.optim.b2), eps=cfg.optim.eps,
                                  weight_decay=cfg.optim.weight_decay)
        self.fn = tb.make_torch_step(self.model, self.opt, cfg.tasks, cfg.combine, cfg.pcgrad_reduction,
                                     grad_clip=cfg.optim.grad_clip, device=device, autocast_dtype=autocast_dtype)
        self.device = device
        torch.manual_seed(0)

    def __call__(self, batches: dict) -> None:
        self.fn(batches)
        if self.device != "cpu":
            import torch

            torch.cuda.synchronize()


def step_arms(cfg, seed: int, attn: str, batch: int, seq: int, device: str = "cpu", autocast_dtype=None):
    """The JAX and PyTorch train steps from the same initial weights, and their synthetic batches (seeded by `seed`)."""
    jx = JaxArm(cfg, seed)
    tr = TorchArm(cfg, jx.params0, attn, device=device, autocast_dtype=autocast_dtype)
    return jx, tr, synthetic_batches(jx.spec.bert.vocab_size, batch, seq, seed, cross=cfg.heads.cross_tasks)


def seconds(fn: Callable[..., Any], *args: Any) -> float:
    """Wall time of one call `fn(*args)` (a first call: compile + run, or an untimed warm-up pass)."""
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def _cfg(args: argparse.Namespace, **kw: Any):
    from train.config import resolve_config

    return resolve_config(args.config, args.overrides, checkpoint=args.checkpoint, batch_size=args.batch, tasks=list(STEP_TASKS), **kw)


def _set_threads() -> int:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    return torch.get_num_threads()


def _log(args: argparse.Namespace, msg: str) -> None:
    if not args.quiet:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------- kinds


def bench_step(args: argparse.Namespace) -> dict[str, Any]:
    """JAX train step vs the PyTorch baseline step, same shapes and weights."""
    threads = _set_threads()
    cfg = _cfg(args, combine="sum")
    autocast = None
    if args.torch_autocast:
        import torch

        autocast = getattr(torch, args.torch_autocast)
    jx, tr, batches = step_arms(cfg, args.seed, args.torch_attn, args.batch, args.seq, autocast_dtype=autocast)
    with jx.events:
        first_a = seconds(jx, batches)
    first_b = seconds(tr, batches)
    for _ in range(args.warmup):
        jx(batches)
        tr(batches)
    _log(args, f"compiled in {first_a:.1f} s; timing {args.reps} reps")
    t = interleave({"a": lambda: jx(batches), "b": lambda: tr(batches)}, args.reps)
    return result(
        "step", f"JAX train step (sum of {len(cfg.tasks)} task losses)",
        f"PyTorch baseline step (transformers BertModel, attn_implementation={args.torch_attn}"
        + (f", torch.autocast {args.torch_autocast})" if args.torch_autocast else ")"), t, machine(),
        checkpoint=args.checkpoint, batch=args.batch, seq=args.seq, tasks=list(cfg.tasks),
        shapes=f"sst [{args.batch},{args.seq}]; para, sts pairs [{args.batch},{args.seq}] x2 (encoder runs [{2 * args.batch},{args.seq}])",
        hidden_dropout=cfg.model.hidden_dropout, attention_dropout=jx.spec.bert.attention_probs_dropout_prob,
        jax_dtype=str(jx.spec.bert.dtype), torch_autocast=args.torch_autocast,
        compile=jx.events.summary(), a_first_call_s=first_a, b_first_call_s=first_b,
        jax_compiled_shapes=jx.compiled_shapes(), torch_threads=threads, warmup=args.warmup, reps=args.reps,
    )


def bench_pcgrad(args: argparse.Namespace, a_cfg: dict | None = None, b_cfg: dict | None = None,
                 labels: tuple[str, str] = ("JAX PCGrad step", "JAX summed-loss step"), what: str = "pcgrad") -> dict[str, Any]:
    """JAX PCGrad step vs JAX summed step (or two other JAX step configs: `bench_split`)."""
    a_cfg = {"combine": "pcgrad"} if a_cfg is None else a_cfg
    b_cfg = {"combine": "sum"} if b_cfg is None else b_cfg
    a, b = JaxArm(_cfg(args, **a_cfg), args.seed), JaxArm(_cfg(args, **b_cfg), args.seed)
    cross = _cfg(args).heads.cross_tasks
    batches = synthetic_batches(a.spec.bert.vocab_size, args.batch, args.seq, args.seed, cross=cross)
    compile_info = {}
    for name, arm in (("a", a), ("b", b)):
        with arm.events:
            first = seconds(arm, batches)
        compile_info[name] = {**arm.events.summary(), "first_call_s": first}
        arm.events.reset()
    for _ in range(args.warmup):
        a(batches)
        b(batches)
    _log(args, f"compiled; timing {args.reps} reps")
    t = interleave({"a": lambda: a(batches), "b": lambda: b(batches)}, args.reps)
    return result(what, labels[0], labels[1], t, machine(),
                  checkpoint=args.checkpoint, batch=args.batch, seq=args.seq, tasks=list(STEP_TASKS),
                  compile_a=compile_info["a"], compile_b=compile_info["b"], warmup=args.warmup, reps=args.reps,
                  settings_a=a_cfg, settings_b=b_cfg, model_dtype_a=str(a.spec.bert.dtype), model_dtype_b=str(b.spec.bert.dtype))


def bench_ensemble(args: argparse.Namespace) -> dict[str, Any]:
    try:
        from ensemble.timing import time_ensemble
    except ImportError as e:
        from scripts.cli import UserError

        raise UserError(f"--what ensemble needs ensemble.timing.time_ensemble, which is not available ({e})") from None
    out = time_ensemble(args.k, args.checkpoint, args.n_examples, args.batch, args.reps, data_dir=args.data_dir)
    m = machine()
    out.setdefault("what", "ensemble")
    out["device"] = _device_str(m)
    out["machine"] = m
    return out


def bench_epoch(args: argparse.Namespace) -> dict[str, Any]:
    """One pass over the training data per timed repetition, for each framework (see module docstring)."""
    import jax

    import bert_jax
    from train import data as D
    from train.trainer import load_encoded, schedule

    threads = _set_threads()
    cfg = _cfg(args, combine="sum")
    data_dir = D.resolve_data_dir(args.data_dir)
    tok = bert_jax.load_tokenizer(cfg.checkpoint)
    jx = JaxArm(cfg, args.seed)
    tr = TorchArm(cfg, jx.params0, args.torch_attn)
    info: dict[str, Any] = {}
    data_s: dict[str, list[float]] = {"a": [], "b": []}

    def one_pass(arm) -> None:
        t0 = time.perf_counter()
        encs, _ = load_encoded(data_dir, cfg.tasks, "train", tok, cfg.data.max_len, args.limit, cross=cfg.heads.cross_tasks)
        data_s["a" if arm is jx else "b"].append(time.perf_counter() - t0)
        sched = schedule(cfg.with_values({"data.epoch_policy": "max"}), encs, {t: np.arange(len(e)) for t, e in encs.items()})
        sizes, steps = sched.sizes, sched.steps_per_epoch
        last = None
        for batches in sched.epoch_batches(0):
            if arm is jx:
                last = jx.step_async(batches)  # async dispatch: the next batch is built while this step runs
            else:
                tr(batches)
        if last is not None:
            jax.block_until_ready((jx.state, last))
        info.update(sizes=sizes, steps=steps)

    _log(args, "warm-up pass (JAX compiles every batch shape it meets)")
    with jx.events:
        warm_a = seconds(one_pass, jx)
    warm_b = seconds(one_pass, tr)
    _log(args, f"warm-up: JAX {warm_a:.1f} s ({len(jx.shapes)} shapes), torch {warm_b:.1f} s; timing {args.reps} reps")
    t = interleave({"a": lambda: one_pass(jx), "b": lambda: one_pass(tr)}, args.reps)
    return result(
        "epoch", "JAX: load + tokenise + batch + train steps, one pass",
        f"PyTorch baseline (attn_implementation={args.torch_attn}): the same pass", t, machine(),
        checkpoint=args.checkpoint, batch=args.batch, tasks=list(cfg.tasks), config=args.config,
        limit_per_task=args.limit, train_sizes=info["sizes"], steps_per_pass=info["steps"],
        max_len=cfg.data.max_len, buckets=list(cfg.data.buckets), align_buckets=cfg.data.align_buckets, compile=jx.events.summary(),
        jax_distinct_batch_shapes=len(jx.shapes), jax_compiled_shapes=jx.compiled_shapes(),
        a_warmup_pass_s=warm_a, b_warmup_pass_s=warm_b, torch_threads=threads, reps=args.reps,
        load_tokenise_median_s={k: float(np.median(v)) for k, v in data_s.items()},
    )


def bench_split(args: argparse.Namespace) -> dict[str, Any]:
    """The split step (per-task programs + update) vs the fused step, same batches (train.step)."""
    return bench_pcgrad(args, {"step_impl": "split"}, {"step_impl": "fused"},
                        ("JAX split step (per-task programs + update)", "JAX fused step (one program)"), "split")


class PopulationArm:
    """K members (`cfgs`, see train.population) as one vmapped step; `__call__(batches)` runs it and blocks."""

    def __init__(self, cfgs, impl: str | None = None) -> None:
        import jax

        import bert_jax
        from train.population import hyper, init_population, make_population_step
        from train.step import init_model, init_state, optimizer

        pretrained = bert_jax.load_pretrained(cfgs[0].checkpoint)
        inits = [init_model(c, jax.random.fold_in(jax.random.key(c.seed), 0), pretrained) for c in cfgs]
        self.state = init_population([init_state(p, optimizer(c, total_steps=1000)) for c, (_, p) in zip(cfgs, inits)], impl)
        self.fn = make_population_step(cfgs[0], inits[0][0].bert, 1000, impl)
        self.hyper = hyper(cfgs)
        self.events = CompileEvents()

    def __call__(self, batches: dict) -> None:
        import jax

        self.state, m = self.fn(self.state, batches, self.hyper)
        jax.block_until_ready((self.state, m))


def bench_population(args: argparse.Namespace) -> dict[str, Any]:
    """A K-member population step (one vmapped program) vs the K members' single-run steps one after another."""
    from train.population import member_configs

    base = _cfg(args)
    cfgs = member_configs(base, [{"lr": base.optim.lr * (1 + k) / args.k * 2, "seed": k} for k in range(args.k)])
    from train.population import default_impl

    impl = args.population_impl or default_impl()
    a = PopulationArm(cfgs, impl)
    bs = [JaxArm(c, c.seed) for c in cfgs]
    batches = synthetic_batches(bs[0].spec.bert.vocab_size, args.batch, args.seq, args.seed, cross=base.heads.cross_tasks)
    events = CompileEvents()  # one process-wide listener: reset before each arm
    with events:
        first_a = seconds(a, batches)
    compile_a = events.summary()["total_s"]
    firsts_b, compile_b = [], 0.0
    for arm in bs:  # every separate run compiles its own step (its learning rate is a constant of the program)
        events.reset()
        with events:
            firsts_b.append(seconds(arm, batches))
        compile_b += events.summary()["total_s"]
    run_b = lambda: [arm(batches) for arm in bs]
    for _ in range(args.warmup):
        a(batches)
        run_b()
    _log(args, f"compiled (population {compile_a:.1f} s, {args.k} single steps {compile_b:.1f} s); timing {args.reps} reps")
    t = interleave({"a": lambda: a(batches), "b": run_b}, args.reps)
    med_a, med_b = stats(t.wall["a"])["median_s"], stats(t.wall["b"])["median_s"]
    steps = 600  # the study's run length
    how = {"vmap": "vmap, all members side by side", "loop": "one member program, called per member"}[impl]
    return result("population", f"{args.k}-member population step (one program: {how})",
                  f"{args.k} single-run steps, one after another", t, machine(),
                  checkpoint=args.checkpoint, batch=args.batch, seq=args.seq, k=args.k, tasks=list(base.tasks),
                  members=[{"lr": c.optim.lr, "seed": c.seed} for c in cfgs], population_impl=impl,
                  compile_s=compile_a, compile_b_s=compile_b,
                  a_first_call_s=first_a, b_first_calls_s=firsts_b,
                  run_600_steps_s={"a": compile_a + steps * med_a, "b": compile_b + steps * med_b,
                                   "a_over_b": (compile_a + steps * med_a) / (compile_b + steps * med_b),
                                   "how": "measured compile seconds + 600 x the measured median step"},
                  warmup=args.warmup, reps=args.reps)


def bench_dtype(args: argparse.Namespace) -> dict[str, Any]:
    """The JAX step with bf16 compute (fp32 params, optimizer, softmax, losses) vs the same step in fp32."""
    return bench_pcgrad(args, {"dtype": "bfloat16"}, {"dtype": "float32"},
                        ("JAX step, bf16 compute", "JAX step, fp32"), "dtype")


def bench_phases(args: argparse.Namespace) -> dict[str, Any]:
    """Where a framework's step time goes: forward, forward + backward and the whole step, JAX vs PyTorch. PyTorch's
    forward records its graph (as in training); the update is the step minus forward + backward."""
    import jax
    import torch

    from scripts import torch_baseline as tb
    from train.step import loss_fn

    threads = _set_threads()
    cfg = _cfg(args, combine="sum")
    jx, tr, batches = step_arms(cfg, args.seed, args.torch_attn, args.batch, args.seq)
    jb, tasks, model = jax.tree.map(jax.numpy.asarray, batches), cfg.tasks, tr.model

    def j_loss(params, rng):
        return sum(loss_fn(params, jx.spec, t, jb[t], k) for t, k in zip(tasks, jax.random.split(rng, len(tasks))))

    j_fwd, j_grad = jax.jit(j_loss), jax.jit(jax.grad(j_loss))

    def t_loss() -> torch.Tensor:
        return sum(tb.task_losses(model, {t: tb.to_torch_batch(batches[t]) for t in tasks}, tasks).values())

    def t_fwd_bwd() -> None:
        model.zero_grad(set_to_none=True)
        t_loss().backward()

    key = jax.random.key(args.seed + 7)
    arms = {"jax_forward": lambda: float(j_fwd(jx.params0, key)), "torch_forward": lambda: float(t_loss().detach()),
            "jax_forward_backward": lambda: jax.block_until_ready(j_grad(jx.params0, key)), "torch_forward_backward": t_fwd_bwd,
            "a": lambda: jx(batches), "b": lambda: tr(batches)}
    with jx.events:
        # before any update (the PyTorch step trains its model in place): the same number when dropout is off
        losses = {"jax": float(j_fwd(jx.params0, key)), "torch": float(t_loss().detach())}
        first = {name: seconds(fn) for name, fn in arms.items()}
    for _ in range(args.warmup):
        for fn in arms.values():
            fn()
    _log(args, f"compiled; timing {args.reps} reps of 6 arms")
    t = interleave(arms, args.reps)
    med = {name: stats(t.wall[name])["median_s"] for name in arms}
    phases = {p: {"jax_s": med[f"jax_{p}"], "torch_s": med[f"torch_{p}"], "jax_over_torch": med[f"jax_{p}"] / med[f"torch_{p}"]}
              for p in ("forward", "forward_backward")}
    phases["step"] = {"jax_s": med["a"], "torch_s": med["b"], "jax_over_torch": med["a"] / med["b"]}
    phases["backward_only"] = {"jax_s": med["jax_forward_backward"] - med["jax_forward"],
                               "torch_s": med["torch_forward_backward"] - med["torch_forward"]}
    phases["update_only"] = {"jax_s": med["a"] - med["jax_forward_backward"], "torch_s": med["b"] - med["torch_forward_backward"]}
    return result("phases", "JAX train step", f"PyTorch baseline step (attn_implementation={args.torch_attn})", t, machine(),
                  checkpoint=args.checkpoint, batch=args.batch, seq=args.seq, tasks=list(tasks), phases=phases,
                  forward_loss=losses, first_call_s=first, compile=jx.events.summary(), torch_threads=threads, warmup=args.warmup, reps=args.reps,
                  hidden_dropout=cfg.model.hidden_dropout)


KINDS = {"population": bench_population, "step": bench_step, "pcgrad": bench_pcgrad, "split": bench_split,
         "dtype": bench_dtype, "phases": bench_phases, "ensemble": bench_ensemble, "epoch": bench_epoch}


DEFAULT_REPS = {"step": 20, "pcgrad": 20, "split": 20, "dtype": 20, "phases": 12, "ensemble": 5, "epoch": 3, "population": 10}


def _summary_line(r: dict[str, Any]) -> str:
    parts = [f"{r['what']}: A {r['a_median_s'] * 1e3:.1f} ms vs B {r['b_median_s'] * 1e3:.1f} ms (medians)",
             f"A/B = {r['a_over_b']:.3f}"]
    if "a_stats" in r:
        sa, sb = r["a_stats"], r["b_stats"]
        parts.append(f"IQR A {sa['q25_s'] * 1e3:.1f}-{sa['q75_s'] * 1e3:.1f} ms, B {sb['q25_s'] * 1e3:.1f}-{sb['q75_s'] * 1e3:.1f} ms")
    if "cpu_a_over_b" in r:
        parts.append(f"CPU-time A/B = {r['cpu_a_over_b']:.3f}")
    if "compile" in r:
        parts.append(f"JAX compile {r['compile']['total_s']:.1f} s")
    elif "compile_a" in r:
        parts.append(f"JAX compile A {r['compile_a']['total_s']:.1f} s, B {r['compile_b']['total_s']:.1f} s")
    elif "compile_s" in r:
        parts.append(f"compile A {r['compile_s']:.1f} s, B {r.get('compile_b_s', float('nan')):.1f} s")
    return "; ".join(parts) + f"  [{r['device']}]"


def _bench(args: argparse.Namespace) -> int:
    from scripts.cli import UserError

    process = args.process  # made by scripts.cli.main (scripts.host.prepare_process) before any step

    if args.reps is None:
        args.reps = DEFAULT_REPS[args.what]
    if args.batch is None:
        args.batch = 64 if args.what == "ensemble" else 8
    for name in ("reps", "batch", "seq", "k", "n_examples"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        raise UserError("--warmup must be >= 0")
    if args.limit is not None and args.limit < 1:
        raise UserError("--limit must be >= 1")
    r = KINDS[args.what](args)
    r["process"] = process
    print(json.dumps(r) if args.print_json else _summary_line(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
            f.write("\n")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="A/B timings: JAX vs PyTorch step/epoch, PCGrad vs sum, vmapped ensemble",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", choices=sorted(KINDS), default="step")
    p.add_argument("--checkpoint", default="embedded", help="'embedded' (all-MiniLM-L6-v2) or a local HF BERT directory")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the full result as JSON")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per arm (default 20; ensemble 5; epoch 3)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per arm after the compile call (step, pcgrad)")
    p.add_argument("--batch", type=int, default=None, help="examples per task per step (default 8); ensemble: eval batch size (default 64)")
    p.add_argument("--seq", type=int, default=32, help="sequence length of the synthetic batches (step, pcgrad)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides on top of --config (e.g. align_buckets=true hidden_dropout=0)")
    p.add_argument("--config", default="cpu-sum", help="train preset / YAML giving dropout, lr, max_len, buckets (default cpu-sum)")
    p.add_argument("--torch-attn", default="eager", choices=["eager", "sdpa"],
                   help="transformers attention kernel of the baseline (default eager: the faster one on this CPU)")
    p.add_argument("--torch-autocast", default=None, choices=["bfloat16", "float16"],
                   help="step: the PyTorch arm's forward under torch.autocast(DTYPE) (fp32 params and optimizer), "
                        "to compare with a JAX `dtype=bfloat16` step like for like")
    p.add_argument("--data-dir", default=None, help="CS224N data (epoch, ensemble); else $BERT_JAX_DATA, else ./data")
    p.add_argument("--limit", type=int, default=None, help="epoch: first N training examples per task (default: all)")
    p.add_argument("--k", type=int, default=4, help="ensemble / population members")
    p.add_argument("--n-examples", type=int, default=256, help="ensemble: dev examples per task")
    p.add_argument("--population-impl", choices=["vmap", "loop"], default=None,
                   help="population: vmap = all members side by side in one vmapped program; loop = one compiled member "
                        "program called per member (default: loop on CPU, vmap else)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-malloc-tuning", action="store_true", dest="bench_no_malloc_tuning",
                   help="leave glibc malloc at its defaults (scripts.host.tune_host_malloc; = bert-jax --no-malloc-tuning)")
    p.add_argument("--print-json", action="store_true", help="print the JSON result instead of the summary line")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_bench)
