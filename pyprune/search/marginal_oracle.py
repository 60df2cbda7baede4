"""The marginal-rate search's view of a real model: a setting (one ladder position
per stage) becomes a pass pipeline applied to the closest model already measured.

A setting's model is reached from a *parent*: the baseline, or a setting verified
earlier (fine-tuned, so its weights carry that training forward). A parent fits
when it is at most the setting in every stage and every stage whose knob is not
absolute (slim's ratio is a share of the channels still there) is either off in
the parent or at the same position. From the first stage where the two differ,
the setting's passes run again in order, so a later stage's invariant holds
after an earlier one moved (quantization after more masking); a relative stage
at its parent's position is not run twice: its effect is already in the weights.
Of the fitting parents the most compressed one is used, which makes a move from
the accepted model cheap and exact, and a swap (one stage backed off) start from
an earlier model.

With ``from_baseline`` a deciding measurement (not a screen) instead starts from
the model the search started from, every pass of the setting applied afresh, as
the grid measures. Fine-tuning a fine-tuned model again restarts the learning
rate on weights that have settled, and re-quantizing shared values loses what
the first codebook rounded away: in ``bench/search_vs_grid.py``'s run,
``mask(0.5),quant(4)`` measured 0.8445 from the accepted ``mask(0.5),quant(6)``
and 0.8535 from the baseline, with the same 0.05 epoch (0.847 and 0.857 with
another seed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..passes import pass_class
from .candidates import Candidate, Stage, State
from .evaluator import Evaluator
from .marginal import Point, Setting


def rerun(stages: Sequence[Stage], absolute: Sequence[bool], parent: Setting, setting: Setting,
          overrides: Mapping[int, dict[str, Any]] | None = None,
          first: int | None = None) -> tuple[list[str], tuple[str, ...]]:
    """(the passes that take ``parent``'s model to ``setting``, the pipeline the result
    stands for), with per-layer ``overrides`` by stage. From stage ``first`` (by
    default the first where the two differ) the stage runs again, and so does every
    later stage that is on in ``setting`` and either absolute or off in ``parent``:
    a relative stage already in the weights is not applied twice."""
    overrides = overrides or {}
    if first is None:
        first = next((k for k, (p, t) in enumerate(zip(parent.index, setting.index)) if p != t), len(stages))
    specs, steps = [], []
    for k, (stage, p, t) in enumerate(zip(stages, parent.index, setting.index)):
        if t < 0:
            continue
        spec = stage.spec(stage.levels[t], overrides.get(k))
        steps.append(spec)
        if k == first or (k > first and (absolute[k] or p < 0)):
            specs.append(spec)
    return specs, tuple(steps)


class EvaluatorOracle:
    """:class:`~.marginal.SettingOracle` over an :class:`Evaluator`; ``base`` is the
    model every setting starts from (the baseline, or a sparsity-trained copy)."""

    def __init__(self, ev: Evaluator, stages: Sequence[Stage], base: State, from_baseline: bool = False) -> None:
        self.ev = ev
        self.stages = list(stages)
        self.base = base
        self.from_baseline = from_baseline
        off = Setting.off(len(self.stages))
        self.states: dict[Setting, State] = {off: base}
        self.absolute = [pass_class(s.name).knob.absolute for s in self.stages]

    @property
    def target(self) -> float:
        return self.ev.target

    def steps(self, setting: Setting) -> tuple[str, ...]:
        """The pipeline text a setting stands for, stage by stage in the search's order."""
        return rerun(self.stages, self.absolute, setting, setting)[1]

    def fits(self, parent: Setting, setting: Setting) -> bool:
        return parent.at_most(setting) and all(
            absolute or p < 0 or p == t for absolute, p, t in zip(self.absolute, parent.index, setting.index))

    def parent(self, setting: Setting) -> tuple[Setting, list[str]]:
        """The setting of the state to start from, and the passes that take it to ``setting``."""
        fitting = [p for p in self.states if self.fits(p, setting)]
        chosen = max(fitting, key=lambda p: (sum(i + 1 for i in p.index), p))
        return chosen, rerun(self.stages, self.absolute, chosen, setting)[0]

    def measured_from(self, setting: Setting, overrides: Mapping[int, dict[str, Any]] | None = None,
                      accepted: tuple[State, list[str]] | None = None) -> tuple[State, list[str]]:
        """Where a deciding measurement of ``setting`` (with per-layer ``overrides``)
        starts, and the passes that take it there: ``accepted`` (a state and passes
        chosen by the caller) or the closest fitting parent, unless ``from_baseline``
        asks for the base model and every pass."""
        if self.from_baseline:
            return self.base, rerun(self.stages, self.absolute, Setting.off(len(self.stages)), setting, overrides)[0]
        if accepted is not None:
            return accepted
        parent, specs = self.parent(setting)
        return self.states[parent], specs

    def _label(self, parent: Setting, setting: Setting) -> tuple[str, object]:
        """(the stages that moved, joined by "+"; the level, when one stage moved)."""
        moved = [(s, i) for s, i, p in zip(self.stages, setting.index, parent.index) if i != p]
        stage = "+".join(s.name for s, _ in moved) or "baseline"
        return stage, (moved[0][0].levels[moved[0][1]] if len(moved) == 1 and moved[0][1] >= 0 else None)

    def _point(self, setting: Setting, c: Candidate, verified: bool) -> Point:
        accuracy = c.extra.get("estimate", c.accuracy) if c.status == "ok" else None
        return Point(setting, accuracy, c.size_bytes, c.meets, verified)

    def screen(self, setting: Setting) -> Point:
        parent, specs = self.parent(setting)
        stage, level = self._label(parent, setting)
        c = self.ev.screen_pipeline(self.states[parent], specs, stage, level, steps=self.steps(setting))
        return self._point(setting, c, verified=False)

    def measure(self, setting: Setting, final: bool = False, effort: int = 1) -> Point:
        if setting == Setting.off(len(self.stages)):
            c = self.base.candidate
            return Point(setting, c.accuracy, c.size_bytes, True, True)
        parent, specs = self.parent(setting)
        stage, level = self._label(parent, setting)
        start, specs = self.measured_from(setting, accepted=(self.states[parent], specs))
        steps = self.steps(setting)
        c = self.ev.measure_pipeline(start, specs, stage, level, steps=steps, within_budget=not final, effort=effort)
        if c.meets:
            self.states[setting] = self.ev.state_of(start, specs, c, steps=steps)
        return self._point(setting, c, verified=True)

    def state(self, setting: Setting) -> State:
        return self.states[setting]
