"""Training configuration: a frozen dataclass, named presets, YAML files and `key=value` overrides."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from bert_jax import matmul
from bert_jax.config import BERT_JAX_OPTIONS, BertConfig
from train import combine as combine_methods
from train.heads import HeadConfig
from train.optim import OptimConfig
from train.tasks import TASKS



@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The encoder's run-time options: overrides of the checkpoint's `BertConfig`, built by `build`."""

    hidden_dropout: float = 0.3
    attention_dropout: float | None = None  # None: the checkpoint's value
    # compute dtype: "float32", "bfloat16", "float16", or "auto" (`bert_jax.matmul.auto_dtype`: bf16 on GPUs, TPUs
    # and CPUs with bf16 dot instructions (avx512_bf16, AMX), else fp32); a run resolves "auto" before it writes
    # config.yaml (`TrainConfig.resolve_dtype`)
    dtype: str = "float32"
    attention_impl: str = "xla"  # "xla" | "cudnn" (no attention dropout, bf16 / fp16 only)
    remat: bool = False
    scan_layers: bool = False  # encoder layers as one lax.scan: shorter compiles

    def build(self, bert: BertConfig) -> BertConfig:
        """The checkpoint's `bert` config with this run's dropout rates and execution options."""
        overrides: dict[str, Any] = {k: getattr(self, k) for k in BERT_JAX_OPTIONS}  # same names in BertConfig
        if self.dtype == "auto":
            overrides["dtype"] = matmul.auto_dtype()
        overrides["hidden_dropout_prob"] = self.hidden_dropout
        if self.attention_dropout is not None:
            overrides["attention_probs_dropout_prob"] = self.attention_dropout
        if self.attention_impl == "cudnn":  # cuDNN attention has no dropout (see bert_jax/attention.py)
            overrides["attention_probs_dropout_prob"] = 0.0
        return bert.replace(**overrides)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The data and its step schedule: batch sizes, epochs, lengths and buckets."""

    batch_size: int = 8
    task_batch_size: dict[str, int] = dataclasses.field(default_factory=dict)  # per-task batch size overrides
    eval_batch_size: int = 64
    epochs: int = 10
    epoch_policy: str | int = "max"  # steps per epoch: "max" / "min" over task sizes, or an int
    max_steps: int | None = None  # stop after this many steps in total (CLI --steps)
    train_limit: int | None = None  # use only the first N shuffled training examples per task
    dev_limit: int | None = None  # evaluate on the first N dev examples per task (None = all)
    max_len: int = 128
    buckets: tuple[int, ...] = (16, 32, 64, 128)
    align_buckets: bool = False  # pad all tasks of a step to one bucket: fewer compiled shapes, more padding
    length_window: int = 0  # > 0: group a task's batches by length within windows of this many steps (less padding)
    # the dev scorer's padded lengths (None: `buckets`). Finer ones pad evaluation batches less (length-sorted,
    # they are nearly uniform) for a few more forward-only programs; the largest must be the largest of `buckets`
    eval_buckets: tuple[int, ...] | None = None
    data_seed: int | None = None  # the data order (shuffles, training subsets); None: the run's `seed`. A
    # population's members share one data order (train/population.py), so a member's config names it here.

    def __post_init__(self) -> None:
        odd = {t: b for t, b in self.task_batch_size.items() if t not in TASKS or not isinstance(b, int) or b < 1}
        if odd:
            raise ValueError(f"data.task_batch_size must map registered tasks {tuple(TASKS)} to positive ints, got {odd}")
        if self.eval_buckets is not None and (not self.eval_buckets or max(self.eval_buckets) != max(self.buckets)):
            raise ValueError(f"data.eval_buckets {self.eval_buckets} must end at the largest of data.buckets "
                             f"{self.buckets} (sequences longer than the largest bucket are cut to it)")

    @property
    def scoring_buckets(self) -> tuple[int, ...]:
        """The padded lengths of evaluation and prediction batches: `eval_buckets`, else `buckets`."""
        return self.buckets if self.eval_buckets is None else self.eval_buckets

    def batch_sizes(self, tasks: tuple[str, ...]) -> dict[str, int]:
        """task -> its training batch size (`task_batch_size`, else `batch_size`)."""
        return {t: self.task_batch_size.get(t, self.batch_size) for t in tasks}


def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """`a` updated by `b`, section mappings merged key by key (one level: sections hold plain values)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = {**out[k], **v} if k in SECTIONS and isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# The sub-configs, each a section of config.yaml and of `key=value` overrides (`optim.lr=3e-5`).
SECTIONS: dict[str, type] = {"model": ModelConfig, "optim": OptimConfig, "data": DataConfig, "heads": HeadConfig}


