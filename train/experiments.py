"""The report's study as data: every experiment of Tables 3, 5, 6, 7 and Appendix A.3, per protocol.

An experiment is a run name + `TrainConfig` overrides on top of its protocol's base. Protocols:

* `report`: the report's hyper-parameters (§5.3: batch 8, lr 1e-5, hidden dropout 0.3, AdamW wd 0,
  10 epochs over the largest task, full dev sets). Meant for a GPU.
* `cpu`: the same experiments, scaled down for 2 CPU cores with the embedded all-MiniLM-L6-v2:
  `CPU_EPOCHS` epochs of `CPU_EPOCH_STEPS` round-robin steps (batch 8; the full dev sets once, after the last
  step, as the report evaluates its final model; the learning curves are the training losses), sequences cut to `CPU_MAX_LEN` tokens, training batches length-grouped in `CPU_BUCKETS` and
  trained as per-task programs (`step_impl="split"`: `tasks x buckets + 1` compiled programs per run), dev
  batches padded to `CPU_EVAL_BUCKETS`, every learning rate multiplied by `CPU_LR_SCALE` (so the 1e-5 ... 6e-5 sweep becomes
  4e-5 ... 2.4e-4: with ~20x fewer updates than the report's 10 epochs the report's rates barely move
  the model), mean pooling instead of the [CLS] pooler (all-MiniLM-L6-v2 was trained as a mean-pooled
  sentence encoder: measured on this CPU, 150 summed-loss steps reach SST 0.443 / para 0.680 with mean
  pooling, while the [CLS] pooler still predicts the majority class of SST and Quora after 500 steps),
  the full dev sets, and `dtype=auto` (bf16 matmuls where the CPU has bf16 dot instructions). Everything else
  (batch size, dropout, losses, heads, optimizer, task sampling) is the report's.

Runs whose configs differ only in `train.population.MEMBER_FIELDS` (learning rate, dropout, seed, sum vs
mean) train together as one population (`population_groups`); the others (PCGrad, cosine heads,
single-task runs) each as their own program.

Run names are the members that `ensembles/report.yaml` refers to.
"""

from __future__ import annotations

import dataclasses
from typing import Any

CPU_EPOCHS = 2
CPU_EPOCH_STEPS = 300  # 600 steps per run; a full-dev evaluation of a multitask run: 39 s of 2 cores (model 17)
CPU_LR_SCALE = 4.0
CPU_MAX_LEN = 32
# length-grouped training batches in these buckets, per-task programs (populations too): 1.50x fewer padded tokens
# than one bucket of 32 and a 1.45x faster population step (README "Reproducing the report")
CPU_BUCKETS = [16, 24, 32]
CPU_LENGTH_WINDOW = 32
# the dev sets padded to these lengths (length-sorted batches): a full-dev evaluation ~1.7x faster than all at 32
CPU_EVAL_BUCKETS = [8, 16, 24, 32]
BASE_LR = 1e-5
# bf16 matmuls on CPUs with avx512_bf16 or AMX (and on accelerators), fp32 elsewhere (`bert_jax.matmul.auto_dtype`):
# measured on the 2-core Intel family 6 model 207, the study's step (batch 8, seq 24) takes 0.75x its fp32 time
CPU_DTYPE = "auto"


@dataclasses.dataclass(frozen=True)
class Experiment:
    name: str
    table: str  # where the report shows it
    label: str  # the report's row label
    overrides: dict[str, Any]


def _single(task: str, finetune: bool) -> dict[str, Any]:
    return {"tasks": [task], "finetune": finetune}


