"""Tests for ensemble/: stacking, the vmapped evaluation, spec compilation, soups and the CLI.

Tiny runs are written directly (tiny real-vocab BERT + per-seed perturbed encoder + random heads, saved
with `save_params_run`); no training.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from ensemble.evaluate import group_models, load_models
from ensemble.soup import check_compatible, greedy_soup, uniform_soup
from ensemble.spec import SpecError, combine, compile_weights, load_spec, naive_scores, parse_spec
from ensemble.stack import StructureError, make_stacked_eval_fn, rows_per_chunk, stack, unstack
from scripts.cli import main
from tests.conftest import assert_tree_allclose
from train import data as D
from train.checkpoint import load_params, save_params_run
from train.config import resolve_config
from train.metrics import task_metric
from train.heads import init_heads
from train.step import make_eval_fn, model_spec
from train.trainer import predict_scores

TASKS = ("sst", "para", "sts")  # the evaluated tasks of the registry, in its order


def _make_run(out: Path, ckpt: Path, seed: int, overrides: tuple[str, ...] = ()) -> Path:
    """A params-only run: the checkpoint's encoder perturbed by seeded noise + seeded random heads."""
    cfg = resolve_config("tiny", list(overrides) + ["eval_batch_size=32"], checkpoint=str(ckpt), seed=seed)
    bert, bert_params = _pretrained(ckpt)
    spec = model_spec(cfg, bert)
    keys = iter(jax.random.split(jax.random.key(1000 + seed), len(jax.tree.leaves(bert_params))))
    params = {"bert": jax.tree.map(lambda x: x + 0.02 * jax.random.normal(next(keys), x.shape, x.dtype), bert_params),
              "heads": jax.tree.map(lambda x: x * 20.0 if x.ndim == 2 else x,  # less-tied predictions
                                    init_heads(spec.heads, bert.hidden_size, jax.random.key(seed)))}
    return save_params_run(out, cfg, spec, params, ckpt / "vocab.txt")


@functools.lru_cache(maxsize=2)
def _pretrained(ckpt: Path):
    import bert_jax

    return bert_jax.load_pretrained(ckpt)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_vocab_bert_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ens_runs")
    out = {f"r{i}": _make_run(root / f"r{i}", tiny_vocab_bert_dir, seed=i) for i in range(3)}
    out["cos"] = _make_run(root / "cos", tiny_vocab_bert_dir, seed=7, overrides=("heads.para_head=cosine", "heads.sts_head=cosine"))
    return out


@pytest.fixture(scope="module")
def loaded(runs):
    return {k: load_params(v) for k, v in runs.items()}


def _np(tree):
    return jax.tree.map(np.asarray, tree)


# ------------------------------------------------------------------------------------------ stacking


def test_stack_unstack_round_trip(loaded):
    trees = [loaded[f"r{i}"][2] for i in range(3)]
    stacked = stack(trees)
    flat = jax.tree.leaves(stacked)
    ref = [np.stack(xs) for xs in zip(*[jax.tree.leaves(_np(t)) for t in trees])]  # numpy reference
    assert len(flat) == len(ref)
    for a, b in zip(flat, ref):
        assert a.shape == b.shape and a.shape[0] == 3
        np.testing.assert_array_equal(np.asarray(a), b)
    back = unstack(stacked)
    assert len(back) == 3
    for t, b in zip(trees, back):
        assert_tree_allclose(t, b, atol=0.0)


def test_stack_mismatch_names_first_differing_leaf(loaded):
    pair, cos = loaded["r0"][2], loaded["cos"][2]
    with pytest.raises(StructureError, match=r"cannot stack m0 and m1: leaf heads/para/bias has shape \(1,\) in m0 but \(\) in m1"):
        stack([pair, cos], names=["m0", "m1"])
    without_para_kernel = {"bert": pair["bert"], "heads": {**pair["heads"], "para": {"bias": pair["heads"]["para"]["bias"]}}}
    with pytest.raises(StructureError, match=r"leaf heads/para/kernel is in m0 but not in m1"):
        stack([pair, without_para_kernel], names=["m0", "m1"])
    bad = jax.tree.map(lambda x: x, pair)
    bad["heads"]["sst"]["kernel"] = np.zeros((32, 3), np.float32)
    with pytest.raises(StructureError, match=r"heads/sst/kernel has shape \(32, 5\) in member 0 but \(32, 3\) in member 1"):
        stack([pair, bad])
    bad2 = jax.tree.map(lambda x: x, pair)
    bad2["bert"]["pooler"]["dense"]["bias"] = np.zeros((32,), np.float16)
    with pytest.raises(StructureError, match="bert/pooler/dense/bias has dtype float32 in member 0 but float16"):
        stack([pair, bad2])


