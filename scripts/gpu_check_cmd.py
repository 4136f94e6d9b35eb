"""`bert-jax gpu-check`: the prepared GPU check (also `scripts/gpu_check.sh`) on one NVIDIA GPU.

On the H200 (2026-11-27) each bert-base train step took 200-240 s to compile with XLA's autotuned Triton GEMMs and
56-103 s with Triton GEMMs off (`scripts/gpu_check.sh` sets that), one after another, so the whole check took ~8
minutes there, not its 5-minute goal. So the check now builds every part first, compiles all their JAX programs at
once on the machine's cores (`--compile-jobs`, default all; not yet run on a GPU), then times the parts one after
another with the compiled executables. `--only PARTS` runs a subset.

Runs where nothing can be installed or downloaded: it needs only jax (with CUDA), flax, optax, torch and
transformers, and no pretrained weights (random-init BERTs are written to a temporary directory). It prints:

1. parity: bert_jax on the accelerator vs transformers' BertModel (fp32, CPU) on a tiny random config;
2. the multitask train step (summed SST + paraphrase + STS losses, mean pooling, dropout 0.1, batch 32 per
   task, 128 tokens, bert-base shapes: 12 layers, hidden 768), JAX vs the PyTorch baseline on the same
   device, interleaved in one run: fp32 vs fp32, bf16 vs bf16 autocast, and JAX bf16 + cuDNN attention vs
   PyTorch bf16 + SDPA;
3. the MFU of the bf16 JAX step: model FLOPs (6 x non-embedding params x tokens + attention) per second over
   the GPU's dense bf16 peak (from its device kind, or `--peak-tflops`);
4. the population step (train/population.py) of the reproduction study: K = 6 members (different seeds) of the
   study's model shape (all-MiniLM-L6-v2's: 6 layers, hidden 384; random init), batch 8 per task, 32 tokens (the
   study's `cpu` protocol), fp32, vmapped (`impl="vmap"`) vs the 6 single-run steps (one shared program) one after
   another, interleaved. (Until 2026-11-29 this part ran 4 members at bert-base shapes: 0.41 on the H200.)

Each part fails on its own (its error recorded, the rest still run, exit status 1).

`--dry` runs the same code on tiny shapes on whatever device JAX has (the CPU in the test suite): its compiles
dominate (~20 s each on 2 CPU cores; a 2-member population of the tiny model instead of 6 of the study's), about two minutes in all.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), by a substring of jax's device_kind.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
                    "A10G": 70.0, "V100": 125.0}

BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
STUDY = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)  # all-MiniLM-L6-v2's


def _save_random_bert(out: Path, vocab_size: int, seed: int, **sizes: int) -> Path:
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    model = BertModel(BertConfig(vocab_size=vocab_size, max_position_embeddings=512, **sizes))
    model.save_pretrained(out)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(vocab_size - 5)]
    (out / "vocab.txt").write_text("\n".join(words) + "\n")
    return out


def peak_tflops(device_kind: str, override: float | None) -> float | None:
    if override:
        return override
    for key, value in BF16_PEAK_TFLOPS.items():
        if key.lower() in device_kind.lower():
            return value
    return None


def step_flops(layers: int, hidden: int, inter: int, batch: int, seq: int) -> float:
    """Model FLOPs of one train step (forward + backward = 3 x forward) over the step's sequences:
    sst [B, L], paraphrase [B, L] cross-encoded, STS pairs [2B, L]: 4B sequences of L tokens."""
    tokens = 4 * batch * seq
    dense = 2 * layers * (4 * hidden * hidden + 2 * hidden * inter) * tokens  # QKVO + FFN, forward
    attention = 2 * layers * 2 * seq * hidden * tokens  # QK^T and AV, forward
    return 3.0 * (dense + attention)


@dataclass(frozen=True)
class _Setup:
    """What every timed part shares: the random bert checkpoint, the heads and the step's shapes."""

    ckpt: Path
    heads: Any  # train.heads.HeadConfig
    batch: int
    seq: int
    reps: int
    torch_device: str
    dry: bool
    flops: float  # model FLOPs of one train step at (batch, seq)
    scan_layers: bool = False  # the encoder as one lax.scan over its layers: one compiled layer body


def _parity(tmp: Path) -> dict[str, Any]:
    from bert_jax.parity import compare

    return compare(_save_random_bert(tmp / "tiny", 99, 0, **TINY), batch=4, seq=32)