EXPERIMENTS: tuple[Experiment, ...] = (
    Experiment("sst-finetune", "3", "Baseline: Sentiment Fine-tuned", _single("sst", True)),
    Experiment("sst-pretrain", "3", "Sentiment Pretrained", _single("sst", False)),
    Experiment("sum", "3", "Sum Losses", {}),
    Experiment("pcgrad", "3", "Gradient Surgery", {"combine": "pcgrad"}),
    Experiment("cosine", "3", "Cosine Similarity + CE on para (+MSE on STS)",
               {"heads": {"para_head": "cosine", "sts_head": "cosine"}}),
    Experiment("cosine-mse", "3", "Cosine Similarity + MSE on para (+MSE on STS)",
               {"heads": {"para_head": "cosine_mse", "sts_head": "cosine"}}),
    Experiment("sum-seed1", "noise", "Sum Losses, seed 1 (the noise band)", {"seed": 1}),
    Experiment("mean", "A.1", "average losses", {"combine": "mean"}),
    Experiment("sum-drop0.4", "A.1", "sum losses, 0.4 dropout", {"hidden_dropout": 0.4}),
    Experiment("mean-drop0.4", "A.1", "average losses, 0.4 dropout", {"combine": "mean", "hidden_dropout": 0.4}),
    *(Experiment(f"lr{k}e-5", "7", f"{k}e-5", {"lr": k * BASE_LR}) for k in (2, 3, 4, 5, 6)),
    Experiment("para-finetune", "A.3", "Paraphrase Finetune", _single("para", True)),
    Experiment("para-pretrain", "A.3", "Paraphrase Pretrain", _single("para", False)),
    Experiment("sts-finetune", "A.3", "Semantic Similarity Finetune", _single("sts", True)),
    Experiment("sts-pretrain", "A.3", "Semantic Similarity Pretrain", _single("sts", False)),
    Experiment("cfimdb-finetune", "4.2", "CFIMDB Fine-tuned", _single("cfimdb", True)),
    Experiment("cfimdb-pretrain", "4.2", "CFIMDB Pretrained", _single("cfimdb", False)),
)

# The minBERT handout's reference dev accuracies (bert-base, mean of 10 seeds), beside §4.2's baseline rows.
HANDOUT_DEV: dict[str, dict[str, float]] = {
    "sst-pretrain": {"sst": 0.391}, "sst-finetune": {"sst": 0.515}, "cfimdb-finetune": {"cfimdb": 0.966},
}

# Soups average the weights of runs that share one architecture (pair heads, all three tasks trained).
SOUP_MEMBERS = ("sum", "mean", "sum-drop0.4", "mean-drop0.4", "lr2e-5", "lr3e-5", "lr4e-5", "lr5e-5", "lr6e-5", "pcgrad")

# The report's numbers (dev), for the comparison tables: name -> (sst, para, sts, overall).
REPORT_DEV: dict[str, tuple[float | None, ...]] = {
    "sst-finetune": (0.517, 0.414, -0.098, 0.461),
    "sst-pretrain": (0.391, 0.609, -0.111, None),
    "sum": (0.518, 0.757, 0.444, 0.666),
    "pcgrad": (0.513, 0.748, 0.475, 0.666),
    "cosine": (None, 0.732, 0.559, None),  # para from "Cosine + CE", sts from "Cosine + MSE"
    "cosine-mse": (None, 0.590, 0.559, None),  # para from "Cosine + MSE"
    "sum-seed1": (0.518, 0.757, 0.444, 0.666),  # the report's single Sum Losses run
    "mean": (0.514, 0.753, 0.444, 0.664),
    "sum-drop0.4": (0.505, 0.752, 0.456, 0.665),
    "mean-drop0.4": (0.509, 0.753, 0.473, 0.666),
    "lr2e-5": (0.515, 0.756, 0.490, 0.672),
    "lr3e-5": (0.515, 0.749, 0.516, 0.674),
    "lr4e-5": (0.513, 0.752, 0.545, 0.679),
    "lr5e-5": (0.490, 0.751, 0.557, 0.673),
    "lr6e-5": (0.463, 0.755, 0.550, 0.665),
    "para-finetune": (0.224, 0.813, -0.056, None),
    "para-pretrain": (0.144, 0.657, -0.011, None),
    "sts-finetune": (0.120, 0.593, 0.400, None),
    "sts-pretrain": (0.144, 0.609, 0.267, None),
    "ensemble1": (0.517, 0.813, 0.400, 0.676),
    "ensemble2": (0.518, 0.813, 0.557, 0.703),
    "ensemble3": (0.517, 0.821, 0.550, 0.704),
    "ensemble4": (0.523, 0.759, 0.521, 0.681),
    "ensemble5": (0.520, 0.762, 0.598, 0.693),
    "ensemble6": (0.521, 0.819, 0.575, 0.709),
    "ensemble7": (0.528, 0.820, 0.587, 0.714),
}


