"""The search behind ``pyprune compile``: how far to push each technique, and in
which order, so that the model still meets an accuracy target.

* :mod:`.target`: absolute or relative targets;
* :mod:`.boundary`: bisection over a ladder of settings;
* :mod:`.candidates`: stages, states (models reached by accepted steps) and candidates;
* :mod:`.journal`: the candidate cache, on disk for ``--resume``;
* :mod:`.evaluator`: screening, fine-tuning and sizing a candidate;
* :mod:`.heuristic` and :mod:`.grid`: the two searches.

What a search found is reported by :mod:`pyprune.compile.report`.
"""

from .boundary import last_passing
from .candidates import Candidate, Stage, State, make_stages
from .evaluator import Budget, BudgetExhausted, EvalSettings, Evaluator, SearchData
from .grid import GridSearch, grid_combinations
from .heuristic import HeuristicSearch, SearchOutcome, StageOutcome, explore_orders
from .journal import Journal, ResumeMismatch
from .target import BaselineBelowTarget, Target

__all__ = ["BaselineBelowTarget", "Budget", "BudgetExhausted", "Candidate",
           "EvalSettings", "Evaluator", "GridSearch", "HeuristicSearch", "Journal", "ResumeMismatch",
           "SearchData", "SearchOutcome", "Stage", "StageOutcome", "State", "Target", "explore_orders",
           "grid_combinations", "last_passing", "make_stages"]