def section_keys(sec: str) -> tuple[str, ...]:
    """The config keys of section `sec`: its dataclass fields, less `optim.total_steps` (the run's length, given to
    `OptimConfig.build`, never configured)."""
    return tuple(f.name for f in dataclasses.fields(SECTIONS[sec]) if f.name != "total_steps")


# Flat names of the model / optim / data keys (config.yaml of runs written before the sections existed, and short
# overrides such as `lr=3e-5`): each key name is unique across those sections, so it names one place.
FLAT_ALIASES: dict[str, str] = {k: f"{sec}.{k}" for sec in ("model", "optim", "data") for k in section_keys(sec)}


def canonical_key(key: str) -> str:
    """`lr` -> `optim.lr`; a dotted or run-level key as given."""
    return FLAT_ALIASES.get(key, key)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on (written to RUN/config.yaml). Defaults are the report's (§5.3).

    Sections: `model` (encoder options), `optim` (CS224N AdamW, schedule, lr multipliers; `optim.build(total_steps)`),
    `data` (batches, epochs, lengths), `heads` (`train.heads.HeadConfig`).
    """

    checkpoint: str = "embedded"  # "embedded" or a local HF BERT directory
    tasks: tuple[str, ...] = ("sst", "para", "sts")  # tasks whose losses are trained (round robin)
    combine: str = "sum"  # a registered method of train.combine: "sum" | "mean" | "pcgrad"
    pcgrad_reduction: str = "sum"  # shared update = sum (or mean) of the projected task gradients
    finetune: bool = True  # False = the report's "pretrain": encoder frozen, heads trained
    heads: HeadConfig = HeadConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()
    step_impl: str = "fused"  # "fused": one program per step shape | "split": per-task programs + one update
    seed: int = 0
    keep_checkpoints: int = 2
    eval_every: int = 1  # evaluate on dev after every N-th epoch (and always after the last step)

    def __post_init__(self) -> None:
        if not isinstance(self.eval_every, int) or self.eval_every < 1:
            raise ValueError(f"eval_every must be a positive number of epochs, got {self.eval_every!r}")
        combine_methods.get(self.combine)  # an unknown method fails here, listing the registered ones
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise ValueError(f"tasks must be a non-empty subset of the registered tasks {tuple(TASKS)}, got {self.tasks}")
        if not 0.0 <= self.optim.ema_decay < 1.0:
            raise ValueError(f"optim.ema_decay must be in [0, 1) (0: no moving average), got {self.optim.ema_decay}")
        if self.optim.total_steps is not None:
            raise ValueError("optim.total_steps is not a config key: the run's length is data.epochs x steps per epoch "
                             "(or data.max_steps)")
        missing = [t for t in self.tasks if t not in self.heads.heads]
        if missing:
            object.__setattr__(self, "heads", dataclasses.replace(self.heads, heads=self.heads.heads + tuple(missing)))

    @property
    def order_seed(self) -> int:
        """The seed of the data order (`data.data_seed`, else `seed`)."""
        return self.seed if self.data.data_seed is None else self.data.data_seed

    @property
    def batch_sizes(self) -> dict[str, int]:
        """task -> its training batch size (`data.task_batch_size`, else `data.batch_size`)."""
        return self.data.batch_sizes(self.tasks)

    def to_dict(self) -> dict[str, Any]:
        """The nested form of config.yaml: top-level keys, then one mapping per section."""
        d = dataclasses.asdict(self)
        d["tasks"] = list(self.tasks)
        d["heads"]["heads"] = list(self.heads.heads)
        d["data"]["buckets"] = list(self.data.buckets)
        d["data"]["eval_buckets"] = None if self.data.eval_buckets is None else list(self.data.eval_buckets)
        del d["optim"]["total_steps"]
        return d

    def flat(self) -> dict[str, Any]:
        """Every key as `section.key` (or a top-level name) -> value: the form comparisons and overrides use."""
        out: dict[str, Any] = {}
        for k, v in self.to_dict().items():
            if k in SECTIONS:
                out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
            else:
                out[k] = v
        return out

    def resolve_dtype(self, stored: "TrainConfig | None" = None) -> "TrainConfig":
        """This config with `model.dtype=auto` made concrete: the stored run's dtype when resuming one (`stored`),
        else `bert_jax.matmul.auto_dtype()` for this process's backend. Any other dtype is returned as is."""
        if self.model.dtype != "auto":
            return self
        dtype = stored.model.dtype if stored is not None and stored.model.dtype != "auto" else matmul.auto_dtype()
        return dataclasses.replace(self, model=dataclasses.replace(self.model, dtype=dtype))

    def with_values(self, values: dict[str, Any]) -> "TrainConfig":
        """A copy with `values` (`optim.lr`, flat `lr`, top-level or whole sections) applied."""
        return TrainConfig.from_dict(self.to_dict() | dict(values))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """From config.yaml's nested form, `section.key` keys, or the flat keys of older run directories
        (`lr`, `batch_size`, ...: each is one section's key). Flat and dotted keys win over a section mapping
        given in the same dict. Unknown keys fail, naming the known ones."""
        return cls(**_build_sections(normalize(d)))


