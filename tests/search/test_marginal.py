"""The marginal-rate search's decision rules, on fake models whose accuracy and
size are functions of the setting (so every expectation is computed by hand)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyprune.search.evaluator import BudgetExhausted
from pyprune.search.marginal import MIN_SAVING, MarginalSearch, Point, Setting


class FakeOracle:
    """``accuracy(index)`` and ``size(index)`` define the model; a screen sees
    ``accuracy - screen_gap`` (fine-tuning recovers that much)."""

    def __init__(self, accuracy: Callable[[tuple[int, ...]], float], size: Callable[[tuple[int, ...]], int],
                 target: float, screen_gap: float = 0.0, calls: int | None = None) -> None:
        self.accuracy, self.size, self.target, self.gap = accuracy, size, target, screen_gap
        self.calls = calls  # BudgetExhausted after this many screens and measurements
        self.screened: list[tuple[int, ...]] = []
        self.measured: list[tuple[tuple[int, ...], bool]] = []  # (setting, final)
        self.efforts: list[int] = []
        self.recovery = 0.0  # accuracy each extra unit of fine-tuning effort adds
        self.measured_size: Callable[[tuple[int, ...]], int] | None = None  # when fine-tuning changes the bytes

    def _spend(self, final: bool) -> None:
        if self.calls is not None and not final:
            if self.calls <= 0:
                raise BudgetExhausted("fake budget")
            self.calls -= 1

    def screen(self, setting: Setting) -> Point:
        self._spend(False)
        self.screened.append(setting.index)
        a = self.accuracy(setting.index) - self.gap
        return Point(setting, a, self.size(setting.index), a >= self.target, False)

    def measure(self, setting: Setting, final: bool = False, effort: int = 1) -> Point:
        if setting.stages_on:
            self._spend(final)
            self.measured.append((setting.index, final))
            self.efforts.append(effort)
        a = self.accuracy(setting.index) + self.recovery * (effort - 1)
        size = (self.measured_size or self.size)(setting.index)
        return Point(setting, a, size, a >= self.target or not setting.stages_on, True)


def linear(costs: tuple[float, ...], gains: tuple[int, ...], full: int = 10_000):
    """Each position of stage i costs ``costs[i]`` accuracy and saves ``gains[i]`` bytes."""
    def accuracy(index):
        return 1.0 - sum(c * (i + 1) for c, i in zip(costs, index))

    def size(index):
        return full - sum(g * (i + 1) for g, i in zip(gains, index))
    return accuracy, size


def start_at(search: MarginalSearch, index: tuple[int, ...]) -> Setting:
    setting = Setting(index)
    assert search.measure(setting).meets
    return setting


def test_a_move_goes_to_the_stage_with_the_most_bytes_per_point():
    # stage 0: 100 bytes for 0.01 (10,000 per point); stage 1: 50 bytes for 0.001 (50,000 per point)
    oracle = FakeOracle(*linear((0.01, 0.001), (100, 50)), target=0.9)
    search = MarginalSearch(oracle, (8, 8), names=("a", "b"))
    search.trade(start_at(search, (0, 0)))
    first = next(m for m in search.outcome.moves if m.phase == "trade" and m.verified)
    assert first.kind == "b+1" and first.setting == (0, 1) and first.accepted
    assert first.rate == pytest.approx(50 / 0.001)


def test_a_move_that_promises_next_to_no_bytes_is_not_worth_a_fine_tune():
    # stage a: free, but 1 byte a position (rate 1 / MIN_COST = 10,000 per point);
    # stage b: 100 bytes for 0.02 (5,000 per point). By rate alone a would be measured first.
    oracle = FakeOracle(*linear((0.0, 0.02), (1, 100)), target=0.9)
    search = MarginalSearch(oracle, (8, 8), names=("a", "b"))
    start = start_at(search, (0, 0))
    assert 1 < MIN_SAVING * oracle.size(start.index) < 100
    search.trade(start)
    measured = [index for index, _ in oracle.measured]
    assert measured[1] == (0, 1)  # after the start, b's move
    assert all(index[1] > 0 for index in measured[1:])  # no measurement was spent on a's moves alone
    assert search.outcome.best.setting.index[1] == 4  # b went as far as the target allows (0.98 - 4 * 0.02 > 0.9)


def test_a_move_or_swap_whose_measured_file_is_larger_than_the_screen_promised_is_not_taken():
    # one stage: (1,) screens 800 bytes from (0,)'s 900, but measures 950 once fine-tuned
    accuracy, size = linear((0.001,), (100,), full=1000)
    oracle = FakeOracle(accuracy, size, target=0.9)
    oracle.measured_size = lambda index: 950 if index == (1,) else size(index)
    search = MarginalSearch(oracle, (3,), names=("a",))
    assert search.trade(start_at(search, (0,))) == Setting((0,))
    assert [(m.setting, m.accepted) for m in search.outcome.moves if m.verified] == [((1,), False)]

    # two stages, no move meets from (1, 0); the swap a-1,b+1 screens 210 bytes under it
    # (a: 10 bytes a position, b: 100) but measures 20 over it
    accuracy, size = linear((0.02, 0.02), (10, 100), full=1000)
    oracle = FakeOracle(accuracy, size, target=0.935)
    oracle.measured_size = lambda index: 900 if index == (0, 1) else size(index)
    search = MarginalSearch(oracle, (3, 3), names=("a", "b"))
    assert search.trade(start_at(search, (1, 0))) == Setting((1, 0))
    swaps = [m for m in search.outcome.moves if m.phase == "swap" and m.verified]
    assert [(m.kind, m.bytes, m.accepted) for m in swaps] == [("a-1,b+1", 900, False)]


def test_a_stage_that_buys_less_than_it_costs_is_backed_off_by_a_swap():
    # From (2, 1) neither stage can go further; trading a position of the costly,
    # cheap-in-bytes stage 0 for two of stage 1 saves bytes at the same target.
    oracle = FakeOracle(*linear((0.02, 0.005), (10, 100), full=1000), target=0.93)
    search = MarginalSearch(oracle, (8, 8), names=("a", "b"))
    end = search.trade(start_at(search, (2, 1)))
    swaps = [m for m in search.outcome.moves if m.phase == "swap" and m.accepted]
    assert swaps and swaps[0].kind == "a-1,b+2" and swaps[0].setting == (1, 3)
    assert end.index[0] < 2 and search.measured[end].bytes < 770
    # by hand: stage 1 at the end of its ladder (1 - 0.005 * 8 = 0.96), then stage 0 one position
    # (0.94); two would be 0.92 < 0.93
    assert end == Setting((0, 7))


def test_dropping_a_technique_altogether_is_reachable():
    # stage 0 costs a lot and saves almost nothing: the best answer has it off
    oracle = FakeOracle(*linear((0.03, 0.01), (1, 100), full=2000), target=0.9)
    outcome = MarginalSearch(oracle, (6, 12), names=("a", "b")).run()
    assert outcome.best.setting.index == (-1, 9)  # 1 - 0.01 * 10 = 0.90 meets; 11 positions would not


def test_every_technique_is_on_after_a_few_screens_and_one_fine_tune():
    oracle = FakeOracle(*linear((0.004, 0.004, 0.004), (100, 100, 100)), target=0.95, screen_gap=0.01)
    search = MarginalSearch(oracle, (8, 8, 8), margin=0.02)
    search.measure(Setting.off(3))
    search.alone()
    together = search.together()
    assert together.stages_on == 3 and search.measured[together].meets
    assert len(oracle.measured) == 1 and len(oracle.screened) <= 3 * 4 + 3


def test_the_answer_is_never_larger_than_a_single_technique_endpoint():
    # Techniques that clash: together they lose far more than apart.
    def accuracy(index):
        on = [i for i in index if i >= 0]
        return 1.0 - 0.01 * sum(i + 1 for i in on) - (0.2 if len(on) > 1 else 0.0)

    def size(index):
        return 10_000 - 300 * (index[0] + 1) - 200 * (index[1] + 1)
    oracle = FakeOracle(accuracy, size, target=0.95)
    outcome = MarginalSearch(oracle, (8, 8)).run()
    singles = [size(s) for s, _ in oracle.measured if sum(i >= 0 for i in s) == 1 and accuracy(s) >= 0.95]
    assert outcome.best is not None and singles and outcome.best.bytes <= min(singles)
    assert outcome.best.setting.index == (4, -1)  # 5 positions of the stage that saves more


@settings(max_examples=60, deadline=None)
@given(costs=st.lists(st.floats(0.001, 0.05), min_size=2, max_size=3),
       gains=st.lists(st.integers(1, 400), min_size=3, max_size=3),
       clash=st.floats(0.0, 0.1), target=st.floats(0.85, 0.99))
def test_property_never_above_any_screened_setting_that_met(costs, gains, clash, target):
    n = len(costs)

    def accuracy(index):
        on = sum(i >= 0 for i in index)
        return 1.0 - sum(c * (i + 1) for c, i in zip(costs, index)) - clash * max(0, on - 1)

    def size(index):
        return 20_000 - sum(g * (i + 1) for g, i in zip(gains, index))
    oracle = FakeOracle(accuracy, size, target)
    search = MarginalSearch(oracle, (6,) * n)
    outcome = search.run()
    met = [p.bytes for s, p in search.screens.items() if p.meets]
    if met:
        assert outcome.best is not None and outcome.best.bytes <= min(met)
    if outcome.best is not None:
        assert accuracy(outcome.best.setting.index) >= target


def test_when_the_budget_runs_out_a_screened_answer_is_verified_not_dropped():
    oracle = FakeOracle(*linear((0.01, 0.01), (100, 100)), target=0.95, calls=4)  # 4 screens, no measurement
    outcome = MarginalSearch(oracle, (8, 8)).run()
    assert outcome.budget_exhausted and outcome.kept_on_screen
    assert outcome.best is not None and outcome.best.meets
    assert [final for _, final in oracle.measured] == [True]  # exactly one measurement past the budget
    smallest_met = min((oracle.size(s) for s in oracle.screened if oracle.accuracy(s) >= 0.95))
    assert outcome.best.bytes == smallest_met


def test_with_a_verified_answer_a_spent_budget_measures_nothing_more():
    oracle = FakeOracle(*linear((0.01, 0.01), (100, 100)), target=0.95)
    search = MarginalSearch(oracle, (8, 8))
    search.measure(Setting.off(2))
    search.alone()
    together = search.together()
    oracle.calls = 0
    search.outcome.budget_exhausted = True
    search.settle(final=True)
    assert search.outcome.best.setting == together and all(not f for _, f in oracle.measured)


def test_untaken_moves_are_retried_with_more_fine_tuning_while_there_is_effort_left():
    # one stage, 0.006 a position: 0.994, 0.988, 0.982, 0.976 against 0.985; each doubling
    # of fine-tuning recovers 0.005 more, so position 2 meets at effort 2, position 3 never
    oracle = FakeOracle(*linear((0.006,), (100,)), target=0.985)
    oracle.recovery = 0.005
    once = MarginalSearch(oracle, (4,), margin=0.01, max_effort=1).run()
    assert once.best.setting.index == (1,) and set(oracle.efforts) == {1}
    oracle.efforts.clear()
    search = MarginalSearch(oracle, (4,), margin=0.01, max_effort=2)
    twice = search.run()
    assert twice.best.setting.index == (2,) and twice.best.bytes < once.best.bytes
    assert set(oracle.efforts) == {1, 2}
    # what the per-layer step measures at: the least effort at which a setting met
    assert search.verified_effort(Setting((2,))) == 2 and search.verified_effort(Setting((1,))) == 1


def test_a_near_miss_is_trained_on_at_once_and_a_far_miss_is_not():
    # 0.006 a position against 0.985: position 2 (0.982) misses by 0.003, within the
    # first near-miss allowance (0.01), and one more fine-tune adds 0.005, so it is
    # measured again at effort 2 straight away and met; that continuation sets the
    # allowance to 0.005, so position 3 (0.976, 0.009 short) is not trained on.
    oracle = FakeOracle(*linear((0.006,), (100,)), target=0.985)
    oracle.recovery = 0.005
    search = MarginalSearch(oracle, (4,), margin=0.02, names=("a",), max_effort=2)
    search.trade(start_at(search, (1,)))
    measured = [(index, effort) for (index, _), effort in zip(oracle.measured, oracle.efforts)]
    assert measured == [((1,), 1), ((2,), 1), ((2,), 2), ((3,), 1)]
    trail = [(m.kind, m.setting, m.accepted) for m in search.outcome.moves if m.verified]
    assert trail == [("a+1 trained on", (2,), True), ("a+1", (3,), False)]
    assert search.outcome.best.setting == Setting((2,)) and search.near_miss == pytest.approx(0.005)


def test_without_effort_left_a_near_miss_is_not_trained_on():
    oracle = FakeOracle(*linear((0.006,), (100,)), target=0.985)
    oracle.recovery = 0.005
    search = MarginalSearch(oracle, (4,), margin=0.02, max_effort=1)
    search.trade(start_at(search, (1,)))
    assert set(oracle.efforts) == {1} and search.outcome.best.setting == Setting((1,))


def test_short_ladders_still_go_together_in_one_fine_tune():
    # one setting per stage: every share below 1/2 rounds each stage off (the baseline),
    # which must not stop the bisection from reaching all three on
    oracle = FakeOracle(*linear((0.01, 0.01, 0.01), (100, 100, 100)), target=0.9)
    search = MarginalSearch(oracle, (1, 1, 1))
    search.measure(Setting.off(3))
    search.alone()
    assert search.together() == Setting((0, 0, 0)) and len(oracle.measured) == 1


class DamageOracle(FakeOracle):
    """A screen starts from the most compressed setting measured so far that it
    extends (as the real oracle's does) and sees ``k`` times more damage than
    fine-tuning leaves: ``accuracy - k * (start - accuracy)``, so fine-tuning wins back
    the share ``k / (1 + k)`` of every screen's own drop."""

    def __init__(self, *args, k: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.k = k
        self.kept: list[tuple[int, ...]] = []

    def _start(self, setting: Setting) -> float:
        parents = [Setting(s) for s in self.kept if Setting(s).at_most(setting)] + [Setting.off(len(setting.index))]
        return self.accuracy(max(parents, key=lambda p: sum(i + 1 for i in p.index)).index)

    def screen(self, setting: Setting) -> Point:
        point = super().screen(setting)
        a = self.accuracy(setting.index)
        point.accuracy = a - self.k * (self._start(setting) - a)
        point.meets = point.accuracy >= self.target
        return point

    def measure(self, setting: Setting, final: bool = False, effort: int = 1) -> Point:
        point = super().measure(setting, final, effort)
        if point.meets and setting.stages_on:
            self.kept.append(setting.index)
        return point


def test_the_proportional_model_expects_the_largest_share_of_a_drop_seen_won_back():
    # by hand: two moves from the baseline (1.0) screened at 0.90 and 0.80 measure 0.96
    # and 0.94, winning back 0.6 and 0.7 of their drops; a screen at 0.70 that started
    # from 0.95 is then expected at 0.70 + 0.7 * 0.25
    values = {(0, -1): (0.90, 0.96), (1, -1): (0.80, 0.94)}
    oracle = FakeOracle(lambda s: values.get(s, (0, 1.0))[1], lambda s: 100 - sum(s), target=0.9)
    oracle.screen = lambda s: Point(s, values[s.index][0], 1, False, False)
    search = MarginalSearch(oracle, (4, 4), recovery="proportional")
    search.measure(Setting.off(2))
    assert search.share_at(1) == 0.5  # the prior, before two were seen
    for index in values:
        search.screen(Setting(index), start=1.0)
        search.measure(Setting(index))
    assert search.shares[1] == pytest.approx([0.6, 0.7]) and search.share_at(1) == pytest.approx(0.7)
    later = Point(Setting((2, -1)), 0.70, 1, False, False)
    search.starts[later.setting] = 0.95
    assert search.expected(later) == pytest.approx(0.70 + 0.7 * 0.25)


def test_a_large_move_the_additive_margin_rules_out_is_measured_under_the_proportional_model():
    # stage a: 0.001 per position for 30 bytes; stage b: 0.01 for 1000. A screen sees 3x
    # the damage fine-tuning leaves (k = 3), so b's first position, truly 0.989 from
    # (0, -1), screens at 0.959: under a 0.01 margin the additive rule never measures it
    # (and the margin it learns from a's small moves only narrows), while 0.959 plus half
    # its 0.04 drop is expected to meet 0.97.
    ends = {}
    for recovery in ("additive", "proportional"):
        oracle = DamageOracle(*linear((0.001, 0.01), (30, 1000), full=10_000), target=0.97, k=3)
        search = MarginalSearch(oracle, (8, 8), margin=0.01, names=("a", "b"), recovery=recovery)
        ends[recovery] = search.trade(start_at(search, (0, -1)))
        if recovery == "proportional":
            b_moves = [m for m in search.outcome.moves if m.verified and m.kind.startswith("b")]
            assert b_moves[0].setting == (0, 0) and b_moves[0].accepted
            assert search.shares[1][0] == pytest.approx(0.75)  # k / (1 + k), measured
    assert ends["additive"].index[1] == -1
    # b at two positions (0.999 - 0.02 = 0.979; a third would be 0.969), then a to 0.97
    assert ends["proportional"].index[1] == 1 and oracle.accuracy(ends["proportional"].index) >= 0.97
    assert oracle.size(ends["proportional"].index) < oracle.size(ends["additive"].index) - 1900


def test_under_the_proportional_model_the_first_setting_is_bolder_and_still_one_fine_tune():
    # k = 1: fine-tuning wins back half of a screen's drop, which is the prior share, so
    # the expectation is exact; the additive rule's phases 1 and 2 stop where the bare
    # screen meets, at half the true drop
    found = {}
    for recovery in ("additive", "proportional"):
        oracle = DamageOracle(*linear((0.004, 0.004, 0.004), (100, 100, 100)), target=0.95, k=1)
        search = MarginalSearch(oracle, (16, 16, 16), margin=0.02, recovery=recovery)
        search.measure(Setting.off(3))
        search.alone()
        found[recovery] = search.together()
        assert len(oracle.measured) == 1 and search.measured[found[recovery]].meets
    assert found["proportional"].stages_on == 3
    assert oracle.size(found["proportional"].index) < oracle.size(found["additive"].index)


def test_an_unknown_recovery_model_is_refused():
    with pytest.raises(ValueError, match="recovery must be one of additive, proportional"):
        MarginalSearch(FakeOracle(*linear((0.01,), (1,)), target=0.9), (4,), recovery="hopeful")
