"""Per-layer settings after the marginal search: the allocation rule by hand, the
floors, and one refinement on a tiny model."""

from types import SimpleNamespace

import pytest
from torch import nn

from pyprune.ir import example_input, propagate_shapes, trace
from pyprune.passes import parse_pipeline
from pyprune.search.candidates import Stage
from pyprune.search.layerwise import (LayerOutcome, LayerRefinement, allocate, floor_layers, screened_layers,
                                      spread_by_divergence)
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


def test_by_divergence_layers_rank_by_bytes_per_unit_of_it_and_fit_by_cost():
    gains = {"a": 1000, "b": 900, "c": 100, "stem": 5000}
    costs = {"a": 0.0, "b": 0.010, "c": 0.001, "stem": 0.0}
    divergences = {"a": 0.05, "b": 0.001, "c": 0.0, "stem": 0.0}
    # by bytes per unit of divergence: c (100 / 1e-9 floor), b (900,000), a (20,000); not by cost (a first)
    assert allocate(gains, costs, 0.02, {"stem"}, divergences) == ["c", "b", "a"]
    assert allocate(gains, costs, 0.005, {"stem"}, divergences) == ["c", "a"]  # b's cost does not fit


def test_spreading_shares_the_stages_summed_cost_by_divergence():
    costs = {"a": 0.010, "b": -0.002, "c": 0.004}  # 0.012 together
    spread = spread_by_divergence(costs, {"a": 1.0, "b": 2.0, "c": 3.0})
    assert spread == pytest.approx({"a": 0.002, "b": 0.004, "c": 0.006})
    # screens that gained together cost nothing, whatever they moved
    assert spread_by_divergence({"a": 0.001, "b": -0.003}, {"a": 1.0, "b": 1.0}) == {"a": 0.0, "b": 0.0}
    # nothing moved: nothing to spread by, the costs stand
    assert spread_by_divergence(costs, {"a": 0.0, "b": 0.0, "c": 0.0}) == costs


class WithShortcut(nn.Module):
    """Two 3x3 body layers beside a 1x1 shortcut, between a stem and a classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body1 = nn.Conv2d(8, 8, 3, padding=1)
        self.body2 = nn.Conv2d(8, 8, 3, padding=1)
        self.shortcut = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        x = self.body2(self.body1(x)) + self.shortcut(x)
        return self.head(x.mean((2, 3)))


def test_floors_are_the_stem_the_classifier_and_1x1_convolutions():
    gm = propagate_shapes(trace(WithShortcut()), example_input(SHAPE))
    assert floor_layers(gm) == {"stem", "shortcut", "head"}
    assert floor_layers(tiny_base().gm) == {"conv1", "fc"}


class WithSmallLayer(nn.Module):
    """Body layers of 3x3x16x16 (2,304 weights), 3x3x16x2 and 3x3x2x16 (288 each)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.wide = nn.Conv2d(16, 16, 3, padding=1)
        self.narrow_in = nn.Conv2d(16, 2, 3, padding=1)
        self.narrow_out = nn.Conv2d(2, 16, 3, padding=1)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = self.wide(self.stem(x))
        return self.head(self.narrow_out(self.narrow_in(x)).mean((2, 3)))


def test_the_step_screens_every_layer_but_the_floors_and_those_under_a_quarter_of_the_mean():
    gm = propagate_shapes(trace(WithSmallLayer()), example_input(SHAPE))
    # mean of the body: (2304 + 288 + 288) / 3 = 960; a quarter is 240, so all three stay
    assert screened_layers(gm, floor_layers(gm)) == ["wide", "narrow_in", "narrow_out"]
    # with no floors the stem and head join the mean: (432 + 2304 + 288 + 288 + 48) / 5 = 672;
    # a quarter is 168, which the 48-weight classifier is under
    assert screened_layers(gm, set()) == ["stem", "wide", "narrow_in", "narrow_out"]
    with_shortcut = propagate_shapes(trace(WithShortcut()), example_input(SHAPE))
    assert screened_layers(with_shortcut, floor_layers(with_shortcut)) == ["body1", "body2"]


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