def _batches(tiny_data_dir, ckpt, max_len=32):
    import bert_jax

    tok = bert_jax.load_tokenizer(ckpt)
    out = {}
    for t in TASKS:
        enc = D.encode_task(D.load_task(tiny_data_dir, t, "dev"), tok, max_len)
        out[t] = D.make_batch(enc, np.arange(10), 12, (16, 32))
    return out


@pytest.mark.parametrize("chunk_tokens", [None, 200])  # 200: micro-batches of 2 rows (lax.map path)
def test_vmapped_scores_equal_per_member_scores(loaded, tiny_data_dir, tiny_vocab_bert_dir, chunk_tokens):
    names = ["r0", "r1", "r2"]
    spec = loaded["r0"][1]
    trees = [loaded[n][2] for n in names]
    stacked, batches = stack(trees), _batches(tiny_data_dir, tiny_vocab_bert_dir)
    vm, single = make_stacked_eval_fn(spec, chunk_tokens), make_eval_fn(spec)
    for t, b in batches.items():
        got = np.asarray(vm(stacked, t, b))
        ref = np.stack([np.asarray(single(p, t, b)) for p in trees])
        assert got.shape == ref.shape == ((3, 12, 5) if t == "sst" else (3, 12))
        np.testing.assert_allclose(got, ref, atol=1e-6, rtol=0)
        assert np.abs(ref[0] - ref[1]).max() > 1e-3  # the members really differ


def test_rows_per_chunk():
    assert rows_per_chunk(3, 64, 64, None) == 64
    assert rows_per_chunk(3, 64, 64, 2560) == 8  # 3 * 8 * 64 = 1536 <= 2560 < 3 * 16 * 64
    assert rows_per_chunk(9, 64, 64, 2560) == 4
    assert rows_per_chunk(9, 12, 64, 100) == 1
    assert rows_per_chunk(2, 12, 16, 200) == 6


def test_grouping_by_architecture(runs):
    models = load_models([runs["r0"], runs["cos"], runs["r1"]])
    groups = group_models(models)
    assert [g.indices for g in groups] == [(0, 2), (1,)]
    assert groups[1].spec.heads.sts_head == "cosine"
    # a run whose params do not match its (equal) spec is a clear error naming the leaf
    broken = models[2].__class__(models[2].run, models[2].cfg, models[2].spec,
                                 {**models[2].params, "heads": {**models[2].params["heads"], "sts": {}}})
    with pytest.raises(StructureError, match=r"heads/sts/(bias|kernel) is in .*r0 but not in .*r1"):
        group_models([models[0], broken])


# ---------------------------------------------------------------------------------------------- spec


def _nested_spec(root: Path) -> dict:
    return {
        "members": {"a": "ra", "b": "rb", "c": "rc", "a2": "ra"},  # a2 aliases a's run
        "nodes": {
            "t1": {"type": "task", "sst": "a", "para": "b", "sts": "c"},
            "avg": {"type": "average", "children": ["a", "b", "c"], "weights": [1, 2, 3]},
            "mix": {"type": "average", "children": ["t1", "avg", "a2"]},
            "deep": {"type": "task", "sst": "mix", "para": "avg", "sts": "t1"},
            "top": {"type": "average", "children": ["deep", "mix", "b"], "weights": [0.5, 0.25, 0.25]},
        },
    }


