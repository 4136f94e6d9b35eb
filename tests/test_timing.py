"""train/timing.py: the one interleaved timer of every bench (moved here from test_torch_baseline)."""

import time

import pytest

from train.timing import interleave


def test_interleave_alternates_arms():
    order = []
    t = interleave({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, 4)
    assert "".join(order) == "abbaabba"
    assert len(t.wall["a"]) == len(t.cpu["b"]) == 4


def test_interleave_three_arms_times_each_call():
    order = []
    t = interleave({"a": lambda: order.append("a"), "b": lambda: (order.append("b"), time.sleep(0.02)),
                    "c": lambda: order.append("c")}, 3)
    assert "".join(order) == "abccbaabc"
    assert min(t.wall["b"]) >= 0.02 > max(t.wall["a"] + t.wall["c"])  # sleeping: wall time, no CPU time
    assert max(t.cpu["b"]) < 0.02
    with pytest.raises(ValueError, match="reps >= 1"):
        interleave({"a": print}, 0)