class _StepPart:
    """The multitask train step, JAX (`dtype`, `attn`) vs PyTorch (autocast `t_dtype`, `t_attn`), interleaved."""

    def __init__(self, s: _Setup, dtype: str, attn: str, t_dtype: Any, t_attn: str):
        import torch

        from scripts.bench_cmd import step_arms
        from train.config import TrainConfig

        cfg = TrainConfig.from_dict(dict(checkpoint=str(s.ckpt), heads=s.heads, batch_size=s.batch, max_len=s.seq,
                                         buckets=(s.seq,), hidden_dropout=0.1, lr=1e-5, dtype=dtype, attention_impl=attn,
                                         scan_layers=s.scan_layers))
        # JAX's default fp32 matmul precision on NVIDIA GPUs is TF32; PyTorch's is full fp32 unless asked.
        # Compare like with like: TF32 on both (the 2026-11-27 H200 run, before this, had PyTorch in full fp32).
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = s.torch_device == "cuda"
        self.s = s
        self.jx, self.tr, self.batches = step_arms(cfg, 0, t_attn, s.batch, s.seq, device=s.torch_device,
                                                   autocast_dtype=t_dtype)
        self.compile_s: float | None = None  # set by `_compile_parts`

    def programs(self) -> list[tuple[Any, tuple]]:
        """(arm, its step's arguments): the JAX programs `_compile_parts` compiles ahead of the timing."""
        return [(self.jx, (self.jx.state, self.batches, self.jx.key))]

    def measure(self) -> dict[str, Any]:
        import jax
        import torch

        from scripts.bench_cmd import interleave, stats

        jx, tr, batches, s = self.jx, self.tr, self.batches, self.s
        with jx.events:
            t0 = time.perf_counter()
            jx(batches)
            first = time.perf_counter() - t0
        tr(batches)
        for _ in range(2):
            jx(batches)
            tr(batches)
        t = interleave({"a": lambda: jx(batches), "b": lambda: tr(batches)}, s.reps)
        a, b = stats(t.wall["a"])["median_s"], stats(t.wall["b"])["median_s"]
        compile_s = self.compile_s if self.compile_s is not None else jx.events.summary()["total_s"]
        return {"jax_s": a, "torch_s": b, "jax_over_torch": a / b, "jax_compile_s": compile_s,
                "jax_first_call_s": first, "jax_model_tflops": s.flops / a / 1e12, "torch_model_tflops": s.flops / b / 1e12,
                "torch_tf32": torch.backends.cuda.matmul.allow_tf32,
                "jax_matmul_precision": str(jax.config.jax_default_matmul_precision),
                "jax_scan_layers": jx.spec.bert.scan_layers}


class _PopulationPart:
    """K members as one vmapped fp32 step vs the K single-run steps one after another, interleaved, at the study's
    shapes: `ckpt` a random BERT of `STUDY` sizes (`s.ckpt`, the tiny one, in the dry mode)."""

    def __init__(self, s: _Setup, ckpt: Path):
        from scripts.bench_cmd import JaxArm, PopulationArm, synthetic_batches
        from train.config import TrainConfig
        from train.population import member_configs

        self.s = s
        # dry: 2 members (the vmapped program compiles slower with K on a CPU); else issue 12's bench, K = 6
        self.k, self.pb, self.seq = (2, 2, s.seq) if s.dry else (6, 8, 32)
        base = TrainConfig.from_dict(dict(checkpoint=str(ckpt), heads=s.heads, batch_size=self.pb, max_len=self.seq,
                                          buckets=(self.seq,), hidden_dropout=0.1, lr=1e-5, scan_layers=s.scan_layers))
        # K seeds (the study's noise band): the single runs then share one compiled step
        cfgs = member_configs(base, [{"seed": i} for i in range(self.k)])
        self.pop, self.singles = PopulationArm(cfgs, "vmap"), [JaxArm(c, c.seed) for c in cfgs]
        self.batches = synthetic_batches(self.singles[0].spec.bert.vocab_size, self.pb, self.seq, 0,
                                         cross=s.heads.cross_tasks)
        self.compile_s: float | None = None

    def programs(self) -> list[tuple[Any, tuple]]:
        first = self.singles[0]
        return [(self.pop, (self.pop.state, self.batches, self.pop.hyper)), (first, (first.state, self.batches, first.key))]

    def measure(self) -> dict[str, Any]:
        from scripts.bench_cmd import interleave, stats

        pop, singles, batches = self.pop, self.singles, self.batches
        for arm in singles[1:]:
            arm.fn = singles[0].fn  # same config but the seed: the same program, compiled once
        with pop.events:
            pop(batches)
        for arm in singles:
            arm(batches)
        pop(batches)
        t = interleave({"a": lambda: pop(batches), "b": lambda: [arm(batches) for arm in singles]}, self.s.reps)
        a, b = stats(t.wall["a"])["median_s"], stats(t.wall["b"])["median_s"]
        compile_s = self.compile_s if self.compile_s is not None else pop.events.summary()["total_s"]
        return {"k": self.k, "batch": self.pb, "seq": self.seq, "population_s": a, "singles_s": b,
                "population_over_singles": a / b, "population_compile_s": compile_s, "impl": "vmap", "dtype": "float32"}


