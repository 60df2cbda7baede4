import pytest

from pyprune.search.target import BaselineBelowTarget, Target


def test_absolute_target_is_the_accuracy_itself():
    assert Target(accuracy=0.9).resolve(0.93) == 0.9
    assert Target(accuracy=0.93).resolve(0.93) == 0.93  # meeting it exactly is enough


def test_absolute_target_above_the_baseline_is_refused_with_both_figures():
    with pytest.raises(BaselineBelowTarget) as info:
        Target(accuracy=0.95).resolve(0.9312, "cifar10/val")
    message = str(info.value)
    assert "0.9312" in message and "0.9500" in message and "cifar10/val" in message
    assert info.value.baseline == 0.9312 and info.value.target == 0.95


@pytest.mark.parametrize("baseline,drop,expected", [(0.93, 0.01, 0.92), (0.5, 0.0, 0.5), (0.81, 0.1, 0.71)])
def test_relative_target_is_the_baseline_minus_the_drop(baseline, drop, expected):
    assert Target(max_drop=drop).resolve(baseline) == pytest.approx(expected)


@pytest.mark.parametrize("kwargs,message", [({}, "exactly one"), ({"accuracy": 0.9, "max_drop": 0.01}, "exactly one"),
                                            ({"accuracy": 93.0}, "0.93 for 93%"), ({"max_drop": -0.1}, "max-drop")])
def test_bad_targets(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Target(**kwargs)


def test_baseline_line_gives_no_verdict_before_the_target_exists():
    from pyprune.search.candidates import Candidate

    row = lambda stage, meets: Candidate("k", "marginal", "" if stage == "baseline" else "mask(sparsity=0.5)", stage,
                                         None, "val", 0.945, 200, meets, 1000, 10, 0.0, 0.1)
    assert "meets" not in row("baseline", True).summary() and "misses" not in row("baseline", False).summary()
    assert "(meets)" in row("mask", True).summary() and "(misses)" in row("mask", False).summary()