def test_compiled_tree_equals_naive_recursion(tmp_path):
    spec = parse_spec(_nested_spec(tmp_path), tmp_path, check_runs=False)
    assert len(spec.models) == 3 and spec.columns()["a2"] == spec.columns()["a"] == 0
    w = compile_weights(spec)
    rng = np.random.default_rng(0)
    n = 17
    per_member = {m: {"sst": rng.normal(size=(n, 5)), "para": rng.normal(size=n), "sts": rng.uniform(0, 5, size=n)}
                  for m in ("a", "b", "c")}
    per_member["a2"] = per_member["a"]
    model_scores_ = {t: np.stack([per_member[m][t] for m in ("a", "b", "c")]) for t in TASKS}
    for name in spec.names:
        got = combine(w[name], model_scores_, TASKS)
        ref = naive_scores(spec, name, per_member)
        for t in TASKS:
            np.testing.assert_allclose(got[t], ref[t], atol=1e-6, rtol=0)
        np.testing.assert_allclose(w[name].sum(1), 1.0, atol=1e-12)
    # hand-computed: avg = (a + 2b + 3c)/6; t1.sst = a; mix.sst = (a + avg + a)/3 -> weights a 13/18, b 2/18, c 3/18
    np.testing.assert_allclose(w["avg"][0], [1 / 6, 2 / 6, 3 / 6])
    np.testing.assert_allclose(w["mix"][0], [13 / 18, 2 / 18, 3 / 18])
    np.testing.assert_allclose(w["t1"], np.eye(3))


def test_report_spec_compiles():
    spec = load_spec(Path(__file__).resolve().parents[1] / "ensembles" / "report.yaml", check_runs=False)
    assert spec.default_node() == "ens7" and len(spec.models) == 9
    w = compile_weights(spec)
    cols = {p.name: i for i, p in enumerate(spec.models)}
    # Ensemble 7 = mean(ens2, ens3, ens5): SST weight on sum = (1 + 1/3 + 0) / 3
    assert w["ens7"][0, cols["sum"]] == pytest.approx(4 / 9)
    assert w["ens7"][2, cols["lr5e-5"]] == pytest.approx((1 + 1 / 3 + 1 / 3) / 3)
    assert w["ens1"][1, cols["para-finetune"]] == 1.0


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["nodes"]["t1"].update(cfimdb="a"), r"node 't1': unknown task\(s\) \['cfimdb'\]"),
    (lambda d: d["nodes"]["t1"].pop("sts"), r"node 't1': task node has no child for task\(s\) \['sts'\]"),
    (lambda d: d["nodes"]["mix"]["children"].append("zz"), r"node 'mix' refers to unknown member or node 'zz'"),
    (lambda d: d["nodes"]["mix"]["children"].append("top"), r"cycle in ensemble spec: mix -> top -> deep -> mix"),
    (lambda d: d["nodes"]["t1"].update(sts="t1"), r"cycle in ensemble spec: t1 -> t1"),
    (lambda d: d["nodes"]["t1"].update(type="median"), r"node 't1': type must be one of"),
    (lambda d: d["nodes"]["avg"].update(weights=[1, 2]), r"node 'avg': 'weights' must be a list of 3 numbers"),
    (lambda d: d["nodes"].update(a={"type": "average", "children": ["b"]}), r"node 'a' has the same name as a member"),
    (lambda d: d.update(output="nope"), r"output 'nope' is not a member or node"),
])
def test_spec_errors(tmp_path, mutate, message):
    d = _nested_spec(tmp_path)
    mutate(d)
    with pytest.raises(SpecError, match=message):
        parse_spec(d, tmp_path, check_runs=False)


def test_spec_missing_run_dir(tmp_path, runs):
    d = {"members": {"ok": str(runs["r0"]), "gone": "no-such-run"}, "nodes": {}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(d))
    with pytest.raises(SpecError, match=r"member 'gone': run directory .*no-such-run not found .*results dir"):
        load_spec(tmp_path / "s.yaml")
    # --results-dir resolves relative member paths
    d2 = {"members": {"x": runs["r1"].name}, "nodes": {}}
    (tmp_path / "s2.json").write_text(json.dumps(d2))
    assert load_spec(tmp_path / "s2.json", results_dir=runs["r1"].parent).members["x"] == runs["r1"].resolve()


# --------------------------------------------------------------------------------------------- soups