class JointCost:
    """Screens that lose 0.01 of accuracy per layer pushed, whichever the layers:
    costs that add up, unlike the single-layer screens' promise."""

    target = 0.90

    def __init__(self):
        self.screened = []

    def screen_pipeline(self, parent, specs, stage, level, steps=None):
        (spec,) = parse_pipeline(",".join(specs))
        n = len(spec.options.get("layers", {}))
        self.screened.append(n)
        return SimpleNamespace(size_bytes=1000 - n, phase="screen", estimate=parent.val_accuracy - 0.01 * n)

    def screen_estimate(self, parent, c):
        return c.estimate


def test_an_allocation_is_halved_until_its_joint_screen_is_within_the_margin():
    ev = JointCost()
    oracle = SimpleNamespace(stages=[Stage("mask", (0.5, 0.8))], absolute=[True])
    refinement = LayerRefinement(ev, oracle, margin=0.005)
    parent = SimpleNamespace(val_accuracy=0.93)
    layers = {f"l{i}": 0.8 for i in range(8)}
    # 8 layers estimate 0.85, 4 layers 0.89: below 0.90 - 0.005; 2 layers 0.91 fit, the best two
    outcome = LayerOutcome(None)
    chosen, estimate = refinement._fit_on_screen(outcome, parent, Setting((0,)), {}, 0, layers, 0.93)
    assert chosen == {"l0": 0.8, "l1": 0.8} and estimate == pytest.approx(0.91)
    assert ev.screened == [8, 4, 2] and [m.kind for m in outcome.moves] == [
        "mask: 8 layers +1", "mask: 4 layers +1", "mask: 2 layers +1"]
    ev.target = 0.93  # the best layer alone is left: its own screen fitted when it was allocated
    assert refinement._fit_on_screen(outcome, parent, Setting((0,)), {}, 0, layers, 0.93) == ({"l0": 0.8}, None)
    assert ev.screened[3:] == [8, 4, 2]


def test_under_the_proportional_model_a_joint_screen_is_judged_by_its_expected_recovery():
    ev = JointCost()
    oracle = SimpleNamespace(stages=[Stage("mask", (0.5, 0.8))], absolute=[True])
    refinement = LayerRefinement(ev, oracle, margin=0.005, share=0.5)
    parent = SimpleNamespace(val_accuracy=0.93)
    layers = {f"l{i}": 0.8 for i in range(8)}
    # 8 layers screen 0.85: expected 0.85 + 0.5 * 0.08 = 0.89 < 0.90 - 0.005; 4 layers 0.89:
    # expected 0.91, measured (the additive margin of 0.005 stopped at 2 layers, above)
    outcome = LayerOutcome(None)
    assert list(refinement._fit_on_screen(outcome, parent, Setting((0,)), {}, 0, layers, 0.93)[0]) == [
        "l0", "l1", "l2", "l3"]
    assert ev.screened == [8, 4]
    # the allocation's slack is the drop whose unrecovered half still meets: (0.93 - 0.90 + 0.005) / 0.5
    assert abs(refinement.slack(0.93) - 0.07) < 1e-12
    assert abs(LayerRefinement(ev, oracle, margin=0.005).slack(0.93) - 0.035) < 1e-12
    # from a lower start the same screen is a smaller drop, so less is expected of it
    assert refinement.within(0.88, 0.93) and not refinement.within(0.88, 0.90)


class FakeStep:
    """The evaluator the step sees, by ``_estimate(specs)`` -> (accuracy, bytes): a
    screen advances the clock ``now`` 1 s and a deciding measurement 10 s, and the
    measurements are recorded (their pipelines, efforts and ``untrained_first``)."""

    def __init__(self):
        self.now = 0.0
        self.measured, self.efforts, self.untrained_first = [], [], []

    def screen_pipeline(self, parent, specs, stage, level, steps=None):
        self.now += 1.0
        estimate, size = self._estimate(specs)
        return SimpleNamespace(size_bytes=size, phase="screen", estimate=estimate, extra=self._extra(specs))

    def _extra(self, specs):
        return {}

    def screen_estimate(self, parent, c):
        return c.estimate

    def measure_pipeline(self, parent, specs, stage, level, steps=None, effort=1, untrained_first=False):
        self.now += 10.0
        self.measured.append(steps)
        self.efforts.append(effort)
        self.untrained_first.append(untrained_first)
        estimate, size = self._estimate(specs)
        return SimpleNamespace(size_bytes=size, phase="finetune", accuracy=estimate, meets=estimate >= self.target)

    def state_of(self, parent, specs, c, steps=None):
        return SimpleNamespace(steps=steps, candidate=c, val_accuracy=c.accuracy, gm=parent.gm)