def protocol_base(protocol: str) -> tuple[str, dict[str, Any], float]:
    """(preset, base overrides, lr scale) of a protocol."""
    if protocol == "report":
        return "report", {}, 1.0
    if protocol == "cpu":
        return "report", {"epochs": CPU_EPOCHS, "epoch_policy": CPU_EPOCH_STEPS, "max_len": CPU_MAX_LEN,
                          "buckets": CPU_BUCKETS, "length_window": CPU_LENGTH_WINDOW, "step_impl": "split",
                          "eval_buckets": CPU_EVAL_BUCKETS, "heads": {"pooling": "mean"},
                          "eval_batch_size": 128, "eval_every": CPU_EPOCHS, "dtype": CPU_DTYPE}, CPU_LR_SCALE
    if protocol == "tiny":  # for tests: a few steps on tiny data
        return "report", {"epochs": 2, "epoch_policy": 1, "max_len": 32, "buckets": [32], "dev_limit": 16,
                          "batch_size": 4, "eval_batch_size": 16}, 1.0
    raise ValueError(f"unknown protocol {protocol!r} (report, cpu or tiny)")


def experiment_config_dict(protocol: str, exp: Experiment, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The full config of one experiment under a protocol, in `TrainConfig.flat()` form (`optim.lr`, ...)."""
    from train.config import PRESETS, TrainConfig, merge, normalize

    preset, base, lr_scale = protocol_base(protocol)
    d = TrainConfig().to_dict()
    for part in (PRESETS[preset], base, extra or {}, exp.overrides):
        d = merge(d, normalize(part))
    cfg = TrainConfig.from_dict(d)
    return cfg.with_values({"optim.lr": cfg.optim.lr * lr_scale}).flat()


def population_groups(configs: dict[str, dict[str, Any]]) -> list[list[str]]:
    """Experiment names grouped into populations: configs equal but for `train.population.MEMBER_FIELDS` (and
    combining losses linearly, or all by the same method); in `configs` order."""
    from train import combine as combine_methods
    from train.population import MEMBER_FIELDS

    groups: dict[str, list[str]] = {}
    for name, d in configs.items():
        linear = combine_methods.get(d.get("combine", "sum")).loss_weight is not None
        key = repr(sorted((k, repr(v)) for k, v in d.items() if k not in MEMBER_FIELDS or (k == "combine" and not linear)))
        groups.setdefault(key, []).append(name)
    return list(groups.values())


def split_groups(groups: list[list[str]], parts: int) -> list[list[str]]:
    """Each population of `groups` cut into `parts` contiguous populations of near-equal size (one per worker, so
    that parallel workers finish together: `bert-jax experiments --workers`); `parts` <= 1 keeps them whole."""
    out: list[list[str]] = []
    for g in groups:
        n = max(1, min(parts, len(g)))
        bounds = [round(i * len(g) / n) for i in range(n + 1)]
        out += [g[a:b] for a, b in zip(bounds, bounds[1:])]
    return out


def protocol_summary(protocol: str) -> str:
    """One line for REPORT.md: the training settings of the protocol's summed-loss run."""
    _, _, scale = protocol_base(protocol)
    d = experiment_config_dict(protocol, next(e for e in EXPERIMENTS if e.name == "sum"))
    policy, epochs = d["data.epoch_policy"], d["data.epochs"]
    steps = (f"{epochs} epoch(s) of {policy} round-robin steps" if isinstance(policy, int)
             else f"{epochs} epochs (an epoch: the {'largest' if policy == 'max' else 'smallest'} task once)")
    return (f"batch {d['data.batch_size']} per task, {steps}, learning rates = the report's × {scale:g} (Sum Losses: "
            f"{d['optim.lr']:g}), AdamW weight decay {d['optim.weight_decay']:g}, hidden dropout "
            f"{d['model.hidden_dropout']:g}, sequences ≤ {d['data.max_len']} tokens, {d['heads.pooling']} pooling")