def test_uniform_soup_is_numpy_mean_and_greedy_logic(loaded):
    trees = [loaded[f"r{i}"][2] for i in range(3)]
    soup = uniform_soup(trees)
    ref = jax.tree.map(lambda *xs: np.mean(np.stack([np.asarray(x, np.float64) for x in xs]), 0), *trees)
    assert_tree_allclose(soup, ref, atol=1e-6)
    with pytest.raises(StructureError, match="leaf heads/para/bias has shape"):
        uniform_soup([trees[0], loaded["cos"][2]])
    with pytest.raises(StructureError, match=r"different model \(heads.para_head: 'pair' vs 'cosine'\)"):
        check_compatible([loaded["r0"][1], loaded["cos"][1]], ["r0", "cos"])
    # greedy logic on scalar "models", score = -|x - 1|, ingredients 0.9, 3.0, 0.8, 1.25 (own: -.1, -2, -.2, -.25).
    # Tried best first: {0.9} -.1; +0.8 -> 0.85 (-.15) dropped; +1.25 -> 1.075 (-.075) kept; +3.0 -> 1.717 dropped.
    xs = [np.float32(v) for v in (0.9, 3.0, 0.8, 1.25)]
    params, kept, hist = greedy_soup(xs, lambda p: -abs(float(p) - 1.0))
    assert kept == [0, 3]
    assert [(h["index"], h["kept"]) for h in hist] == [(0, True), (2, False), (3, True), (1, False)]
    assert float(params) == pytest.approx(1.075, abs=1e-6)


def test_soup_cli_runs_load_and_evaluate(runs, tmp_path, tiny_data_dir, capsys):
    out = tmp_path / "usoup"
    assert main(["soup", str(runs["r0"]), str(runs["r1"]), str(runs["r2"]), "--out", str(out)]) == 0
    _, _, params = load_params(out)
    members = [load_params(runs[f"r{i}"])[2] for i in range(3)]
    ref = jax.tree.map(lambda *xs: np.mean(np.stack([np.asarray(x) for x in xs]), 0), *members)
    assert_tree_allclose(params, ref, atol=1e-6)

    g = tmp_path / "gsoup"
    assert main(["soup", *(str(runs[f"r{i}"]) for i in range(3)), "--out", str(g), "--greedy",
                 "--data-dir", str(tiny_data_dir), "--batch-size", "32"]) == 0
    rec = json.loads((g / "soup.json").read_text())
    own = [m["overall"] for m in rec["ingredient_dev"]]
    assert rec["kept"][0] == rec["ingredients"][int(np.argmax(own))]
    kept_overall = [h["overall"] for h in rec["history"] if h["kept"]]
    assert kept_overall == sorted(kept_overall)  # dev overall never drops as ingredients are added
    _, _, gparams = load_params(g)
    kept = [load_params(r)[2] for r in rec["kept"]]
    assert_tree_allclose(gparams, jax.tree.map(lambda *xs: np.mean(np.stack([np.asarray(x) for x in xs]), 0), *kept), atol=1e-6)
    capsys.readouterr()
    assert main(["evaluate", str(g), "--data-dir", str(tiny_data_dir)]) == 0  # a soup is an ordinary run
    ev = json.loads(capsys.readouterr().out)
    assert ev["overall"] == pytest.approx(rec["dev"]["overall"], abs=1e-6)

    assert main(["soup", str(runs["r0"]), str(runs["cos"]), "--out", str(tmp_path / "bad")]) == 2
    assert "different model (heads.para_head: 'pair' vs 'cosine')" in capsys.readouterr().err


def test_greedy_soup_from_recorded_scores(tmp_path, tiny_vocab_bert_dir, tiny_data_dir, capsys):
    """--recorded-scores ranks the ingredients by the dev metrics their runs recorded (here written from the
    `evaluate` command, the trainer's evaluation) and gives the soup that evaluating each ingredient gives."""
    rs = [_make_run(tmp_path / f"m{i}", tiny_vocab_bert_dir, seed=10 + i, overrides=("dev_limit=1000",)) for i in range(3)]
    for r in rs:
        capsys.readouterr()
        assert main(["evaluate", str(r), "--data-dir", str(tiny_data_dir)]) == 0
        m = json.loads(capsys.readouterr().out)
        (r / "metrics.jsonl").write_text(json.dumps({"step": 0, "epoch": 0, **{k: m[k] for k in (*TASKS, "overall")},
                                                     "best": True}) + "\n")
    common = [*map(str, rs), "--greedy", "--data-dir", str(tiny_data_dir), "--limit", "1000", "--batch-size", "32"]
    assert main(["soup", *common, "--out", str(tmp_path / "ev")]) == 0
    assert main(["soup", *common, "--recorded-scores", "--out", str(tmp_path / "rec")]) == 0
    ev, rec = (json.loads((tmp_path / d / "soup.json").read_text()) for d in ("ev", "rec"))
    np.testing.assert_allclose([m["overall"] for m in rec["ingredient_dev"]], [m["overall"] for m in ev["ingredient_dev"]],
                               atol=1e-5)
    assert rec["kept"] == ev["kept"] and rec["dev"]["overall"] == pytest.approx(ev["dev"]["overall"], abs=1e-6)
    capsys.readouterr()
    # recorded on another dev set than the soup scores on: refused, naming the run
    assert main(["soup", *common[:3], "--greedy", "--recorded-scores", "--data-dir", str(tiny_data_dir),
                 "--out", str(tmp_path / "bad")]) == 2
    assert "recorded on dev_limit=1000, the soup scores on limit=None" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- CLI