def _compile_parts(parts: dict[str, Any], jobs: int) -> dict[str, Any]:
    """Compile every built part's JAX programs ahead of its timing, `jobs` at a time (XLA compiles with the GIL
    released, and the GPU machines have 16 cores: five bert-base programs of 56-103 s each took most of the check's
    475 s on the H200 when they compiled one after another). Each arm then calls its compiled executable
    (`jax.stages.Compiled`, the same program its jitted function would build). A part whose compile fails is
    dropped from `parts` and its error returned; `compile_s` of a part is the wall time of its slowest program."""
    from concurrent.futures import ThreadPoolExecutor

    def compile_one(job: tuple[str, Any, tuple]) -> tuple[str, float]:
        name, arm, args = job
        t0 = time.perf_counter()
        arm.fn = arm.fn.lower(*args).compile()
        return name, time.perf_counter() - t0

    todo = [(name, arm, args) for name, part in parts.items() for arm, args in part.programs()
            if hasattr(arm.fn, "lower")]
    failed: dict[str, Any] = {}
    if not todo:
        return failed
    with ThreadPoolExecutor(max_workers=max(1, min(jobs, len(todo)))) as pool:
        futures = [(job[0], pool.submit(compile_one, job)) for job in todo]
        for name, future in futures:
            try:
                _, secs = future.result()
                parts[name].compile_s = max(parts[name].compile_s or 0.0, secs)
            except Exception as e:  # noqa: BLE001 - recorded as the part's error, the other parts go on
                traceback.print_exc()
                failed[name] = {"error": f"{type(e).__name__}: {e}"}
    for name in failed:
        parts.pop(name, None)
    return failed


def _step_line(name: str) -> Callable[[dict[str, Any]], str]:
    return lambda r: (f"train step {name}: JAX {r['jax_s'] * 1e3:.1f} ms vs PyTorch {r['torch_s'] * 1e3:.1f} ms "
                      f"-> JAX/PyTorch {r['jax_over_torch']:.2f}; JAX compile {r['jax_compile_s']:.1f} s")


