"""Which passes a setting's model runs from its parent (marginal_oracle.rerun),
by hand: the first stage that moved runs again, then every later stage that is
absolute or was off in the parent; a relative stage already in the weights is
not applied twice."""

import pytest

from pyprune.search.candidates import Stage
from pyprune.search.marginal import Setting
from pyprune.search.marginal_oracle import rerun

SLIM, MASK, QUANT = Stage("slim", (0.1, 0.2)), Stage("mask", (0.5, 0.7)), Stage("quant", (6, 4))
STAGES, ABSOLUTE = [SLIM, MASK, QUANT], [False, True, True]  # slim's ratio is a share of what is left


@pytest.mark.parametrize("parent,setting,expected", [
    # mask moved: it and the absolute quant after it run again; slim is in the weights
    ((0, 0, 0), (0, 1, 0), ["mask(sparsity=0.7)", "quant(bits=6)"]),
    # quant was off in the parent: it runs
    ((0, 0, -1), (0, 0, 1), ["quant(bits=4)"]),
    # slim moved: everything after it runs again
    ((0, 0, 0), (1, 0, 0), ["slim(ratio=0.2)", "mask(sparsity=0.5)", "quant(bits=6)"]),
    # from the baseline: every stage that is on
    ((-1, -1, -1), (0, -1, 1), ["slim(ratio=0.1)", "quant(bits=4)"]),
    # nothing moved: nothing runs
    ((0, 1, 0), (0, 1, 0), []),
])
def test_the_passes_from_a_parent(parent, setting, expected):
    specs, steps = rerun(STAGES, ABSOLUTE, Setting(parent), Setting(setting))
    assert specs == expected
    assert steps == tuple(s.spec(s.levels[i]) for s, i in zip(STAGES, setting) if i >= 0)


def test_a_relative_stage_after_the_first_that_moved_is_not_applied_twice():
    stages, absolute = [MASK, SLIM], [True, False]
    specs, steps = rerun(stages, absolute, Setting((0, 1)), Setting((1, 1)))
    assert specs == ["mask(sparsity=0.7)"] and steps == ("mask(sparsity=0.7)", "slim(ratio=0.2)")


def test_overrides_and_a_forced_first_stage():
    """The per-layer step pushes mask's layers on the chosen model itself: mask and
    the absolute quant run, with the overrides in the text."""
    chosen = Setting((0, 0, 0))
    specs, steps = rerun(STAGES, ABSOLUTE, chosen, chosen, {1: {"conv2": 0.7}}, first=1)
    assert specs == ["mask(sparsity=0.5,layers={'conv2': 0.7})", "quant(bits=6)"]
    assert steps == ("slim(ratio=0.1)", "mask(sparsity=0.5,layers={'conv2': 0.7})", "quant(bits=6)")
