"""Population training (train/population.py): K members as one vmapped program end equal to K separate runs
(the ordinary single-run trainer, same seeds and batches), through an interruption and resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import assert_tree_allclose
from train.checkpoint import load_params
from train.config import TrainConfig
from train.population import check_population, member_configs, parse_axes
from train.trainer import train


def _base(ckpt: Path, combine: str) -> TrainConfig:
    return TrainConfig.from_dict(dict(checkpoint=str(ckpt), combine=combine, epochs=1, epoch_policy=4, batch_size=4, max_len=32,
                       buckets=(32,), train_limit=48, dev_limit=16, eval_batch_size=16, warmup_steps=1,
                       schedule="linear", head_lr_scale=3.0))


MEMBERS = {
    # lr, dropout, seed and a linear combination (sum vs mean) all vary across members
    "sum": [{"lr": 1e-3, "hidden_dropout": 0.1, "seed": 0},
            {"lr": 3e-4, "hidden_dropout": 0.3, "seed": 1, "combine": "mean"}],
    "pcgrad": [{"lr": 1e-3, "hidden_dropout": 0.1, "seed": 0}, {"lr": 5e-4, "hidden_dropout": 0.2, "seed": 1}],
}


def _evals(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("combine, interrupt, impl, step_impl", [
    ("sum", True, "loop", "fused"), ("pcgrad", False, "vmap", "fused"),
    ("sum", False, "loop", "split"), ("pcgrad", True, "vmap", "split")])
def test_population_equals_separate_runs(tiny_vocab_bert_dir, tiny_data_dir, tmp_path, monkeypatch, combine, interrupt, impl,
                                        step_impl):
    """4 steps (dev at the end); some populations are stopped after step 2 (SIGTERM's path) and resumed. Every
    member's params and dev metrics equal a separate `train` of its config (<= 1e-5), with the members' step
    looped (the CPU default) and vmapped (the accelerator default), fused or as per-task programs
    (`step_impl=split`, with two buckets so that the tasks' batch shapes differ between steps)."""
    from train import population
    from train.population import train_population

    base = _base(tiny_vocab_bert_dir, combine)
    built = []
    if step_impl == "split":
        base = base.with_values({"step_impl": "split", "data.buckets": (8, 16, 32)})
        split_step = population._split_population_step
        monkeypatch.setattr(population, "_split_population_step", lambda *a: built.append(a) or split_step(*a))
    cfgs = member_configs(base, MEMBERS[combine])
    assert {c.data.data_seed for c in cfgs} == {cfgs[0].seed}  # one data order for all members
    runs = [tmp_path / "pop" / f"m{k}" for k in range(len(cfgs))]
    polls = {"n": 0}

    def stop_after_two() -> bool:
        polls["n"] += 1
        return interrupt and polls["n"] > 2

    if interrupt:
        first = train_population(cfgs, runs, tiny_data_dir, should_stop=stop_after_two, impl=impl)
        assert all(r["stopped"] and r["step"] == 2 for r in first)
    results = train_population(cfgs, runs, tiny_data_dir, resume=interrupt, impl=impl)
    assert all(not r["stopped"] and r["step"] == 4 for r in results)
    assert len(built) == (0 if step_impl == "fused" else 1 + interrupt)  # the split population step trained it
    for k, cfg in enumerate(cfgs):
        single = tmp_path / f"single{k}"
        ref = train(cfg, tiny_data_dir, single)
        assert ref["step"] == 4
        _, _, p_pop = load_params(runs[k])
        _, _, p_ref = load_params(single)
        assert_tree_allclose(p_pop, p_ref, atol=1e-5)
        pop_evals, ref_evals = _evals(runs[k]), _evals(single)
        assert [e["step"] for e in pop_evals] == [e["step"] for e in ref_evals] == [4]
        for a, b in zip(pop_evals, ref_evals):  # 16 dev rows of a random tiny model: r and accuracy amplify 1e-6 params
            for t in ("sst", "para", "sts", "overall"):
                assert a[t] == pytest.approx(b[t], abs=2e-4), (k, t)
        assert load_params(runs[k])[0].to_dict() == cfg.to_dict()  # an ordinary run directory with the member's config
    # the members did train differently (different lr / dropout / seed): not one model K times
    heads = [np.asarray(load_params(r)[2]["heads"]["sst"]["kernel"]) for r in runs]
    assert np.abs(heads[0] - heads[1]).max() > 1e-3


def test_population_axes_and_checks(tiny_vocab_bert_dir):
    assert parse_axes(["lr=1e-5,2e-5", "seed=0,1"]) == [
        {"lr": 1e-5, "seed": 0}, {"lr": 1e-5, "seed": 1}, {"lr": 2e-5, "seed": 0}, {"lr": 2e-5, "seed": 1}]
    with pytest.raises(ValueError, match="'batch_size' cannot vary within a population; it can vary: lr"):
        parse_axes(["batch_size=4,8"])
    with pytest.raises(ValueError, match="expected FIELD=V1,V2"):
        parse_axes(["lr"])
    base = _base(tiny_vocab_bert_dir, "sum")
    with pytest.raises(ValueError, match="non-linear method \\(pcgrad\\) must be shared"):
        member_configs(base, [{"combine": "sum"}, {"combine": "pcgrad"}])
    with pytest.raises(ValueError, match="differs from member 0 in 'data.max_len'"):
        check_population([base, TrainConfig.from_dict(base.to_dict() | {"max_len": 64})])
    with pytest.raises(ValueError, match="hidden_dropout must be in"):
        member_configs(base, [{"hidden_dropout": 0.1}, {"hidden_dropout": 1.5}])


def test_population_cli_writes_ordinary_runs(tiny_vocab_bert_dir, tiny_data_dir, tmp_path, capsys):
    """`train --population` writes one run per member, which `evaluate` reads like any run."""
    from scripts.cli import main

    out = tmp_path / "pop"
    common = ["--data-dir", str(tiny_data_dir)]
    assert main(["train", "--config", "tiny", "--checkpoint", str(tiny_vocab_bert_dir), "--out", str(out), "--quiet",
                 "--population", "lr=1e-3,2e-4", "--population", "seed=3", *common]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["member"] for r in lines] == ["lr0.001-seed3", "lr0.0002-seed3"]
    assert main(["evaluate", str(out / "lr0.0002-seed3"), *common]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["overall"] == pytest.approx(lines[1]["overall"], abs=1e-6)
    cfg = load_params(out / "lr0.0002-seed3")[0]
    assert (cfg.optim.lr, cfg.seed, cfg.data.data_seed) == (2e-4, 3, 3)