def test_ensemble_cli(runs, tmp_path, tiny_data_dir, loaded, capsys):
    order = ("r0", "cos", "r1")  # two vmapped groups, (r0, r1) and (cos): scores must land in the right rows
    spec = {"members": {n: str(runs[n]) for n in order},
            "nodes": {"avg": {"type": "average", "children": ["r0", "r1", "cos"]},
                      "tb": {"type": "task", "sst": "r1", "para": "cos", "sts": "avg"}},
            "output": "avg"}
    sp = tmp_path / "spec.yaml"
    sp.write_text(yaml.safe_dump(spec, sort_keys=False))
    out, npz = tmp_path / "preds", tmp_path / "scores.npz"
    capsys.readouterr()
    assert main(["ensemble", str(sp), "--data-dir", str(tiny_data_dir), "--split", "dev", "--out", str(out),
                 "--scores", str(npz), "--batch-size", "32"]) == 0
    table = capsys.readouterr().out
    for name in order + ("avg", "tb"):
        assert any(line.startswith(name + " ") for line in table.splitlines()), table
    z = np.load(npz)
    assert list(z["names"]) == list(order) + ["avg", "tb"]
    # independent reference: each run's predictions through the single-model eval function
    import bert_jax

    tok = bert_jax.load_tokenizer(runs["r0"])
    ref = {}
    for n in order:
        cfg, mspec, params = loaded[n]
        ef = make_eval_fn(mspec)
        ref[n] = {t: predict_scores(ef, params, D.encode_task(D.load_task(tiny_data_dir, t, "dev"), tok, cfg.data.max_len), 32, cfg.data.buckets)
                  for t in TASKS}
    for t in TASKS:
        for n in order:
            np.testing.assert_allclose(z[f"scores/{n}/{t}"], ref[n][t], atol=1e-5, rtol=0)
        avg = (ref["r0"][t] + ref["r1"][t] + ref["cos"][t]) / 3
        np.testing.assert_allclose(z[f"scores/avg/{t}"], avg, atol=1e-5, rtol=0)
        np.testing.assert_allclose(z[f"scores/tb/{t}"], {"sst": ref["r1"][t], "para": ref["cos"][t], "sts": avg}[t], atol=1e-5)
    labels = D.load_task(tiny_data_dir, "sst", "dev").labels
    row = next(line for line in table.splitlines() if line.startswith("r1 "))
    assert f"{task_metric('sst', ref['r1']['sst'], labels):.4f}" == row.split()[2]
    # leaderboard files of the output node
    sst_lines = (out / "sst-dev-output.csv").read_text().splitlines()
    assert sst_lines[0].startswith("id \t Predicted_Sentiment")
    expect = np.argmax((ref["r0"]["sst"] + ref["r1"]["sst"] + ref["cos"]["sst"]) / 3, -1)
    assert sst_lines[1:] == [f"{i} , {p} " for i, p in zip(z["ids/sst"], expect)]
    assert (out / "para-dev-output.csv").is_file() and (out / "sts-dev-output.csv").is_file()

    # test split: no labels, no table, files only (for --node tb)
    out2 = tmp_path / "test-preds"
    assert main(["ensemble", str(sp), "--data-dir", str(tiny_data_dir), "--split", "test", "--out", str(out2),
                 "--node", "tb", "--batch-size", "32"]) == 0
    assert capsys.readouterr().out == ""
    n_test = len(D.load_task(tiny_data_dir, "sts", "test").ids)
    assert len((out2 / "sts-test-output.csv").read_text().splitlines()) == n_test + 1

    # user errors: one line, exit 2
    assert main(["ensemble", str(sp), "--data-dir", str(tiny_data_dir), "--node", "nope"]) == 2
    assert "--node 'nope' is not a member or node" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**spec, "members": {**spec["members"], "r1": str(tmp_path / "missing")}}))
    assert main(["ensemble", str(tmp_path / "bad.yaml"), "--data-dir", str(tiny_data_dir)]) == 2
    assert "member 'r1': run directory" in capsys.readouterr().err