class FloorsMatter(FakeStep):
    """mask at 0.7: floors back at 0.5 screen `floor_gain` better; each body layer at
    0.8 screens 0.015 worse and saves 100 bytes; the floors back cost 10 bytes."""

    target = 0.90

    def __init__(self, floor_gain):
        super().__init__()
        self.floor_gain = floor_gain

    def _estimate(self, specs):
        (spec,) = parse_pipeline(",".join(specs))
        layers = spec.options.get("layers", {})
        back = sum(v == 0.5 for v in layers.values()) == 3
        pushed = sum(v == 0.8 for v in layers.values())
        return 0.91 + (self.floor_gain if back else 0.0) - 0.015 * pushed, 10000 - 100 * pushed + (10 if back else 0)


def test_floors_kept_less_compressed_give_their_accuracy_to_the_other_layers():
    gm = propagate_shapes(trace(WithShortcut()), example_input(SHAPE))
    parent = SimpleNamespace(gm=gm, val_accuracy=0.91, candidate=SimpleNamespace(size_bytes=10000))
    oracle = SimpleNamespace(stages=[Stage("mask", (0.5, 0.7, 0.8))], absolute=[True], state=lambda s: parent,
                             measured_from=lambda setting, overrides, accepted: accepted)
    ev = FloorsMatter(floor_gain=0.02)
    outcome = LayerRefinement(ev, oracle, margin=0.001, effort=4).run(Setting((1,)))
    assert ev.efforts == [4]  # fine-tuned as long as the measurement that verified the chosen model
    # the floors back buy 2 points: the slack (0.93 - 0.90) now pays for both bodies at 0.8
    assert outcome.state is not None and outcome.state.candidate.size_bytes == 10000 - 200 + 10
    (steps,) = ev.measured
    (spec,) = parse_pipeline(",".join(steps))
    assert spec.options["sparsity"] == 0.7 and spec.options["layers"] == {
        "head": 0.5, "shortcut": 0.5, "stem": 0.5, "body1": 0.8, "body2": 0.8}
    assert [m.kind for m in outcome.moves][0] == "mask: floors -1"

    ev = FloorsMatter(floor_gain=-0.01)  # the floors back screen worse: kept at 0.7, and 1 point of slack buys nothing
    outcome = LayerRefinement(ev, oracle, margin=0.001).run(Setting((1,)))
    assert outcome.state is None and ev.measured == []


def test_the_compiles_per_layer_step_judges_screens_by_the_searchs_recovery_model(monkeypatch):
    from pyprune.compile import driver
    from pyprune.search.marginal import MarginalSearch

    seen, shares = [], []
    share_at = MarginalSearch.share_at

    def run(self, setting):
        seen.append(self.share)
        return LayerOutcome(None)

    def recorded_share_at(self, effort):
        shares.append(share_at(self, effort))
        return shares[-1]

    monkeypatch.setattr(LayerRefinement, "run", run)
    monkeypatch.setattr(MarginalSearch, "share_at", recorded_share_at)
    for recovery in ("additive", "proportional"):
        ev, base = tiny_evaluator(target=0.0), tiny_base()
        base.candidate = ev.baseline(base)
        driver._marginal(ev, base, [Stage("mask", (0.5, 0.8))], 0.1, 1, per_layer=True, recovery=recovery)
    # the share the search holds at the verified effort when the step starts
    assert seen == [None, shares[-1]] and 0 < shares[-1] <= 1


