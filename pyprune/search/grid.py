"""The brute-force baseline (``--search grid``), as the paper compares against:
every combination of the stages' settings (each stage also "off"), applied to the
model in the stage order, each with the same per-candidate treatment as the
heuristic's deciding measurement (BatchNorm recalibration, fine-tuning for the
step's budget, accuracy on all of val). The smallest model that meets the target
wins. Nothing is shared between combinations: that is the cost being measured."""

from __future__ import annotations

import itertools

from .candidates import Candidate, Stage, State
from .evaluator import BudgetExhausted, Evaluator
from .heuristic import SearchOutcome


def grid_combinations(stages: list[Stage]) -> list[list[str]]:
    """Every pipeline of the grid, the empty one (the baseline) excluded."""
    ladders = [(None, *stage.levels) for stage in stages]
    combos = []
    for levels in itertools.product(*ladders):
        specs = [stage.spec(level) for stage, level in zip(stages, levels) if level is not None]
        if specs:
            combos.append(specs)
    return combos


class GridSearch:
    def __init__(self, evaluator: Evaluator, stages: list[Stage]) -> None:
        self.ev = evaluator
        self.stages = stages

    def run(self, base: State) -> SearchOutcome:
        combos = grid_combinations(self.stages)
        self.ev.progress.expect(len(combos))
        outcome = SearchOutcome(base, tuple(s.name for s in self.stages))
        best: tuple[Candidate, list[str]] | None = None
        for specs in combos:
            try:
                c = self.ev.measure_pipeline(base, specs, "grid", None)
            except BudgetExhausted:
                outcome.budget_exhausted = True
                self.ev.progress.say("time budget spent: the grid stops here and keeps its best so far")
                break
            if c.meets and (best is None or c.size_bytes < best[0].size_bytes):
                best = (c, specs)
            # Keep only the best model in memory: a grid holds hundreds of candidates.
            self.ev.forget(keep=best[0].key.removesuffix("#val") if best else None)
        if best is not None:
            outcome.final = self.ev.state_of(base, best[1], best[0])
        return outcome
