"""The PyTorch baseline of the multitask minBERT: the model `train/` trains, written independently in torch.

Kept small and separate from the JAX code: it imports nothing from `train/` at module level, only
`bert_jax.convert`'s name mapping (to copy JAX parameters in and read gradients out). Semantics
mirror the JAX implementation exactly:

* encoder: transformers' `BertModel` (with its pooler) loaded from the same checkpoint directory;
  `attn_implementation="eager"` by default: on this CPU (2-core AMD EPYC, torch 2.13) it was the
  faster of the two for the benchmarked train step, by 0.6% (batch 8, seq 32) and 1.8% (seq 64),
  medians of 10 interleaved steps each; "sdpa" is available. Token types all 0.
* heads (`train/heads.py`): sentence embedding = pooler output ("cls") or masked mean ("mean");
  sst / cfimdb: linear over the dropped-out embedding; para / sts "pair": linear over the
  dropped-out ``[u, v, |u-v|, u*v]``; "cosine": ``scale * cos + bias`` (para), ``2.5 (1 + cos)``
  (sts), "cosine_relu": ``5 max(cos, 0)`` (sts), norms clamped at 1e-8 (as ``sqrt(max(||x||^2, 1e-16))``);
  "cross": the pair as one ``[CLS] a [SEP] b [SEP]`` sequence with its token types, linear over its
  dropped-out embedding. Head dropout rate = the encoder's hidden dropout. Siamese pair tasks run both
  sentences through the encoder as one ``[2B, L]`` batch.
* losses (`train/losses.py`): CE (sst, cfimdb), BCE-with-logits (para), MSE (sts), each a masked
  mean over ``batch["valid"]``: ``sum(loss * valid) / max(sum(valid), 1)``.
* combine: ``sum`` / ``mean`` of the task losses, or PCGrad (`pcgrad_combine`, a naive per-task
  loop over flattened encoder gradients; heads get the sum of their task gradients).
* optimizer: `CS224NAdamW`, the CS224N minBERT update (see its docstring); per-group ``lr_scale``
  multipliers (head lr, layer-wise decay) and a per-step learning rate (`make_torch_step(lr_at=...)`).

Batches are the numpy dicts of `train.data.make_batch` (``{task: batch}`` per step).

Parameter names: the JAX tree is ``{"bert": bert_jax tree, "heads": {task: {...}}}``;
`load_jax_params` copies such a tree in and `to_jax_tree` reads params or grads back out in that
layout (Dense kernels [in, out] <-> torch Linear weights [out, in]).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from train.heads import COSINE_LOGIT_SCALE, HeadConfig
from train.tasks import get_task


@dataclasses.dataclass(frozen=True)
class TorchSpec:
    """What the JAX `ModelSpec` + `TrainConfig` fix for the model (dropouts, heads, attention kernel)."""

    checkpoint_dir: str
    heads: tuple[str, ...] = ("sst", "para", "sts")
    pooling: str = "cls"
    para_head: str = "pair"
    sts_head: str = "pair"
    hidden_dropout: float = 0.3
    attention_dropout: float | None = None  # None: the checkpoint's value
    attn_implementation: str = "eager"  # "eager" | "sdpa"
    ranking_weight: float = 0.0  # in-batch negatives on binary Siamese pair tasks (train.heads.HeadConfig)
    ranking_scale: float = 20.0

    @functools.cached_property
    def head_config(self) -> HeadConfig:
        """The JAX model's `HeadConfig` of these heads: one definition of head kinds and of where the ranking term
        applies."""
        return HeadConfig(pooling=self.pooling, para_head=self.para_head, sts_head=self.sts_head, heads=self.heads,
                          ranking_weight=self.ranking_weight, ranking_scale=self.ranking_scale)


class TorchMultitask(nn.Module):
    """`BertModel` + task heads. `scores(task, batch)` mirrors `train.heads.task_scores`."""

    def __init__(self, spec: TorchSpec):
        super().__init__()
        from transformers import BertModel

        overrides: dict[str, Any] = {"hidden_dropout_prob": spec.hidden_dropout}
        if spec.attention_dropout is not None:
            overrides["attention_probs_dropout_prob"] = spec.attention_dropout
        self.spec = spec
        self.bert = BertModel.from_pretrained(
            str(spec.checkpoint_dir), attn_implementation=spec.attn_implementation, dtype=torch.float32, **overrides
        )
        h = self.bert.config.hidden_size
        self.drop = nn.Dropout(spec.hidden_dropout)
        heads = {}
        for task in spec.heads:
            kind = self._kind(task)
            if kind == "single":
                heads[task] = nn.Linear(h, max(get_task(task).num_classes, 1))
            elif kind == "cross":
                heads[task] = nn.Linear(h, 1)
            elif kind == "pair":
                heads[task] = nn.Linear(4 * h, 1)
            elif kind == "cosine" and get_task(task).kind == "binary":  # cosine: a logit
                m = nn.Module()
                m.scale = nn.Parameter(torch.tensor(COSINE_LOGIT_SCALE))
                m.bias = nn.Parameter(torch.tensor(-0.5 * COSINE_LOGIT_SCALE))
                heads[task] = m
            elif kind in ("cosine", "cosine_relu", "cosine_mse"):  # no parameters
                heads[task] = nn.Module()
            else:
                raise ValueError(f"unknown {task} head {kind!r}")
        self.heads = nn.ModuleDict(heads)

    def _kind(self, task: str) -> str:
        return self.spec.head_config.kind(task)

    def _embed(self, ids: torch.Tensor, mask: torch.Tensor, types: torch.Tensor | None = None) -> torch.Tensor:
        out = self.bert(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids) if types is None else types)
        if self.spec.pooling == "cls":
            return out.pooler_output
        m = mask.to(out.last_hidden_state.dtype)[..., None]
        return (out.last_hidden_state * m).sum(1) / m.sum(1).clamp_min(1.0)

    def scores(self, task: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """sst [B, 5] / cfimdb [B, 2] logits, para logit [B], sts score [B]."""
        return self.outputs(task, batch)[0]

    def loss(self, task: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """`task`'s training loss (scores in float32), with the in-batch ranking term where the JAX model has it."""
        scores, pair = self.outputs(task, batch)
        loss = task_loss(task, scores.float(), batch, self._kind(task))
        if self.spec.head_config.ranks(task):
            loss = loss + self.spec.ranking_weight * in_batch_ranking(*pair, batch["labels"], batch["valid"],
                                                                      self.spec.ranking_scale)
        return loss

    def outputs(self, task: str, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """(`scores`, the Siamese pair head's embeddings (u, v) or None), as `train.heads.task_outputs`."""
        head, kind, spec = self.heads[task], self._kind(task), get_task(task)
        if kind == "single":
            out = head(self.drop(self._embed(batch["input_ids"], batch["attention_mask"])))
            return (out if spec.kind == "classes" else out[:, 0]), None
        if kind == "cross":
            emb = self._embed(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
            return head(self.drop(emb))[:, 0], None
        ids = torch.cat([batch["input_ids_1"], batch["input_ids_2"]], 0)
        mask = torch.cat([batch["attention_mask_1"], batch["attention_mask_2"]], 0)
        u, v = self._embed(ids, mask).chunk(2, 0)
        return self._pair_scores(head, kind, spec, u, v), (u, v)

    def _pair_scores(self, head: nn.Module, kind: str, spec, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if kind in ("cosine", "cosine_relu", "cosine_mse"):
            eps = 1e-8
            norm = lambda x: (x * x).sum(-1).clamp_min(eps * eps).sqrt()  # = max(||x||, eps); zero grad at x = 0
            cos = (u * v).sum(-1) / (norm(u) * norm(v))
            lo, hi = spec.label_range
            if kind == "cosine_relu":
                return hi * torch.relu(cos)
            if kind == "cosine_mse":
                return cos - 0.5
            return head.scale * cos + head.bias if spec.kind == "binary" else (hi - lo) / 2 * (1.0 + cos) + lo
        feats = self.drop(torch.cat([u, v, (u - v).abs(), u * v], -1))
        return head(feats)[:, 0]


def task_loss(task: str, scores: torch.Tensor, batch: dict[str, torch.Tensor], head: str | None = None) -> torch.Tensor:
    """Masked mean over valid rows of CE (sst, cfimdb) / BCE-with-logits (para) / MSE (sts), by the task's kind;
    the "cosine_mse" head: MSE of cos (= score + 1/2) against the 0/1 label."""
    labels, valid, kind = batch["labels"], batch["valid"], get_task(task).kind
    if head == "cosine_mse":
        per_row = (scores + 0.5 - labels.float()) ** 2
    elif kind == "classes":
        per_row = F.cross_entropy(scores, labels.long(), reduction="none")
    elif kind == "binary":
        per_row = F.binary_cross_entropy_with_logits(scores, labels.float(), reduction="none")
    else:
        per_row = (scores - labels.float()) ** 2
    return (per_row * valid).sum() / valid.sum().clamp_min(1.0)


def in_batch_ranking(u: torch.Tensor, v: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """`train.losses.in_batch_ranking` in torch: cross-entropy of scale * cos(u_i, v_j) over valid j, target i,
    averaged over the valid rows with label 1."""
    logits = scale * F.normalize(u.float(), dim=-1, eps=1e-8) @ F.normalize(v.float(), dim=-1, eps=1e-8).T
    logits = logits.masked_fill(valid[None, :] <= 0, -1e9)
    per_row = F.cross_entropy(logits, torch.arange(len(u)), reduction="none")
    anchors = valid * (labels > 0.5).float()
    return (per_row * anchors).sum() / anchors.sum().clamp_min(1.0)


def pcgrad_combine(
    task_grads: Sequence[Sequence[torch.Tensor]],
    orders: Sequence[Sequence[int]] | None = None,
    reduction: str = "sum",
) -> tuple[list[torch.Tensor], int]:
    """Naive PCGrad (Yu et al. 2020) over per-task gradient lists (same tensors order per task).

    Each task's gradient is flattened into one vector ``g_i``; then for every task ``i``
    ``g_i' = g_i`` and, for ``j`` in ``orders[i]`` (default ``0..T-1``; ``j == i`` is skipped), if
    ``g_i' . g_j < 0`` and ``||g_j|| > 0``: ``g_i' -= (g_i' . g_j / ||g_j||^2) g_j`` (``g_j`` the
    ORIGINAL gradient). Returns (the sum or mean of the ``g_i'`` split back into tensors, the number
    of projections made).
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    T = len(task_grads)
    flat = [torch.cat([g.reshape(-1) for g in gs]) for gs in task_grads]
    projections = 0
    total = torch.zeros_like(flat[0])
    for i in range(T):
        g = flat[i].clone()
        for j in (range(T) if orders is None else orders[i]):
            j = int(j)
            if j == i:
                continue
            dot = torch.dot(g, flat[j])
            nj = torch.dot(flat[j], flat[j])
            if dot < 0 and nj > 0:
                g = g - (dot / nj) * flat[j]
                projections += 1
        total = total + g
    if reduction == "mean":
        total = total / T
    out, k = [], 0
    for g in task_grads[0]:
        out.append(total[k : k + g.numel()].view_as(g))
        k += g.numel()
    return out, projections


class CS224NAdamW(torch.optim.Optimizer):
    """The CS224N minBERT AdamW (`optimizer.py` of the course), float32, per step t from 1::

        m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
        alpha_t = lr * sqrt(1 - b2^t) / (1 - b1^t)
        p = p - alpha_t * m / (sqrt(v) + eps)       # eps on the UNcorrected sqrt(v)
        p = p - lr * wd * p                         # decoupled decay, a separate subtraction

    (the bias corrections are computed in float64 on the host). A param group's ``lr_scale`` (default 1)
    multiplies its Adam step, not its decay (as `train.optim.scale_by_tree` in the JAX chain).
    """

    def __init__(self, params: Iterable, lr: float = 1e-5, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, lr_scale=1.0))

    @torch.no_grad()
    def step(self, closure: Callable | None = None):  # type: ignore[override]
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if not self.state[p]:
                    self.state[p].update(t=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                self.state[p]["t"] += 1
            ts = {self.state[p]["t"] for p in params}
            groups = [[p for p in params if self.state[p]["t"] == t] for t in sorted(ts)]
            for ps in groups:  # one group unless parameters joined late; multi-tensor (foreach) kernels
                t = self.state[ps[0]]["t"]
                grads = [p.grad for p in ps]
                ms = [self.state[p]["m"] for p in ps]
                vs = [self.state[p]["v"] for p in ps]
                torch._foreach_mul_(ms, b1)
                torch._foreach_add_(ms, grads, alpha=1.0 - b1)
                torch._foreach_mul_(vs, b2)
                torch._foreach_addcmul_(vs, grads, grads, value=1.0 - b2)
                alpha = lr * group["lr_scale"] * math.sqrt(-math.expm1(t * math.log(b2))) / -math.expm1(t * math.log(b1))
                denom = torch._foreach_sqrt(vs)
                torch._foreach_add_(denom, eps)
                torch._foreach_addcdiv_(ps, ms, denom, value=-alpha)
                if wd:
                    torch._foreach_sub_(ps, torch._foreach_mul(ps, lr * wd))
        return None


def to_torch_batch(batch: dict[str, np.ndarray], device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """numpy batch (int32 ids / masks / token types, labels, valid) -> torch tensors (ids, masks and types as
    int64), on `device` (default: the CPU)."""
    out = {}
    for k, v in batch.items():
        t = torch.from_numpy(np.asarray(v))
        t = t.long() if k.startswith(("input_ids", "attention_mask", "token_type_ids")) else t
        out[k] = t if device is None else t.to(device, non_blocking=True)
    return out


def task_losses(model: TorchMultitask, batches: dict[str, dict[str, torch.Tensor]], tasks: Sequence[str]
                ) -> dict[str, torch.Tensor]:
    """Each task's loss on its (torch) batch, scores in float32 (as under autocast)."""
    return {t: model.loss(t, batches[t]) for t in tasks}


def make_torch_step(
    model: TorchMultitask,
    opt: torch.optim.Optimizer,
    tasks: Sequence[str],
    combine: str = "sum",
    pcgrad_reduction: str = "sum",
    pcgrad_orders: Callable[[int], Sequence[Sequence[int]] | None] | None = None,
    grad_clip: float | None = None,
    lr_at: Callable[[int], float] | None = None,
    device: str | torch.device | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> Callable[[dict[str, dict[str, np.ndarray]]], dict[str, float]]:
    """A `step(batches) -> metrics` doing forward, backward, combine and the optimizer update.

    `batches` maps every task in `tasks` to a numpy batch. Dropout is active when the model is in
    train mode. ``combine``: "sum" | "mean" | "pcgrad". ``pcgrad_orders(step_index)`` may give the
    task visiting order of every task (default: fixed order ``0..T-1``). After the call the applied
    gradients are in ``p.grad``. Metrics: ``loss_<task>``, ``loss`` (sum), ``pcgrad_projections``.
    ``lr_at(step_index)``: the learning rate of each update (step 0 first; default: the optimizer's own).
    ``device``: where the batches go (the model's device). ``autocast_dtype`` (e.g. ``torch.bfloat16``):
    forward under ``torch.autocast`` (mixed precision, fp32 parameters and optimizer), as JAX's ``dtype``.
    """
    if combine not in ("sum", "mean", "pcgrad"):
        raise ValueError(f"combine must be sum, mean or pcgrad, got {combine!r}")
    shared = [p for p in model.bert.parameters() if p.requires_grad]
    trainable = [p for p in model.parameters() if p.requires_grad]
    counter = {"step": 0}

    def step(batches: dict[str, dict[str, np.ndarray]]) -> dict[str, float]:
        opt.zero_grad(set_to_none=True)
        tb = {t: to_torch_batch(batches[t], device) for t in tasks}
        metrics: dict[str, float] = {}
        if combine in ("sum", "mean"):
            with torch.autocast(device_type=torch.device(device or "cpu").type, dtype=autocast_dtype or torch.float32,
                                enabled=autocast_dtype is not None):
                losses = task_losses(model, tb, tasks)
            total = sum(losses.values())
            (total / len(tasks) if combine == "mean" else total).backward()
        else:
            losses, per_task = {}, []
            for t in tasks:
                losses[t] = model.loss(t, tb[t])
                head = [p for p in model.heads[t].parameters() if p.requires_grad]
                grads = torch.autograd.grad(losses[t], shared + head, allow_unused=True)
                grads = [torch.zeros_like(p) if g is None else g for p, g in zip(shared + head, grads)]
                per_task.append(grads[: len(shared)])
                for p, g in zip(head, grads[len(shared):]):
                    p.grad = g if p.grad is None else p.grad + g
            orders = None if pcgrad_orders is None else pcgrad_orders(counter["step"])
            combined, n_proj = pcgrad_combine(per_task, orders, pcgrad_reduction)
            for p, g in zip(shared, combined):
                p.grad = g
            metrics["pcgrad_projections"] = float(n_proj)
        for p in trainable:  # as in JAX, every trainable parameter gets an update (zero grad: decay only)
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
        if lr_at is not None:
            for group in opt.param_groups:
                group["lr"] = lr_at(counter["step"])
        opt.step()
        counter["step"] += 1
        metrics.update({f"loss_{t}": float(l.detach()) for t, l in losses.items()})
        metrics["loss"] = float(sum(l.detach() for l in losses.values()))
        return metrics

    return step


# ------------------------------------------------------------------------------ JAX <-> torch params


def _bert_names(jax_bert_tree: dict) -> list[tuple[tuple[str, ...], str, bool]]:
    """(JAX path, torch BertModel name, transpose?) for every leaf of the JAX encoder tree."""
    from flax.traverse_util import flatten_dict

    from bert_jax.convert import jax_to_hf_name

    return [(path, *jax_to_hf_name(path)) for path in flatten_dict(jax_bert_tree)]


def _head_names(model: TorchMultitask) -> list[tuple[tuple[str, ...], str, bool]]:
    out = []
    for task, head in model.heads.items():
        if isinstance(head, nn.Linear):
            out += [(("heads", task, "kernel"), f"heads.{task}.weight", True), (("heads", task, "bias"), f"heads.{task}.bias", False)]
        else:
            out += [(("heads", task, n), f"heads.{task}.{n}", False) for n, _ in head.named_parameters()]
    return out


def _mapping(model: TorchMultitask, jax_bert_tree: dict) -> list[tuple[tuple[str, ...], str, bool]]:
    bert = [(("bert",) + path, f"bert.{name}", tr) for path, name, tr in _bert_names(jax_bert_tree)]
    return bert + _head_names(model)


def param_groups(model: TorchMultitask, jax_bert_tree: dict, lr_scale: dict | None = None) -> list[dict]:
    """Trainable parameters as optimizer param groups, one per distinct learning-rate multiplier.

    ``lr_scale``: a tree in the JAX layout (``train.optim.lr_multipliers``) of floats; None = one group."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if lr_scale is None:
        return [{"params": trainable}]
    from flax.traverse_util import flatten_dict

    flat = flatten_dict(lr_scale)
    named = dict(model.named_parameters())
    groups: dict[float, list] = {}
    for path, name, _ in _mapping(model, jax_bert_tree):
        if named[name].requires_grad:
            groups.setdefault(float(flat[path]), []).append(named[name])
    return [{"params": ps, "lr_scale": s} for s, ps in groups.items()]


@torch.no_grad()
def load_jax_params(model: TorchMultitask, params: dict) -> None:
    """Copy a JAX tree ``{"bert": ..., "heads": ...}`` into the torch model (every parameter must be covered)."""
    from flax.traverse_util import flatten_dict

    flat = flatten_dict(params)
    named = dict(model.named_parameters())
    covered = set()
    for path, name, transpose in _mapping(model, params["bert"]):
        value = np.asarray(flat[path], dtype=np.float32)
        value = value.T if transpose else value
        if tuple(named[name].shape) != value.shape:
            raise ValueError(f"{name}: torch shape {tuple(named[name].shape)} != JAX {value.shape} ({'/'.join(path)})")
        named[name].copy_(torch.from_numpy(np.array(value, dtype=np.float32, order="C")))
        covered.add(name)
    missing = sorted(set(named) - covered)
    if missing:
        raise ValueError(f"torch parameters not covered by the JAX tree: {missing}")


def to_jax_tree(model: TorchMultitask, jax_bert_tree: dict, what: str = "param") -> dict:
    """The torch model's params (``what="param"``) or grads (``"grad"``) as a numpy tree in the JAX layout."""
    from flax.traverse_util import unflatten_dict

    named = dict(model.named_parameters())
    flat = {}
    for path, name, transpose in _mapping(model, jax_bert_tree):
        t = named[name] if what == "param" else named[name].grad
        value = np.zeros(tuple(named[name].shape), np.float32) if t is None else t.detach().numpy().astype(np.float32)
        flat[path] = value.T if transpose else value
    tree = unflatten_dict(flat)
    for task, head in model.heads.items():  # parameter-less heads (sts cosine) are {} in JAX
        tree.setdefault("heads", {}).setdefault(task, {})
    return tree


def build_model(
    checkpoint: str | Path,
    tasks: Sequence[str] = ("sst", "para", "sts"),
    *,
    pooling: str = "cls",
    para_head: str = "pair",
    sts_head: str = "pair",
    hidden_dropout: float = 0.3,
    attention_dropout: float | None = None,
    attn_implementation: str = "eager",
    jax_params: dict | None = None,
    ranking_weight: float = 0.0,
    ranking_scale: float = 20.0,
) -> TorchMultitask:
    """The torch model from `checkpoint` ("embedded" or a HF BERT directory), optionally with JAX params copied in."""
    from bert_jax.convert import resolve_checkpoint

    spec = TorchSpec(str(resolve_checkpoint(checkpoint)), tuple(tasks), pooling, para_head, sts_head,
                     hidden_dropout, attention_dropout, attn_implementation, ranking_weight, ranking_scale)
    model = TorchMultitask(spec)
    if jax_params is not None:
        load_jax_params(model, jax_params)
    return model


def train_torch(cfg, data_dir: Path, log: Callable[[str], None] = lambda msg: None) -> dict[str, float]:
    """Train this baseline exactly as `train.trainer.train` schedules JAX (`bert-jax train --framework torch`):
    same initial weights (the JAX init for `cfg.seed`, copied in), same round-robin plan, same batches,
    CS224N AdamW with the same learning-rate schedule and multipliers, gradient clipping; then dev metrics
    of the final model. Returns the metrics. `log` gets a progress line every 100 steps."""
    import jax

    from train.metrics import summarize, task_metric
    from train.optim import lr_multipliers, make_schedule
    from train.step import init_model
    from train.trainer import load_run_data, predict_scores

    torch.manual_seed(cfg.seed)
    data = load_run_data(cfg, data_dir)  # the JAX trainer's data, subsets and step schedule
    dev_sets, sched, total = data.dev, data.sched, data.total
    _, params = init_model(cfg, jax.random.fold_in(jax.random.key(cfg.seed), 0))
    model = build_model(cfg.checkpoint, cfg.heads.heads, pooling=cfg.heads.pooling, para_head=cfg.heads.para_head,
                        sts_head=cfg.heads.sts_head, hidden_dropout=cfg.model.hidden_dropout,
                        attention_dropout=cfg.model.attention_dropout, jax_params=jax.device_get(params),
                        ranking_weight=cfg.heads.ranking_weight, ranking_scale=cfg.heads.ranking_scale)
    scales = None
    if cfg.optim.head_lr_scale != 1.0 or cfg.optim.layer_lr_decay != 1.0:
        scales = lr_multipliers(params, cfg.optim.head_lr_scale, cfg.optim.layer_lr_decay)
    opt = CS224NAdamW(param_groups(model, params["bert"], scales), lr=cfg.optim.lr, betas=(cfg.optim.b1, cfg.optim.b2),
                      eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    schedule = make_schedule(dataclasses.replace(cfg.optim, total_steps=total))
    step = make_torch_step(model, opt, cfg.tasks, cfg.combine, cfg.pcgrad_reduction, grad_clip=cfg.optim.grad_clip,
                           lr_at=lambda i: float(schedule(i)))
    decay = cfg.optim.ema_decay  # the moving average of the weights (train.optim.track_ema), the model when kept
    ema = {n: p.detach().clone() for n, p in model.named_parameters()} if decay else None
    model.train()
    t0 = time.perf_counter()
    for g, batches in sched.batches(0, total):
        m = step(batches)
        if ema is not None:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    ema[n].mul_(decay).add_(p.detach(), alpha=1.0 - decay)
        if (g + 1) % 100 == 0:
            log(f"[torch] step {g + 1}/{total}: loss {m['loss']:.4f}, {(g + 1) / (time.perf_counter() - t0):.2f} steps/s")
    model.eval()
    eval_fn = lambda _params, task, batch: model.scores(task, to_torch_batch(batch)).float().numpy()  # noqa: E731

    def dev() -> dict[str, float]:
        with torch.inference_mode():
            return summarize({t: task_metric(t, predict_scores(eval_fn, None, enc, cfg.data.eval_batch_size,
                                                                cfg.data.scoring_buckets), enc.labels)
                              for t, enc in dev_sets.items()})

    if ema is None:
        return dev()
    raw = dev()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(ema[n])
    return {**dev(), **{f"raw_{k}": v for k, v in raw.items()}}