class Ladder(FakeStep):
    """mask from 0.5 on the ladder (0.5, 0.7, 0.8, 0.9): every position a body layer
    goes past 0.5 costs it 0.01 of accuracy and saves 100 bytes; the floors stay.
    A screen advances the clock 1 s and a deciding measurement 10 s."""

    target = 0.8995  # not 0.90: 0.95 - 0.05 lands either side of it in floating point
    levels = (0.5, 0.7, 0.8, 0.9)

    def __init__(self, minutes=None):
        from pyprune.search.evaluator import Budget

        super().__init__()
        self.budget = Budget(minutes, SimpleNamespace(replayed_seconds=0.0), clock=lambda: self.now)

    def expected_seconds(self, phase):
        return {"screen": 1.0, "finetune": 10.0}[phase]

    def _estimate(self, specs):
        (spec,) = parse_pipeline(",".join(specs))
        layers = spec.options.get("layers", {})
        past = sum(self.levels.index(layers.get(name, spec.options["sparsity"])) for name in ("body1", "body2"))
        return 0.95 - 0.01 * past, 10000 - 100 * past


def _ladder_refinement(ev, margin=0.001):
    gm = propagate_shapes(trace(WithShortcut()), example_input(SHAPE))
    parent = SimpleNamespace(gm=gm, val_accuracy=0.95, candidate=SimpleNamespace(size_bytes=10000))
    oracle = SimpleNamespace(stages=[Stage("mask", Ladder.levels)], absolute=[True], state=lambda s: parent,
                             measured_from=lambda setting, overrides, accepted: accepted)
    return LayerRefinement(ev, oracle, margin=margin)


def _pushed(steps):
    (spec,) = parse_pipeline(",".join(steps))
    return {name: level for name, level in spec.options["layers"].items() if name.startswith("body")}


def test_a_round_that_kept_a_model_is_followed_by_one_from_it_each_layer_one_position_further():
    ev = Ladder()
    outcome = _ladder_refinement(ev).run(Setting((0,)))
    # round 1: both bodies 0.5 -> 0.7 (0.02 of the 0.0515 slack from 0.95); round 2 from
    # 0.93: both to 0.8 (0.02 of 0.0315); round 3 from 0.91: one of them fits in 0.0115;
    # round 4 from 0.90: the other's 0.01 does not fit in 0.0015, nothing is kept, the step ends
    assert [_pushed(steps) for steps in ev.measured] == [
        {"body1": 0.7, "body2": 0.7}, {"body1": 0.8, "body2": 0.8}, {"body1": 0.9, "body2": 0.8}]
    assert outcome.state.candidate.size_bytes == 10000 - 100 * 5 and not outcome.budget_exhausted
    kinds = [m.kind for m in outcome.moves]
    assert kinds[:3] == ["mask body1+1", "mask body2+1", "mask: 2 layers +1"]
    assert "round 2: mask body1+1" in kinds and "round 4: mask body2+1" in kinds
    assert not any(k.startswith("round 5") for k in kinds)
    # every push screened at or above the target: each was first measured untrained
    assert ev.untrained_first == [True, True, True]
    # a limit on the rounds is kept
    ev = Ladder()
    assert _ladder_refinement(ev).run(Setting((0,)), rounds=1).state.candidate.size_bytes == 10000 - 200
    assert len(ev.measured) == 1


def test_a_later_round_starts_only_if_its_screens_and_one_measurement_fit_the_budget():
    # round 1 takes 13 s (2 screens, 1 joint screen, 1 measurement); a later round of two
    # layers is expected to take (2 + 5) screens + 1 measurement = 17 s
    ev = Ladder(minutes=40 / 60)  # round 2 fits (13 + 17 < 40), round 3 does not (26 + 17)
    outcome = _ladder_refinement(ev).run(Setting((0,)))
    assert [_pushed(steps) for steps in ev.measured] == [{"body1": 0.7, "body2": 0.7}, {"body1": 0.8, "body2": 0.8}]
    assert outcome.budget_exhausted and outcome.state.candidate.size_bytes == 10000 - 400
    assert not any(m.kind.startswith("round 3") for m in outcome.moves)  # refused before its first screen
    assert ev.now == 26.0