# The parts of the check, in their order, each with the line it logs (one place per part name: `--only` takes these).
LINES: dict[str, Callable[[dict[str, Any]], str]] = {
    "parity_fp32": lambda r: f"parity vs transformers (tiny, fp32): {r}",
    "step_fp32": _step_line("fp32"),
    "step_bf16": _step_line("bf16"),
    "step_bf16_cudnn": _step_line("bf16_cudnn"),
    "population_step": lambda r: (f"population step (k={r['k']}, vmap): {r['population_s'] * 1e3:.1f} ms vs {r['k']} "
                                  f"single steps {r['singles_s'] * 1e3:.1f} ms -> {r['population_over_singles']:.2f}"),
}
SECTIONS = tuple(LINES)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import jax
    import torch

    from scripts.bench_cmd import machine
    from train.heads import HeadConfig

    dev = jax.devices()[0]
    sizes = TINY if args.dry else BASE
    batch, seq, reps = (2, 16, 2) if args.dry else (args.batch, args.seq, args.reps)
    torch_device = "cuda" if torch.cuda.is_available() and not args.dry else "cpu"
    out: dict[str, Any] = {"device": f"{dev.platform}:{dev.device_kind}", "torch_device": torch_device,
                           "dry": args.dry, "machine": machine(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
                           "scan_layers": args.scan_layers}
    log = (lambda m: None) if args.quiet else (lambda m: print(f"[gpu-check] {m}", file=sys.stderr, flush=True))
    flops = step_flops(sizes["num_hidden_layers"], sizes["hidden_size"], sizes["intermediate_size"], batch, seq)
    out["step_flops"] = flops
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = _save_random_bert(Path(tmp) / "base", 30522 if not args.dry else 99, 1, **sizes)
        setup = _Setup(ckpt, HeadConfig(pooling="mean", para_head="cross", sts_head="cosine_relu"), batch, seq, reps,
                       torch_device, args.dry, flops, args.scan_layers)
        _section(out, "parity_fp32", lambda: _parity(Path(tmp)), log, args.only, args.json)
        builders: dict[str, Callable[[], Any]] = {
            "step_fp32": lambda: _StepPart(setup, "float32", "xla", None, "eager"),
            "step_bf16": lambda: _StepPart(setup, "bfloat16", "xla", torch.bfloat16, "eager")}
        if dev.platform == "gpu":
            builders["step_bf16_cudnn"] = lambda: _StepPart(setup, "bfloat16", "cudnn", torch.bfloat16, "sdpa")
        builders["population_step"] = lambda: _PopulationPart(
            setup, ckpt if args.dry else _save_random_bert(Path(tmp) / "study", 30522, 2, **STUDY))
        # build every part (models, optimizer states, batches), compile all their programs at once, then time the
        # parts one after another: the timings never overlap a compile
        parts: dict[str, Any] = {}
        for name, build in builders.items():
            if args.only is not None and name not in args.only:
                continue
            try:
                parts[name] = build()
            except Exception as e:  # noqa: BLE001 - recorded as the part's error, the other parts go on
                traceback.print_exc()
                out[name] = {"error": f"{type(e).__name__}: {e}"}
                log(f"{name} FAILED to build: {out[name]['error']}")
        t0 = time.perf_counter()
        failed = _compile_parts(parts, args.compile_jobs)
        out["compile_phase"] = {"wall_s": time.perf_counter() - t0, "jobs": args.compile_jobs,
                                "parts": {n: p.compile_s for n, p in parts.items()}}
        log(f"compiled {len(parts)} part(s) in {out['compile_phase']['wall_s']:.1f} s, {args.compile_jobs} at a time")
        for name, err in failed.items():
            out[name] = err
            log(f"{name} FAILED to compile: {err['error']}")
        for name, part in parts.items():
            _section(out, name, part.measure, log, args.only, args.json)
    peak = peak_tflops(dev.device_kind, args.peak_tflops)
    bf16 = [(out[k]["jax_s"], k) for k in out if k.startswith("step_bf16") and "jax_s" in out[k]]
    best_s, best_arm = min(bf16) if bf16 else (None, None)
    out["mfu_bf16"] = None if peak is None or best_s is None else flops / best_s / (peak * 1e12)
    out["mfu_arm"], out["peak_bf16_tflops"] = best_arm, peak
    out["failed_sections"] = [k for k, v in out.items() if isinstance(v, dict) and "error" in v]
    out["wall_s"] = time.perf_counter() - t_start
    shown = "n/a (unknown peak or no bf16 step; pass --peak-tflops)" if out["mfu_bf16"] is None else f"{out['mfu_bf16']:.1%}"
    log(f"bf16 JAX MFU ({best_arm}): {shown}; failed sections: {out['failed_sections'] or 'none'}; "
        f"total {out['wall_s']:.0f} s")
    return out


def _section(out: dict[str, Any], name: str, fn: Callable[[], dict[str, Any]], log: Callable[[str], None],
             only: tuple[str, ...] | None = None, json_path: str | None = None) -> None:
    """Run one part of the check into `out[name]` and log it; a failure is recorded as `out[name] = {"error": ...}`
    (traceback on stderr) so that one failing part (say cuDNN attention on an older driver) does not cost the rest
    of a scarce GPU session. The command still exits 1 when any part failed. With `only`, parts not named there
    are skipped. With `json_path`, the results so far are written there after every part, so a run killed at its
    time limit still leaves the parts it finished."""
    if only is not None and name not in only:
        return
    t0 = time.perf_counter()
    try:
        out[name] = fn()
        log(LINES[name](out[name]))
    except Exception as e:  # noqa: BLE001 - reported and counted, never swallowed
        traceback.print_exc()
        out[name] = {"error": f"{type(e).__name__}: {e}"}
        log(f"{name} FAILED: {out[name]['error']}")
    out[name]["part_wall_s"] = time.perf_counter() - t0
    if json_path:
        Path(json_path).write_text(json.dumps(out, indent=2, default=str))


def _gpu_check(args: argparse.Namespace) -> int:
    r = run(args)
    text = json.dumps(r, indent=2, default=str)
    if args.json:
        Path(args.json).write_text(text)
    print(text)
    return 1 if r["failed_sections"] else 0


def _sections(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown part(s) {unknown or text!r}; the parts are {', '.join(SECTIONS)}")
    return names


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gpu-check", help="the prepared GPU check: parity, JAX vs PyTorch train step fp32/bf16, MFU")
    p.add_argument("--dry", action="store_true", help="tiny shapes on any device (minutes on a CPU, mostly compiling): the CPU test of this check")
    p.add_argument("--batch", type=int, default=32, help="examples per task per step (default 32)")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--reps", type=int, default=10, help="interleaved timed steps per arm (default 10)")
    p.add_argument("--scan-layers", action="store_true",
                   help="JAX encoders as one lax.scan over the layers (one compiled layer body: shorter compiles; not yet timed on a GPU)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, if its kind is not known")
    p.add_argument("--only", type=_sections, default=None,
                   help=f"run only these parts, comma-separated, in the usual order (of {', '.join(SECTIONS)})")
    p.add_argument("--compile-jobs", type=int, default=8,
                   help="JAX programs compiled at once before the timed parts (default 8: all of them; 1: one by one)")
    p.add_argument("--json", default=None, help="also write the result here")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_gpu_check)
