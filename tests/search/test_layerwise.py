"""Per-layer settings after the marginal search: the allocation rule by hand, the
floors, and one refinement on a tiny model."""

from torch import nn

from pyprune.ir import example_input, propagate_shapes, trace
from pyprune.search.candidates import Stage
from pyprune.search.layerwise import LayerRefinement, allocate, floor_layers
from pyprune.search.marginal import Setting
from pyprune.search.marginal_oracle import EvaluatorOracle

from .tiny import SHAPE, tiny_base, tiny_evaluator


def test_allocation_takes_bytes_per_point_first_within_the_slack_and_never_a_floor():
    gains = {"a": 1000, "b": 900, "c": 100, "stem": 5000, "d": 0}
    costs = {"a": 0.010, "b": 0.001, "c": 0.0, "stem": 0.0, "d": 0.0}
    # by bytes per point: c (100 / 1e-4 floor), b (900,000), a (100,000); d saves nothing; stem is a floor
    assert allocate(gains, costs, slack=0.005, floors={"stem"}) == ["c", "b"]
    assert allocate(gains, costs, slack=0.02, floors={"stem"}) == ["c", "b", "a"]
    assert allocate(gains, costs, slack=0.02) == ["stem", "c", "b", "a"]
    # a layer that does not fit is skipped, cheaper ones after it are still taken
    assert allocate({"x": 500, "y": 10}, {"x": 0.05, "y": 0.001}, slack=0.01) == ["y"]
    assert allocate(gains, costs, slack=-0.01) == []


class WithShortcut(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.shortcut = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        x = self.body(x) + self.shortcut(x)
        return self.head(x.mean((2, 3)))


def test_floors_are_the_stem_the_classifier_and_1x1_convolutions():
    gm = propagate_shapes(trace(WithShortcut()), example_input(SHAPE))
    assert floor_layers(gm) == {"stem", "shortcut", "head"}
    assert floor_layers(tiny_base().gm) == {"conv1", "fc"}


def test_a_refinement_pushes_only_the_layers_outside_the_floors_and_keeps_what_meets():
    ev, base = tiny_evaluator(target=0.0), tiny_base()
    mask = Stage("mask", (0.5, 0.8))
    oracle = EvaluatorOracle(ev, [mask], base)
    base.candidate = ev.baseline(base)
    chosen = Setting((0,))
    assert oracle.measure(chosen).meets
    outcome = LayerRefinement(ev, oracle, margin=1.0).run(chosen)
    screened = [m.kind for m in outcome.moves if not m.verified]
    assert screened == ["mask conv2+1"]  # conv1 (stem) and fc (classifier) are floors
    state = outcome.state
    assert state is not None and state.steps == ("mask(sparsity=0.5,layers={'conv2': 0.8})",)
    conv2 = state.gm.get_submodule("conv2").weight
    assert int((conv2 == 0).sum()) == round(0.8 * conv2.numel())  # held through fine-tuning
    assert state.candidate.size_bytes < oracle.state(chosen).candidate.size_bytes
    # the pipeline text, applied to the baseline, prunes the same share of conv2
    again = ev.apply(base, list(state.steps)).gm.get_submodule("conv2").weight
    assert int((again == 0).sum()) == int((conv2 == 0).sum())


def test_a_refinement_that_misses_the_target_keeps_nothing():
    ev, base = tiny_evaluator(target=0.0), tiny_base()
    oracle = EvaluatorOracle(ev, [Stage("mask", (0.5, 0.8))], base)
    base.candidate = ev.baseline(base)
    chosen = Setting((0,))
    oracle.measure(chosen)
    ev.target = 1.01  # nothing meets from here on
    outcome = LayerRefinement(ev, oracle, margin=2.0).run(chosen)
    assert outcome.state is None
    assert [m.accepted for m in outcome.moves if m.verified] == [False]  # one layer: all of it, then nothing left