class TwoStages(Ladder):
    """mask (0.5, 0.7, 0.8) then quant (8, 6, 4) bits: a body layer costs 0.005 per
    position past the start on either ladder and saves 100 bytes per mask position,
    300 per quant position."""

    target = 0.8995
    ladders = {"mask": (0.5, 0.7, 0.8), "quant": (8, 6, 4)}
    saving = {"mask": 100, "quant": 300}

    def _estimate(self, steps):
        cost, size = 0.0, 10000
        for spec in parse_pipeline(",".join(steps)):
            levels, option = self.ladders[spec.name], "sparsity" if spec.name == "mask" else "bits"
            layers = spec.options.get("layers", {})
            past = sum(levels.index(layers.get(name, spec.options[option])) for name in ("body1", "body2"))
            cost, size = cost + 0.005 * past, size - self.saving[spec.name] * past
        return 0.95 - cost, size

    def screen_pipeline(self, parent, specs, stage, level, steps=None):
        return super().screen_pipeline(parent, steps, stage, level)

    def measure_pipeline(self, parent, specs, stage, level, steps=None, effort=1, untrained_first=False):
        return super().measure_pipeline(parent, steps, stage, level, steps=steps, effort=effort,
                                        untrained_first=untrained_first)


def test_a_later_round_starts_with_the_stage_that_saved_most_in_the_one_before():
    gm = propagate_shapes(trace(WithShortcut()), example_input(SHAPE))
    parent = SimpleNamespace(gm=gm, val_accuracy=0.95, candidate=SimpleNamespace(size_bytes=10000))
    stages = [Stage("mask", TwoStages.ladders["mask"]), Stage("quant", TwoStages.ladders["quant"])]
    oracle = SimpleNamespace(stages=stages, absolute=[True, True], state=lambda s: parent,
                             measured_from=lambda setting, overrides, accepted: accepted)
    ev = TwoStages()
    outcome = LayerRefinement(ev, oracle, margin=0.001).run(Setting((0, 0)), rounds=2)
    measured = [m.kind for m in outcome.moves if m.verified]
    # round 1 in the search's order; quant saved 600 bytes to mask's 200, so round 2 starts with it
    assert measured == ["mask: 2 layers +1", "quant: 2 layers +1", "round 2: quant: 2 layers +1",
                        "round 2: mask: 2 layers +1"]
    assert outcome.state.candidate.size_bytes == 10000 - 2 * 2 * 100 - 2 * 2 * 300


def test_a_push_that_screens_below_the_target_is_fine_tuned_without_an_untrained_look_first():
    ev = Ladder()
    ev.target = 0.935  # two bodies pushed screen 0.93: within the 0.02 margin, under the target
    outcome = _ladder_refinement(ev, margin=0.02).run(Setting((0,)), rounds=1)
    # that misses; its first half, body1 alone, is judged on its own screen (0.94), which meets
    assert [_pushed(steps) for steps in ev.measured] == [{"body1": 0.7, "body2": 0.7}, {"body1": 0.7}]
    assert ev.untrained_first == [False, True] and outcome.state.candidate.size_bytes == 10000 - 100


class NoisyScreens(FakeStep):
    """mask at 0.5 -> 0.7 per body layer. In truth body1 costs 0.02 and body2 nothing;
    the single-layer screens say the opposite (body1 0.0, body2 0.02: noise), while
    their divergences (body1 0.05, body2 0.001) follow the truth. Joint screens and
    deciding measurements see the truth. Each push saves 100 bytes."""

    target = 0.90
    truth = {"body1": 0.02, "body2": 0.0}
    noise = {"body1": 0.0, "body2": 0.02}
    divergence = {"body1": 0.05, "body2": 0.001}

    def _pushed(self, specs):
        (spec,) = parse_pipeline(",".join(specs))
        return [name for name, v in spec.options.get("layers", {}).items() if v == 0.7]

    def _estimate(self, specs):
        pushed = self._pushed(specs)
        costs = self.noise if len(pushed) == 1 and not self.measuring else self.truth
        return 0.915 - sum(costs[n] for n in pushed), 10000 - 100 * len(pushed)

    def _extra(self, specs):
        pushed = self._pushed(specs)
        return {"divergence": sum(self.divergence[n] for n in pushed)}

    measuring = False

    def measure_pipeline(self, *args, **kwargs):
        self.measuring = True
        try:
            return super().measure_pipeline(*args, **kwargs)
        finally:
            self.measuring = False


