"""Which passes a setting's model runs from its parent (marginal_oracle.rerun),
by hand: the first stage that moved runs again, then every later stage that is
absolute or was off in the parent; a relative stage already in the weights is
not applied twice. And where a deciding measurement starts (``from_baseline``)."""

import pytest
import torch

from pyprune.search.candidates import Stage
from pyprune.search.layerwise import LayerRefinement
from pyprune.search.marginal import Setting
from pyprune.search.marginal_oracle import EvaluatorOracle, rerun

from .tiny import tiny_base, tiny_evaluator

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


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("from_baseline", [False, True])
def test_where_a_deciding_measurement_starts(from_baseline):
    """Accepted: a move is fine-tuned from the model it moves from. Baseline: the
    same weights as the grid's measurement of that pipeline (every pass applied
    to the untouched model, one fine-tune), made by another evaluator."""
    ev, base = tiny_evaluator(target=0.0), tiny_base()
    base.candidate = ev.baseline(base)
    oracle = EvaluatorOracle(ev, [Stage("mask", (0.5, 0.8)), Stage("quant", (6, 4))], base, from_baseline)
    first, move = Setting((0, 0)), Setting((0, 1))
    assert oracle.measure(first).meets and oracle.measure(move).meets
    start = base if from_baseline else oracle.state(first)
    assert oracle.state(move).key.startswith(f"{start.key}>")
    grid_ev, grid_base = tiny_evaluator(target=0.0), tiny_base()
    grid_base.candidate = grid_ev.baseline(grid_base)
    specs = ["mask(sparsity=0.5)", "quant(bits=4)"]
    c = grid_ev.measure_pipeline(grid_base, specs, "grid", None)
    grid = grid_ev.state_of(grid_base, specs, c)
    assert oracle.state(move).steps == grid.steps == tuple(specs)
    assert _same_weights(oracle.state(move).gm, grid.gm) == from_baseline


def test_the_layer_step_measures_from_the_baseline_too():
    """With from_baseline, the per-layer step's measurement is the whole pipeline,
    overrides included, on the untouched model: the weights of applying its text
    to the baseline and fine-tuning once."""
    ev, base = tiny_evaluator(target=0.0), tiny_base()
    base.candidate = ev.baseline(base)
    oracle = EvaluatorOracle(ev, [Stage("mask", (0.5, 0.8))], base, from_baseline=True)
    chosen = Setting((0,))
    oracle.measure(chosen)
    state = LayerRefinement(ev, oracle, margin=1.0).run(chosen).state
    assert state is not None and state.steps == ("mask(sparsity=0.5,layers={'conv2': 0.8})",)
    assert state.key.startswith(f"{base.key}>mask(sparsity=0.5,layers=")
    other, other_base = tiny_evaluator(target=0.0), tiny_base()
    other_base.candidate = other.baseline(other_base)
    c = other.measure_pipeline(other_base, list(state.steps), "grid", None)
    assert _same_weights(state.gm, other.state_of(other_base, list(state.steps), c).gm)
