"""train/loop.py: the shared training loop calls its hooks at their intervals (hand-listed expectations)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from train.loop import Loop, StepMetrics, first_non_finite


class _Sched:
    """A stand-in for `train.data.Schedule`: 4 steps per epoch, the batch of global step g is g."""

    steps_per_epoch = 4

    def batches(self, start, stop):
        yield from ((g, g) for g in range(start, stop))


def _loop(total: int, stop_before: int | None = None):
    polls = SimpleNamespace(n=0)

    def should_stop() -> bool:
        polls.n += 1
        return stop_before is not None and polls.n > stop_before

    loop, calls = Loop(_Sched(), total, should_stop), []
    loop.add_hook(lambda i: calls.append(("every3", i.step)), every=3)
    loop.add_hook(lambda i: calls.append(("end", i.step, i.epoch, i.boundary, i.stopped)), epoch_end=True)
    return loop, calls


def test_hooks_run_at_their_intervals_and_epoch_ends():
    loop, calls = _loop(total=10)

    def step_fn(state: list, g: int, batch: int):
        assert batch == g  # the batch of global step g
        return state + [g], {"loss": float(g)}

    state, step, stopped = loop.run(step_fn, [], start=1)
    assert (state, step, stopped) == (list(range(1, 10)), 10, False)
    assert calls == [("every3", 3), ("end", 4, 0, True, False), ("every3", 6), ("end", 8, 1, True, False),
                     ("every3", 9), ("end", 10, 2, True, False)]  # the run's end (mid-epoch) counts as an epoch end


def test_a_stop_calls_the_epoch_end_hooks_without_a_boundary():
    loop, calls = _loop(total=10, stop_before=5)
    state, step, stopped = loop.run(lambda s, g, b: (s + 1, None), 0, start=0)
    assert (state, step, stopped) == (5, 5, True)
    assert calls == [("every3", 3), ("end", 4, 0, True, False), ("end", 5, 1, False, True)]


def test_nothing_to_do_and_bad_hooks():
    loop, calls = _loop(total=8)
    assert loop.run(lambda s, g, b: (s, None), "s", start=8) == ("s", 8, False) and calls == []
    with pytest.raises(ValueError, match="either every N steps or at epoch ends"):
        loop.add_hook(print)
    with pytest.raises(ValueError, match="every must be >= 1"):
        loop.add_hook(print, every=0)


def test_step_metrics_pull_and_non_finite():
    buf = StepMetrics()
    for s, loss in ((1, 0.5), (2, float("nan"))):
        buf.add(SimpleNamespace(step=s, metrics={"loss": loss, "acc": float("nan")}))
    host = buf.pull()
    assert host[0] == (1, {"loss": 0.5, "acc": pytest.approx(float("nan"), nan_ok=True)}) and buf.pull() == []
    assert first_non_finite(host)[0] == 2  # a non-watched NaN (acc) alone does not count
    assert first_non_finite([(3, {"loss": [0.1, float("inf")], "grad_norm": [1.0, 2.0]})])[0] == 3
    assert first_non_finite([(3, {"loss": [0.1, 0.2]})]) is None


def test_eval_due_every_nth_epoch_and_at_the_end():
    from train.loop import eval_due

    # 3 epochs of 4 steps, then a run cut at step 10 by max_steps
    assert [s for s in range(13) if eval_due(s, 4, 12, 1)] == [4, 8, 12]
    assert [s for s in range(13) if eval_due(s, 4, 12, 3)] == [12]
    assert [s for s in range(13) if eval_due(s, 4, 12, 2)] == [8, 12]
    assert [s for s in range(11) if eval_due(s, 4, 10, 3)] == [10]