def normalize(d: dict[str, Any]) -> dict[str, Any]:
    """Any mix of nested sections, `section.key` and flat (alias) keys -> the nested form, validated by name."""
    top = {f.name for f in dataclasses.fields(TrainConfig)} - set(SECTIONS)
    out: dict[str, Any] = {sec: {} for sec in SECTIONS}
    later: list[tuple[str, Any]] = []
    for k, v in d.items():
        if k in SECTIONS:
            if isinstance(v, dict):
                out[k].update(v)
            elif dataclasses.is_dataclass(v):
                out[k].update(dataclasses.asdict(v))
            else:
                raise ValueError(f"config key {k}: expected a mapping of {k}.* keys, got {v!r}")
        elif k in top:
            out[k] = v
        else:
            later.append((k, v))
    for k, v in later:  # dotted and flat keys apply after the sections
        path = canonical_key(k)
        sec, _, key = path.partition(".")
        if sec not in SECTIONS or not key:
            known = sorted(top) + sorted(f"{s}.{n}" for s in SECTIONS for n in section_keys(s))
            raise ValueError(f"unknown config key(s): {k} (known: {', '.join(known)})")
        out[sec][key] = v
    for sec in SECTIONS:
        names = set(section_keys(sec))
        bad = sorted(set(out[sec]) - names)
        if bad:
            raise ValueError(f"unknown config key(s): {', '.join(f'{sec}.{b}' for b in bad)} "
                             f"(known: {', '.join(f'{sec}.{n}' for n in sorted(names))})")
    return out


def _build_sections(d: dict[str, Any]) -> dict[str, Any]:
    """Nested dict (from `normalize`) -> TrainConfig keyword arguments: typed tuples and floats, section objects."""
    d = dict(d)
    if "tasks" in d:  # a scalar (`tasks=sst`) is a one-element tuple, not a tuple of characters
        d["tasks"] = (d["tasks"],) if isinstance(d["tasks"], str) else tuple(d["tasks"])
    h = dict(d["heads"])
    if "heads" in h:
        h["heads"] = (h["heads"],) if isinstance(h["heads"], str) else tuple(h["heads"])
    data = dict(d["data"])
    if "buckets" in data:
        data["buckets"] = (data["buckets"],) if isinstance(data["buckets"], int) else tuple(data["buckets"])
    if data.get("eval_buckets") is not None:
        data["eval_buckets"] = (data["eval_buckets"],) if isinstance(data["eval_buckets"], int) else tuple(data["eval_buckets"])
    sections = {"heads": h, "data": data, "model": dict(d["model"]), "optim": dict(d["optim"])}
    for sec, values in sections.items():
        for f in dataclasses.fields(SECTIONS[sec]):
            # PyYAML (YAML 1.1) reads `3e-5` (no dot) as a string: coerce float fields, or fail naming the key
            if str(f.type).startswith("float") and isinstance(values.get(f.name), str):
                try:
                    values[f.name] = float(values[f.name])
                except ValueError:
                    raise ValueError(f"config key {sec}.{f.name}: expected a number, got {values[f.name]!r}") from None
        d[sec] = SECTIONS[sec](**values)
    return d


