"""Tests for train.config: presets, YAML files, key=value overrides, clear errors on unknown keys."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from bert_jax.config import BertConfig
from train.config import PRESETS, SECTIONS, ModelConfig, TrainConfig, resolve_config
from train.heads import HeadConfig


def test_report_defaults_are_the_papers():
    """The "report" preset carries the report's / CS224N's hyper-parameters (issue 3)."""
    cfg = resolve_config("report")
    assert cfg == TrainConfig()
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.data.batch_size, cfg.model.hidden_dropout, cfg.data.epochs) == (1e-5, 0.0, 8, 0.3, 10)
    assert (cfg.optim.b1, cfg.optim.b2, cfg.optim.eps) == (0.9, 0.999, 1e-6)
    assert cfg.combine == "sum" and cfg.finetune is True
    assert cfg.heads == HeadConfig(pooling="cls", para_head="pair", sts_head="pair", heads=("sst", "para", "sts"))
    assert cfg.tasks == ("sst", "para", "sts")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_resolves_and_round_trips(name):
    cfg = resolve_config(name)
    assert isinstance(cfg, TrainConfig)
    flat = cfg.flat()
    for key, value in PRESETS[name].items():  # every preset entry is applied
        entries = {f"{key}.{k}": v for k, v in value.items()} if key in SECTIONS else {key: value}
        for k, v in entries.items():
            if isinstance(v, (tuple, list)):
                assert tuple(flat[k]) == tuple(v), k
            else:
                assert flat[k] == v, k
    # the config written to RUN/config.yaml reads back identical
    assert TrainConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg


def test_named_presets():
    assert resolve_config("cpu-sum").combine == "sum"
    assert resolve_config("cpu-mean").combine == "mean"
    assert resolve_config("cpu-pcgrad").combine == "pcgrad"
    cos = resolve_config("cpu-cosine").heads
    assert (cos.para_head, cos.sts_head) == ("cosine", "cosine")
    tiny = resolve_config("tiny")
    assert tiny.data.batch_size == 4 and tiny.data.epochs == 1


def test_yaml_file_then_overrides_then_explicit(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"lr": 2.0e-5, "combine": "pcgrad", "batch_size": 16,
                                    "heads": {"pooling": "mean"}, "tasks": ["sst", "sts"]}))
    cfg = resolve_config(str(path))
    assert (cfg.optim.lr, cfg.combine, cfg.data.batch_size, cfg.tasks) == (2e-5, "pcgrad", 16, ("sst", "sts"))
    assert cfg.heads.pooling == "mean" and cfg.heads.sts_head == "pair"
    assert cfg.data.epochs == TrainConfig().data.epochs  # untouched keys keep the defaults

    cfg = resolve_config(str(path), ["heads.sts_head=cosine", "batch_size=4", "buckets=[8, 16]", "finetune=false",
                                     "lr=3e-5", "grad_clip=1", "epoch_policy=min"], seed=7, max_steps=None)
    assert cfg.heads == HeadConfig(pooling="mean", para_head="pair", sts_head="cosine", heads=("sst", "para", "sts"))
    assert (cfg.data.batch_size, cfg.data.buckets, cfg.finetune, cfg.data.epoch_policy) == (4, (8, 16), False, "min")
    assert cfg.optim.lr == 3e-5 and isinstance(cfg.optim.lr, float)  # PyYAML reads "3e-5" as a string; it must become a float
    assert cfg.optim.grad_clip == 1.0
    assert cfg.combine == "pcgrad"  # from the YAML, not overridden
    assert cfg.seed == 7 and cfg.data.max_steps is None  # explicit values; None means "not given"


def test_override_on_a_preset_and_scalar_lists():
    cfg = resolve_config("tiny", ["heads.para_head=cosine", "tasks=sts", "combine=mean"])
    assert cfg.heads.para_head == "cosine" and cfg.heads.sts_head == "pair"
    assert cfg.tasks == ("sts",)  # not ('s', 't', 's')
    assert cfg.combine == "mean"
    assert cfg.data.batch_size == PRESETS["tiny"]["data"]["batch_size"]


def test_task_batch_size_overrides_one_task():
    cfg = resolve_config("tiny", ["task_batch_size={sst: 12}"])
    assert cfg.batch_sizes == {"sst": 12, "para": 4, "sts": 4}
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_trained_tasks_always_get_a_head():
    cfg = TrainConfig(tasks=("cfimdb",))
    assert "cfimdb" in cfg.heads.heads and set(("sst", "para", "sts")) <= set(cfg.heads.heads)


@pytest.mark.parametrize("overrides, words", [
    (["nonsense_key=1"], ["unknown config key", "nonsense_key"]),
    (["heads.nonsense=1"], ["unknown config key", "heads.nonsense"]),
    (["combine=average"], ["combine", "average"]),
    (["tasks=[sst, nli]"], ["tasks", "nli"]),
    (["heads.sts_head=dot"], ["sts_head", "dot"]),
    (["heads.pooling=max"], ["pooling", "max"]),
    (["lr"], ["key=value"]),
    (["task_batch_size={nli: 8}"], ["task_batch_size", "nli"]),
    (["task_batch_size={sst: 0}"], ["task_batch_size", "positive"]),
    (["lr=fast"], ["lr", "fast"]),
])
def test_bad_overrides_error_clearly(overrides, words):
    with pytest.raises(ValueError) as e:
        resolve_config("tiny", overrides)
    for w in words:
        assert w in str(e.value)


def test_unknown_key_in_yaml_and_missing_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("lr: 1.0e-4\nlearning_rate: 3\n")
    with pytest.raises(ValueError, match="unknown config key.*learning_rate"):
        resolve_config(str(path))
    with pytest.raises(ValueError, match="neither a preset"):
        resolve_config(str(tmp_path / "missing.yaml"))
    path.write_text("- a list\n")
    with pytest.raises(ValueError, match="mapping"):
        resolve_config(str(path))


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainConfig().optim.lr = 1.0  # type: ignore[misc]


def test_sections_dotted_overrides_and_flat_aliases_name_one_place():
    """`optim.lr=3e-5` and the flat alias `lr=3e-5` set the same key; sections hold what their name says."""
    a = resolve_config("cpu-recipe", ["optim.lr=3e-5", "data.batch_size=4", "model.hidden_dropout=0.2"])
    b = resolve_config("cpu-recipe", ["lr=3e-5", "batch_size=4", "hidden_dropout=0.2"])
    assert a == b
    assert (a.optim.lr, a.data.batch_size, a.model.hidden_dropout) == (3e-5, 4, 0.2)
    assert a.data.task_batch_size == {"sst": 32}  # the rest of the preset's data section is kept
    assert a.batch_sizes == {"sst": 32, "para": 4, "sts": 4}
    written = yaml.safe_load(yaml.safe_dump(a.to_dict()))
    assert set(written) >= {"model", "optim", "data", "heads"} and written["optim"]["lr"] == 3e-5
    assert "lr" not in written and "total_steps" not in written["optim"]


def test_a_run_directory_written_with_flat_keys_still_loads():
    """config.yaml of runs written before the sections (every key at the top, heads nested) reads back equal."""
    old = {"checkpoint": "embedded", "tasks": ["sst", "para", "sts"], "combine": "sum", "pcgrad_reduction": "sum",
           "finetune": True, "heads": {"pooling": "mean", "para_head": "pair", "sts_head": "cosine_relu",
                                       "heads": ["sst", "para", "sts"]},
           "lr": 1.0e-4, "weight_decay": 0.0, "b1": 0.9, "b2": 0.999, "eps": 1.0e-6, "warmup_steps": 100,
           "schedule": "linear", "grad_clip": None, "head_lr_scale": 10.0, "layer_lr_decay": 1.0, "batch_size": 16,
           "task_batch_size": {"sst": 32}, "eval_batch_size": 128, "epochs": 3, "epoch_policy": 250, "max_steps": None,
           "train_limit": None, "dev_limit": None, "max_len": 128, "buckets": [16, 24, 32, 48, 64, 96, 128],
           "align_buckets": False, "length_window": 32, "hidden_dropout": 0.1, "attention_dropout": None,
           "dtype": "float32", "attention_impl": "xla", "remat": False, "scan_layers": False, "step_impl": "split",
           "seed": 0, "data_seed": None, "keep_checkpoints": 2}  # runs/sst32-s0/config.yaml of 2026-11-26
    # written before eval_every, and in float32 (the preset's dtype has been `auto` since)
    assert TrainConfig.from_dict(old) == resolve_config("cpu-recipe", ["eval_every=1", "dtype=float32"])


def test_unknown_section_key_lists_the_sections_keys():
    with pytest.raises(ValueError) as e:
        resolve_config("tiny", ["optim.learning_rate=1e-4"])
    assert "optim.learning_rate" in str(e.value) and "optim.lr" in str(e.value)
    with pytest.raises(ValueError, match="total_steps"):
        TrainConfig.from_dict({"optim": {"total_steps": 10}})


def test_optim_build_is_the_configured_schedule_and_multipliers():
    """`cfg.optim.build(total)`: hand-computed learning rates of a warm-up + linear decay and a 10x head scale."""
    import jax
    import jax.numpy as jnp

    cfg = resolve_config(None, ["optim.lr=1e-2", "optim.warmup_steps=2", "optim.schedule=linear",
                                "optim.head_lr_scale=10", "optim.eps=1e-12"])
    tx = cfg.optim.build(total_steps=6)
    params = {"bert": {"w": jnp.zeros(())}, "heads": {"sst": {"b": jnp.zeros(())}}}
    state = tx.init(params)
    steps = []
    for _ in range(6):
        grads = jax.tree.map(jnp.ones_like, params)
        updates, state = tx.update(grads, state, params)
        steps.append((float(updates["bert"]["w"]), float(updates["heads"]["sst"]["b"])))
    # Adam's first step with constant gradients is -lr * 1 (bias-corrected m / sqrt(v) = 1)
    lrs = [0.0, 0.005, 0.01, 0.01 * 3 / 4, 0.01 * 2 / 4, 0.01 * 1 / 4]  # warm-up 0 -> lr over 2 steps, then to 0 at 6
    for (enc, head), lr in zip(steps, lrs):
        assert enc == pytest.approx(-lr, rel=1e-5, abs=1e-9)
        assert head == pytest.approx(-10 * lr, rel=1e-5, abs=1e-8)


def test_dtype_auto_resolves_once_and_a_resumed_run_keeps_its_own(monkeypatch):
    from bert_jax import matmul

    cfg = resolve_config("cpu-recipe")
    assert cfg.model.dtype == "auto"
    monkeypatch.setattr(matmul, "auto_dtype", lambda: "bfloat16")
    assert cfg.resolve_dtype().model.dtype == "bfloat16"
    assert cfg.resolve_dtype().data == cfg.data  # nothing else changes
    stored = resolve_config("cpu-recipe", ["dtype=float32"])
    assert cfg.resolve_dtype(stored).model.dtype == "float32"  # resuming: the run's own dtype, whatever this machine's
    explicit = resolve_config("cpu-recipe", ["dtype=float32"])
    assert explicit.resolve_dtype() is explicit
    assert ModelConfig(dtype="auto").build(BertConfig()).dtype == "bfloat16"