@pytest.mark.parametrize("by_divergence", [True, False])
def test_divergences_keep_a_layer_that_screened_cheap_by_noise_out_of_the_push(by_divergence):
    gm = propagate_shapes(trace(WithShortcut()), example_input(SHAPE))
    parent = SimpleNamespace(gm=gm, val_accuracy=0.915, candidate=SimpleNamespace(size_bytes=10000))
    oracle = SimpleNamespace(stages=[Stage("mask", (0.5, 0.7))], absolute=[True], state=lambda s: parent,
                             measured_from=lambda setting, overrides, accepted: accepted)
    ev = NoisyScreens()
    # slack 0.015 + 0.001: one layer's 0.02 does not fit, so one of the two is pushed
    outcome = LayerRefinement(ev, oracle, margin=0.001, by_divergence=by_divergence).run(Setting((0,)), rounds=1)
    (steps,) = ev.measured
    if by_divergence:
        # the summed cost 0.02 spread: body1 0.0196, body2 0.0004; body2 pushed, and meets
        assert _pushed(steps) == {"body2": 0.7}
        assert outcome.state is not None and outcome.state.candidate.size_bytes == 9900
    else:
        # by its own screen body1 is free: pushed, and misses
        assert _pushed(steps) == {"body1": 0.7} and outcome.state is None


class PerLayerBits(FakeStep):
    """quant on the ladder (8, 6, 4) over WithSmallLayer's body (wide: 2,304 weights,
    narrow_in and narrow_out: 288 each): every body layer one position past 8 bits
    costs 0.01 of accuracy and saves bytes in proportion to its weights. Records the
    layers of every screen."""

    target = 0.93

    def __init__(self):
        super().__init__()
        self.screened = []

    def _estimate(self, specs):
        (spec,) = parse_pipeline(",".join(specs))
        pushed = sorted(name for name, bits in spec.options.get("layers", {}).items() if bits < 8)
        self.screened.append(pushed)
        weights = {"wide": 2304, "narrow_in": 288, "narrow_out": 288}
        return 0.955 - 0.01 * len(pushed), 10000 - sum(weights[n] for n in pushed) // 4


def _bits_refinement(ev):
    gm = propagate_shapes(trace(WithSmallLayer()), example_input(SHAPE))
    parent = SimpleNamespace(gm=gm, val_accuracy=0.955, candidate=SimpleNamespace(size_bytes=10000))
    oracle = SimpleNamespace(stages=[Stage("quant", (8, 6, 4))], absolute=[True], state=lambda s: parent,
                             measured_from=lambda setting, overrides, accepted: accepted)
    return LayerRefinement(ev, oracle, margin=0.001)


def test_a_stage_whose_single_layers_a_screen_cannot_see_is_pushed_by_weights_and_fitted_on_joint_screens():
    assert not Stage("quant").layer_screens and Stage("mask").layer_screens
    ev = PerLayerBits()
    outcome = _bits_refinement(ev).run(Setting((0,)), rounds=1)
    # no layer screened alone: all three together (0.925 misses 0.93 - 0.001), then the
    # first half by weights, the wide layer alone (0.945), which is measured and kept
    assert ev.screened[:2] == [["narrow_in", "narrow_out", "wide"], ["wide"]]
    assert [m.kind for m in outcome.moves] == ["quant: 3 layers +1", "quant: 1 layers +1", "quant: 1 layers +1"]
    (steps,) = ev.measured
    assert parse_pipeline(",".join(steps))[0].options["layers"] == {"wide": 6}
    assert outcome.state.candidate.size_bytes == 10000 - 2304 // 4
    assert ev.untrained_first == [True]  # its joint screen met the target


def test_without_single_layer_screens_a_push_that_fits_no_joint_screen_measures_nothing():
    ev = PerLayerBits()
    ev.target = 0.95  # one layer screens 0.945: under 0.95 - 0.001
    outcome = _bits_refinement(ev).run(Setting((0,)), rounds=1)
    assert ev.screened == [["narrow_in", "narrow_out", "wide"], ["wide"]]
    assert ev.measured == [] and outcome.state is None
