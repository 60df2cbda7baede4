"""The heuristic search: how far each technique goes, one stage at a time.

For each stage (by default slim, then mask, then quant; lossless Huffman storage
is always last and free), on the model the earlier stages accepted:

1. **Screen** by bisection over the stage's ladder of settings: BatchNorm
   recalibration plus accuracy on a subset of val. Accuracy falls as the setting
   grows, so ``log2(n)`` screens find ``s``, the most aggressive setting that
   meets the target with no training at all.
2. **Probe** the first setting past ``s`` with the deciding measurement:
   fine-tuning for the step's budget, then accuracy on all of val. What it
   recovers over its screen estimate calibrates the margin: ``--recover-margin``
   at first, 1.5x the largest recovery seen in this search after that. If the
   probe misses the target, the boundary is ``s`` (accuracy is monotone).
3. **Bound** what fine-tuning might recover: ``u``, the most aggressive setting
   whose screen estimate is within the margin of the target (bisection again).
4. **Decide** by bisection over ``(probe, u]`` with the deciding measurement.
   Only candidates between the screened and the recoverable boundary are ever
   fine-tuned. If none past ``s`` meets the target, ``s`` itself is verified the
   same way (and, if it fails, the settings below it), because the screen ran on
   a subset only.

Screen estimates are paired: the parent's val accuracy plus the child-minus-
parent difference on the same screening images (:meth:`Evaluator.screen_estimate`).

The accepted candidate's model (fine-tuned if it was) is the next stage's
start. When the time budget runs out, the stage keeps its best verified setting
and the later stages are skipped, so a tiny budget still gives a valid model.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .boundary import last_passing
from .candidates import Candidate, Stage, State
from .evaluator import BudgetExhausted, Evaluator


@dataclass
class StageOutcome:
    stage: str
    level: float | int | None  # None: the stage was skipped (nothing met the target)
    screened: float | int | None  # the screened boundary s
    recoverable: float | int | None  # the bound u of what fine-tuning might recover
    margin: float
    screens: int = 0
    measured: int = 0
    budget_exhausted: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SearchOutcome:
    final: State
    order: tuple[str, ...]
    stages: list[StageOutcome] = field(default_factory=list)
    budget_exhausted: bool = False
    l1: dict[str, Any] | None = None
    orders: list[dict[str, Any]] | None = None
    moves: list[dict[str, Any]] | None = None  # the marginal search's trail (pyprune.search.marginal.Move)
    kept_on_screen: bool = False  # the answer was verified after the budget ran out


def _level(stage: Stage, i: int) -> float | int | None:
    return stage.levels[i] if i >= 0 else None


class HeuristicSearch:
    def __init__(self, evaluator: Evaluator, stages: list[Stage], margin: float = 0.1,
                 screen_only: bool = False) -> None:
        self.ev = evaluator
        self.stages = stages
        self.initial_margin = margin
        self.screen_only = screen_only
        self.recoveries: list[float] = []

    @property
    def margin(self) -> float:
        if not self.recoveries:
            return self.initial_margin
        return max(self.initial_margin, 1.5 * max(self.recoveries))

    def _meets_screen(self, parent: State, stage: Stage, result: StageOutcome, slack: float = 0.0):
        def passes(i: int) -> bool:
            result.screens += 1
            return self.ev.screen_meets(parent, stage, stage.levels[i], slack)
        return passes

    def run(self, base: State) -> SearchOutcome:
        outcome = SearchOutcome(base, tuple(s.name for s in self.stages))
        state = base
        for stage in self.stages:
            state, result = self.run_stage(state, stage)
            outcome.stages.append(result)
            self.ev.forget(keep=state.key)
            if result.budget_exhausted:
                outcome.budget_exhausted = True
                self.ev.progress.say(f"time budget spent during {stage.name}: keeping "
                                     f"{state.pipeline or 'the baseline'}; later stages skipped")
                break
        outcome.final = state
        return outcome

    def run_stage(self, parent: State, stage: Stage) -> tuple[State, StageOutcome]:
        n = len(stage.levels)
        result = StageOutcome(stage.name, None, None, None, self.margin)
        verified: dict[int, Candidate] = {}  # index -> deciding measurement that met the target
        screened = -1
        self.ev.progress.expect(2 * math.ceil(math.log2(n + 1)))

        def measure(i: int) -> bool:
            c = self.ev.measure(parent, stage, stage.levels[i])
            result.measured += 1
            if c.status == "ok" and c.phase == "finetune":
                estimate = self.ev.screen_estimate(parent, self.ev.screen(parent, stage, stage.levels[i]))
                if estimate is not None:
                    self.recoveries.append(c.accuracy - estimate)
            if c.meets:
                verified[i] = c
            return c.meets

        try:
            screened = last_passing(self._meets_screen(parent, stage, result), -1, n)
            result.screened = _level(stage, screened)
            if self.screen_only:
                accept = screened
            else:
                accept = screened
                if self.ev.settings.finetune_epochs > 0 and screened < n - 1:
                    probe = screened + 1
                    if measure(probe):
                        result.margin = self.margin
                        bound = last_passing(self._meets_screen(parent, stage, result, self.margin), probe, n)
                        result.recoverable = _level(stage, bound)
                        accept = last_passing(measure, probe, bound + 1)
                    else:
                        result.margin, result.recoverable = self.margin, _level(stage, screened)
                if accept == screened and screened >= 0 and not measure(screened):
                    accept = last_passing(measure, -1, screened)
        except BudgetExhausted:
            result.budget_exhausted = True
            accept = max(verified, default=-1) if not self.screen_only else screened
        result.level = _level(stage, accept)
        if accept < 0:
            return parent, result
        spec = [stage.spec(stage.levels[accept])]
        if self.screen_only:
            c = self.ev.screen(parent, stage, stage.levels[accept])
        else:
            c = verified[accept]
        return self.ev.state_of(parent, spec, c), result


def explore_orders(evaluator: Evaluator, base: State, stages: list[Stage], margin: float) -> tuple[list[Stage], list[dict]]:
    """Compare every order of ``stages`` on a cheap proxy: the screen-only search
    (recalibration, no fine-tuning), by the size of the model it ends with.
    Returns the stages in the best order (ties keep the given order) and one row
    per order."""
    rows = []
    best: tuple[int, int] | None = None
    best_order = stages
    for rank, order in enumerate(itertools.permutations(stages)):
        outcome = HeuristicSearch(evaluator, list(order), margin, screen_only=True).run(base)
        final = outcome.final
        size = final.candidate.size_bytes if final.candidate is not None else evaluator.size(final)[0]
        rows.append({"order": [s.name for s in order], "pipeline": final.pipeline, "size_bytes": size,
                     "levels": {r.stage: r.level for r in outcome.stages}})
        evaluator.forget()
        if best is None or (size, rank) < best:
            best, best_order = (size, rank), list(order)
        if outcome.budget_exhausted:
            break
    return best_order, rows
