"""Bisection on synthetic monotone accuracy functions: the boundary is found
exactly, with about log2(n) evaluations, never at the known ends; and the
heuristic search finds the fine-tuned boundary while fine-tuning few candidates."""

import math
from types import SimpleNamespace

import pytest

from pyprune.search.boundary import last_passing
from pyprune.search.candidates import Candidate, Stage, State
from pyprune.search.heuristic import HeuristicSearch


@pytest.mark.parametrize("n", [1, 2, 7, 16, 19, 100])
def test_last_passing_finds_every_boundary_with_log_evaluations(n):
    for boundary in range(-1, n):
        asked = []

        def passes(i):
            asked.append(i)
            return i <= boundary

        assert last_passing(passes, -1, n) == boundary
        assert len(asked) <= math.ceil(math.log2(n + 1))
        assert all(0 <= i < n for i in asked)
        assert len(set(asked)) == len(asked)


def test_last_passing_respects_known_ends():
    asked = []
    assert last_passing(lambda i: asked.append(i) or i <= 6, 3, 10) == 6
    assert all(3 < i < 10 for i in asked)
    assert last_passing(lambda i: pytest.fail("nothing to ask"), 4, 5) == 4
    with pytest.raises(ValueError):
        last_passing(lambda i: True, 5, 5)


class FakeEvaluator:
    """Accuracy as a function of the setting: ``screen(level)`` with no training,
    ``tuned(level)`` after fine-tuning. Counts what a real evaluator would pay for."""

    def __init__(self, screen, tuned, target, finetune_epochs=1.0):
        self.screen_acc, self.tuned_acc = screen, tuned
        self.target = target
        self.settings = SimpleNamespace(finetune_epochs=finetune_epochs)
        self.progress = SimpleNamespace(expect=lambda n: None, say=lambda s: None)
        self.screened, self.tuned = set(), set()

    def _candidate(self, phase, level, acc):
        return Candidate(f"{level}#{phase}", "heuristic", f"x({level})", "mask", level, phase, acc, 100,
                         acc >= self.target, 1000, 10, 1.0 if phase == "finetune" else 0.0, 0.0)

    def screen(self, parent, stage, level):
        self.screened.add(level)
        return self._candidate("screen", level, self.screen_acc(level))

    def screen_estimate(self, parent, candidate):
        return candidate.accuracy

    def screen_meets(self, parent, stage, level, slack=0.0):
        return self.screen(parent, stage, level).accuracy >= self.target - slack

    def measure(self, parent, stage, level):
        self.tuned.add(level)
        return self._candidate("finetune", level, self.tuned_acc(level))

    def state_of(self, parent, specs, candidate):
        return State(parent.gm, (*parent.steps, *specs), candidate.key, candidate=candidate,
                     val_accuracy=candidate.accuracy)

    def forget(self, keep=None):
        pass


LEVELS = tuple(round(0.02 * i, 2) for i in range(1, 50))  # 49 sparsities 0.02 .. 0.98


@pytest.mark.parametrize("screen_edge,recovery", [(0.3, 0.2), (0.5, 0.05), (0.7, 0.0), (0.02, 0.5)])
def test_heuristic_finds_the_fine_tuned_boundary_fine_tuning_few(screen_edge, recovery):
    # accuracy falls linearly past screen_edge; fine-tuning recovers `recovery` of the loss
    screen = lambda s: 0.9 - max(0.0, s - screen_edge)
    tuned = lambda s: min(0.9, screen(s) + recovery * max(0.0, s - screen_edge))
    target = 0.85
    ev = FakeEvaluator(screen, tuned, target)
    search = HeuristicSearch(ev, [Stage("mask", LEVELS)], margin=0.1)
    outcome = search.run(State(None, val_accuracy=0.9))
    expected = max((s for s in LEVELS if tuned(s) >= target), default=None)
    assert outcome.stages[0].level == expected
    assert outcome.final.candidate is not None and outcome.final.candidate.meets
    # brute force would fine-tune all 49; bisection a handful, and only near the boundary
    assert len(ev.tuned) <= 2 + 2 * math.ceil(math.log2(len(LEVELS) + 1)), sorted(ev.tuned)
    assert len(ev.screened) <= 3 * math.ceil(math.log2(len(LEVELS) + 1))
    # fine-tuned: the screened boundary, the probe just past it, or settings within the margin
    screened = outcome.stages[0].screened
    probe = LEVELS[LEVELS.index(screened) + 1] if screened is not None else LEVELS[0]
    for s in ev.tuned:
        assert s <= (screened or 0) or s == probe or screen(s) >= target - search.margin - 1e-9, s


def test_heuristic_without_fine_tuning_uses_screens_and_verifies_once():
    screen = lambda s: 0.9 - max(0.0, s - 0.4)
    ev = FakeEvaluator(screen, screen, 0.85, finetune_epochs=0.0)
    outcome = HeuristicSearch(ev, [Stage("mask", LEVELS)]).run(State(None, val_accuracy=0.9))
    assert outcome.stages[0].level == 0.44
    assert ev.tuned == {0.44}  # the one deciding measurement, on all of val


def test_heuristic_skips_a_stage_when_nothing_meets_the_target():
    ev = FakeEvaluator(lambda s: 0.5, lambda s: 0.6, 0.85)
    base = State(None, val_accuracy=0.9)
    outcome = HeuristicSearch(ev, [Stage("mask", LEVELS)]).run(base)
    assert outcome.stages[0].level is None and outcome.final is base