# Presets. "report" = the paper's settings (meant for a GPU). The cpu-* presets keep the report's
# hyper-parameters (batch 8, dropout 0.3, AdamW) but fewer, shorter epochs and a higher lr, sized to
# finish in well under 40 minutes on 2 CPU cores with the embedded all-MiniLM-L6-v2, and mean pooling:
# that checkpoint is a mean-pooled sentence encoder, and with its [CLS] pooler the SST and Quora heads
# still predicted the majority class after 1000 steps (measured; see README).
_CPU = dict(data=dict(epochs=2, epoch_policy=500, max_len=64, buckets=(16, 32, 64), eval_batch_size=128),
            optim=dict(lr=5e-5), heads=dict(pooling="mean"))
PRESETS: dict[str, dict[str, Any]] = {
    "report": {},
    "report-pcgrad": {"combine": "pcgrad", "data": {"batch_size": 4}},
    "cpu-sum": _CPU,
    "cpu-mean": merge(_CPU, {"combine": "mean"}),
    "cpu-pcgrad": merge(_CPU, {"combine": "pcgrad"}),
    "cpu-cosine": merge(_CPU, {"heads": {"para_head": "cosine", "sts_head": "cosine"}}),
    # The accuracy recipe (issue: beat a plain PyTorch fine-tune within 30 minutes on 2 CPU cores), the default
    # of `make train`; README "Accuracy recipe" has the ablation from cpu-sum to here, one change per row.
    "cpu-recipe": merge(_CPU, {
        "step_impl": "split",
        "eval_every": 3,
        "model": {"hidden_dropout": 0.1, "dtype": "auto"},
        "optim": {"lr": 1e-4, "head_lr_scale": 10.0, "warmup_steps": 100, "schedule": "linear"},
        "data": {"batch_size": 16, "task_batch_size": {"sst": 32}, "max_len": 128, "buckets": (16, 24, 32, 48, 64, 96, 128),
                 "length_window": 32, "epochs": 3, "epoch_policy": 250},
        "heads": {"para_head": "pair", "sts_head": "cosine_relu"}}),
    "tiny": {"data": dict(epochs=1, epoch_policy=4, batch_size=4, max_len=32, buckets=(16, 32), train_limit=64, dev_limit=32)},
}


def _coerce(text: str) -> Any:
    return yaml.safe_load(text)


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key=value` overrides (YAML-typed; `optim.lr=3e-5`, `heads.sts_head=cosine`, or a flat alias such as
    `lr=3e-5`) to a config dict; returns the nested form."""
    values: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        values[key] = _coerce(value)
    return merge(normalize(d), normalize(values))


def resolve_config(preset_or_yaml: str | None, overrides: list[str] = (), **explicit: Any) -> TrainConfig:
    """Preset name or YAML path, then `key=value` overrides, then explicit (CLI flag) values (flat or dotted
    names; None = not given)."""
    base: dict[str, Any] = {}
    if preset_or_yaml:
        if preset_or_yaml in PRESETS:
            base = PRESETS[preset_or_yaml]
        else:
            path = Path(preset_or_yaml)
            if not path.is_file():
                raise ValueError(f"--config {preset_or_yaml!r} is neither a preset ({', '.join(PRESETS)}) nor a YAML file")
            base = yaml.safe_load(path.read_text()) or {}
            if not isinstance(base, dict):
                raise ValueError(f"{path}: expected a mapping of config keys")
    d = apply_overrides(merge(TrainConfig().to_dict(), normalize(base)), list(overrides))
    d = merge(d, normalize({k: v for k, v in explicit.items() if v is not None}))
    return TrainConfig.from_dict(d)