def test_ensemble_from_recorded_dev_scores(tmp_path, tiny_vocab_bert_dir, tiny_data_dir, capsys):
    """`ensemble --recorded-scores` takes each member's dev scores from its run (recorded at its best evaluation,
    by the single-run trainer and by a population) and gives the table that evaluating the runs gives."""
    data = ["--data-dir", str(tiny_data_dir)]
    base = ["train", "--config", "tiny", "--checkpoint", str(tiny_vocab_bert_dir), "--quiet", *data]
    assert main([*base, "--out", str(tmp_path / "pop"), "--population", "lr=1e-3,2e-4", "--population", "seed=3"]) == 0
    assert main([*base, "--out", str(tmp_path / "one"), "heads.sts_head=cosine", "seed=5"]) == 0
    members = {"a": tmp_path / "pop" / "lr0.001-seed3", "b": tmp_path / "pop" / "lr0.0002-seed3", "c": tmp_path / "one"}
    spec = {"members": {k: str(v) for k, v in members.items()},
            "nodes": {"avg": {"type": "average", "children": ["a", "b", "c"]},
                      "tb": {"type": "task", "sst": "c", "para": "a", "sts": "avg"}}}
    sp = tmp_path / "spec.yaml"
    sp.write_text(yaml.safe_dump(spec, sort_keys=False))
    common = [*data, "--limit", "32"]  # the tiny config's dev_limit
    tables, scores = {}, {}
    for how, flags in (("evaluated", []), ("recorded", ["--recorded-scores"])):
        assert main(["ensemble", str(sp), *common, "--batch-size", "8", "--json", str(tmp_path / f"{how}.json"),
                     "--scores", str(tmp_path / f"{how}.npz"), *flags]) == 0
        tables[how] = {r["name"]: r for r in json.loads((tmp_path / f"{how}.json").read_text())["rows"]}
        scores[how] = dict(np.load(tmp_path / f"{how}.npz"))
    assert list(tables["recorded"]) == ["a", "b", "c", "avg", "tb"]
    for name in tables["recorded"]:
        for t in TASKS:
            np.testing.assert_allclose(scores["recorded"][f"scores/{name}/{t}"], scores["evaluated"][f"scores/{name}/{t}"],
                                       atol=1e-5, rtol=0)
    for name in ("a", "b"):  # (c's cosine STS scores of a random tiny encoder all sit within 1e-5 of 5: its r is ill-conditioned)
        for k in (*TASKS, "overall"):  # 32 dev rows of a random tiny model: r amplifies the scores' 1e-6 differences
            assert tables["recorded"][name][k] == pytest.approx(tables["evaluated"][name][k], abs=2e-4), (name, k)
    capsys.readouterr()
    # another dev set, the test split, and scores of another step than the kept best params: refused, naming the run
    assert main(["ensemble", str(sp), *data, "--limit", "5", "--recorded-scores"]) == 2
    assert f"{members['a']}: dev scores recorded on dev_limit=32, these are scored on limit=5" in capsys.readouterr().err
    assert main(["ensemble", str(sp), *common, "--split", "test", "--scores", str(tmp_path / "t.npz"), "--recorded-scores"]) == 2
    assert "runs record their dev scores only" in capsys.readouterr().err
    z = dict(np.load(members["c"] / "dev_scores.npz"))
    z["step"] = np.int64(int(z["step"]) - 1)
    np.savez(members["c"] / "dev_scores.npz", **z)
    assert main(["ensemble", str(sp), *common, "--recorded-scores"]) == 2
    assert f"{members['c'] / 'dev_scores.npz'}: recorded at step" in capsys.readouterr().err
