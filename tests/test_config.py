"""Tests for train.config: presets, YAML files, key=value overrides, clear errors on unknown keys."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from train.config import PRESETS, TrainConfig, resolve_config
from train.heads import HeadConfig


def test_report_defaults_are_the_papers():
    """The "report" preset carries the report's / CS224N's hyper-parameters (issue 3)."""
    cfg = resolve_config("report")
    assert cfg == TrainConfig()
    assert (cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.hidden_dropout, cfg.epochs) == (1e-5, 0.0, 8, 0.3, 10)
    assert (cfg.b1, cfg.b2, cfg.eps) == (0.9, 0.999, 1e-6)
    assert cfg.combine == "sum" and cfg.finetune is True
    assert cfg.heads == HeadConfig(pooling="cls", para_head="pair", sts_head="pair", heads=("sst", "para", "sts"))
    assert cfg.tasks == ("sst", "para", "sts")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_resolves_and_round_trips(name):
    cfg = resolve_config(name)
    assert isinstance(cfg, TrainConfig)
    for key, value in PRESETS[name].items():  # every preset entry is applied
        got = getattr(cfg, key)
        if key == "heads":
            assert {k: getattr(got, k) for k in value} == value
        elif isinstance(value, (tuple, list)):
            assert tuple(got) == tuple(value), key
        else:
            assert got == value, key
    # the config written to RUN/config.yaml reads back identical
    assert TrainConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg


def test_named_presets():
    assert resolve_config("cpu-sum").combine == "sum"
    assert resolve_config("cpu-mean").combine == "mean"
    assert resolve_config("cpu-pcgrad").combine == "pcgrad"
    cos = resolve_config("cpu-cosine").heads
    assert (cos.para_head, cos.sts_head) == ("cosine", "cosine")
    tiny = resolve_config("tiny")
    assert tiny.batch_size == 4 and tiny.epochs == 1


def test_yaml_file_then_overrides_then_explicit(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"lr": 2.0e-5, "combine": "pcgrad", "batch_size": 16,
                                    "heads": {"pooling": "mean"}, "tasks": ["sst", "sts"]}))
    cfg = resolve_config(str(path))
    assert (cfg.lr, cfg.combine, cfg.batch_size, cfg.tasks) == (2e-5, "pcgrad", 16, ("sst", "sts"))
    assert cfg.heads.pooling == "mean" and cfg.heads.sts_head == "pair"
    assert cfg.epochs == TrainConfig().epochs  # untouched keys keep the defaults

    cfg = resolve_config(str(path), ["heads.sts_head=cosine", "batch_size=4", "buckets=[8, 16]", "finetune=false",
                                     "lr=3e-5", "grad_clip=1", "epoch_policy=min"], seed=7, max_steps=None)
    assert cfg.heads == HeadConfig(pooling="mean", para_head="pair", sts_head="cosine", heads=("sst", "para", "sts"))
    assert (cfg.batch_size, cfg.buckets, cfg.finetune, cfg.epoch_policy) == (4, (8, 16), False, "min")
    assert cfg.lr == 3e-5 and isinstance(cfg.lr, float)  # PyYAML reads "3e-5" as a string; it must become a float
    assert cfg.grad_clip == 1.0
    assert cfg.combine == "pcgrad"  # from the YAML, not overridden
    assert cfg.seed == 7 and cfg.max_steps is None  # explicit values; None means "not given"


def test_override_on_a_preset_and_scalar_lists():
    cfg = resolve_config("tiny", ["heads.para_head=cosine", "tasks=sts", "combine=mean"])
    assert cfg.heads.para_head == "cosine" and cfg.heads.sts_head == "pair"
    assert cfg.tasks == ("sts",)  # not ('s', 't', 's')
    assert cfg.combine == "mean"
    assert cfg.batch_size == PRESETS["tiny"]["batch_size"]


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
        TrainConfig().lr = 1.0  # type: ignore[misc]
