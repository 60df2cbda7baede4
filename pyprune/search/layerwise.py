"""Per-layer settings: after the marginal search, what is left of the accuracy
budget is spent layer by layer, where it buys the most bytes. The search keeps
time back for this step (:meth:`LayerRefinement.expected_seconds`).

For each stage whose knob has a per-layer option (quantization's and masking's
``layers``) and that is on in the chosen setting with a further position on its
ladder, every layer but the *floors* and the smallest layers (:func:`screened_layers`)
is screened one position further than the rest (BatchNorm recalibration,
screening subset): what it costs (estimated points of val accuracy), how far it
moves the predictions (KL divergence from the chosen model's, same images) and what
it saves (bytes). One layer's top-1 cost is a few images in a thousand, about what
noise flips, so the stage's summed cost is shared among its layers by their
divergences (:func:`spread_by_divergence`), and :func:`allocate` takes layers by
bytes per unit of divergence until their summed cost uses the slack: the chosen
model's val accuracy minus the target, plus the recovery margin (what fine-tuning
has been seen to recover). Under the proportional recovery model (``share``, see :mod:`.marginal`) a
push is judged as the marginal search judges a move: fine-tuning is expected to win
back ``share`` of the screen's drop from the chosen model, so the slack is the drop
whose unrecovered part still meets the target. A stage whose single layers do not show on a screen (quantization: one layer a
bit coarser moves top-1 by less than a screen's noise; ``Knob.layer_screens``)
skips those screens: all its layers are taken, most non-zero weights first, and the
joint screens' halving below decides how many. Single-layer costs do not add up
(two layers pushed together cost more than the two alone), so the allocation is
screened as a whole first and halved, best layers kept, until that joint screen is
within the margin of the target. Only
then is it measured like any candidate (fine-tuned, all of val), and kept if it
meets the target and is smaller; when it misses, the first half of it is screened
and measured again, twice at most. A push whose screen already meets the target
is first measured without training (recalibrated, all of val): if that meets, no
fine-tune is spent on it (``Evaluator.measure_pipeline``'s ``untrained_first``).

Floors are the stem (the first weight layer), the classifier (the last) and 1x1
convolutions (the shortcuts): small layers whose errors reach every later layer.
They are never pushed further. Where the stage's ladder allows it, they are first
screened one position *less* compressed than the rest (more bits, fewer zeros): if
that estimates better than the chosen model, they keep that position, and the
accuracy it buys back (for a few bytes) joins the slack of the other layers.

The step runs in *rounds*. A round that kept a smaller model is followed by
another from that model, each layer one position further than where it now is
(a layer pushed in the first round is screened two positions past the chosen
setting), while the budget lasts: a round after the first starts a stage only if
its screens and one deciding measurement fit in what is left. The search keeps
time back for the first round only; later ones spend what the budget has left
at the end, which nothing else would (a ResNet-56 hour ended 14.5 minutes early
after one round). A later round takes the stages in the order of the bytes they
saved in the one before, most first, since the budget may end it before the last.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import fx, nn

from ..passes import weight_layers
from .candidates import Stage, State
from .evaluator import BudgetExhausted, Evaluator
from .marginal import MIN_COST, MIN_MARGIN, Move, Setting, expected_recovery
from .marginal_oracle import EvaluatorOracle, rerun

MAX_TRIES = 3  # measurements of one stage's allocation: all of it, then halves
# A layer with fewer weights than this share of the mean (over the layers that are not
# floors) is not screened: pushed one step further it saves too few bytes to pay for
# its screen. On ResNet-56 that skips the 18 16-channel layers (2,304 weights each,
# 4.9% of its weights together), a third of the step's screens.
SMALL_SHARE = 0.25
# A push that moved no prediction ranks by its bytes alone (as MIN_COST does for costs).
MIN_DIVERGENCE = 1e-9


def floor_layers(gm: fx.GraphModule) -> set[str]:
    """The stem, the classifier and every 1x1 convolution of ``gm``."""
    layers = weight_layers(gm)
    floors = {layers[0], layers[-1]} if layers else set()
    for name in layers:
        m = gm.get_submodule(name)
        if isinstance(m, nn.modules.conv._ConvNd) and all(k == 1 for k in m.kernel_size):
            floors.add(name)
    return floors


def screened_layers(gm: fx.GraphModule, floors: set[str]) -> list[str]:
    """The layers the step screens, in graph order: every weight layer but the floors
    and those under :data:`SMALL_SHARE` of the mean weight count of the rest."""
    sizes = {name: gm.get_submodule(name).weight.numel() for name in weight_layers(gm) if name not in floors}
    if not sizes:
        return []
    mean = sum(sizes.values()) / len(sizes)
    return [name for name, n in sizes.items() if n >= SMALL_SHARE * mean]


def nonzero_weights(gm: fx.GraphModule, name: str) -> int:
    """The non-zero weights of layer ``name``: what one bit less per weight re-codes."""
    return int(gm.get_submodule(name).weight.count_nonzero())


def allocate(gains: Mapping[str, int], costs: Mapping[str, float], slack: float,
             floors: set[str] = frozenset(), divergences: Mapping[str, float] | None = None) -> list[str]:
    """Layers to push one position further, best bytes per point first (per unit of
    ``divergences``, when given), while their summed cost (each at least 0) stays
    within ``slack``. Floors and layers that save nothing are never chosen; a layer
    that does not fit is skipped and the next ones are still tried (greedy knapsack)."""
    def rate(name: str) -> float:
        if divergences is not None:
            return gains[name] / max(divergences[name], MIN_DIVERGENCE)
        return gains[name] / max(costs[name], MIN_COST)

    ranked = sorted((name for name in gains if name not in floors and gains[name] > 0),
                    key=lambda n: (-rate(n), n))
    chosen, spent = [], 0.0
    for name in ranked:
        cost = max(costs[name], 0.0)
        if spent + cost <= slack:
            chosen.append(name)
            spent += cost
    return chosen


def spread_by_divergence(costs: Mapping[str, float], divergences: Mapping[str, float]) -> dict[str, float]:
    """Single-layer costs with their noise taken out: the stage's summed cost
    (the points its layers' screens lost on the screening subset, together; never
    below 0) shared among the layers in proportion to each one's divergence (the KL
    divergence of its screen's predictions from the parent's on the same images).

    Why: a layer pushed one step costs a few images of a thousand, as many as noise
    flips, so the top-1 costs rank layers on noise (``bench/screen_noise.py``: on
    ResNet-56, masking's single-layer costs on the subset correlated 0.16 with the
    same pushes on 4,000 other images, their divergences 0.42). The sum keeps what
    the screens say about the stage as a whole, the divergences say which layers."""
    total_divergence = sum(max(d, 0.0) for d in divergences.values())
    if total_divergence <= 0:
        return dict(costs)
    total = max(sum(costs.values()), 0.0)
    return {name: total * max(divergences[name], 0.0) / total_divergence for name in costs}


@dataclass
class _Position:
    """Where the step stands: the model the next push starts from, its bytes, and
    the per-layer overrides (stage -> layer -> level) that made it."""
    parent: State
    bytes: int
    overrides: dict[int, dict[str, Any]]


@dataclass
class LayerOutcome:
    state: State | None  # the smaller model that met the target, or None
    moves: list[Move] = field(default_factory=list)
    budget_exhausted: bool = False


class LayerRefinement:
    """See the module docstring; ``setting`` is what the marginal search chose."""

    def __init__(self, ev: Evaluator, oracle: EvaluatorOracle, margin: float, effort: int = 1,
                 share: float | None = None, by_divergence: bool = True) -> None:
        self.ev = ev
        self.oracle = oracle
        self.margin = margin
        self.share = share  # None: the additive recovery model (``margin``); else the proportional one's share
        # A deciding measurement fine-tunes as long as the one that verified the chosen
        # model: a shorter restart of the schedule can lose what the longer one bought
        # (2-bit codebooks fell 16 points in 0.5 epoch after 4 epochs had them meeting).
        self.effort = effort
        # rank layers by bytes per unit of divergence and spread the stage's cost by it
        # (:func:`spread_by_divergence`); False: by each layer's own top-1 cost
        self.by_divergence = by_divergence

    def _specs(self, setting: Setting, overrides: Mapping[int, dict[str, Any]], k: int) -> tuple[list[str], tuple[str, ...]]:
        """(passes to run on the chosen model, the pipeline the result stands for)
        with ``overrides`` per stage; stage ``k`` changed, so it and the absolute
        stages after it run again."""
        return rerun(self.oracle.stages, self.oracle.absolute, setting, setting, overrides, first=k)

    def _stages(self, setting: Setting) -> list[int]:
        """The stages that can go one step further per layer from ``setting``."""
        return [k for k, stage in enumerate(self.oracle.stages)
                if 0 <= setting.index[k] < len(stage.levels) - 1 and stage.per_layer is not None]

    def _next(self, setting: Setting, overrides: Mapping[int, dict[str, Any]], k: int, layer: str) -> Any:
        """The level one position further on stage ``k``'s ladder than where ``layer``
        is now (its override, else the stage's level); None at the ladder's end."""
        levels = self.oracle.stages[k].levels
        now = overrides.get(k, {}).get(layer, levels[setting.index[k]])
        i = levels.index(now)
        return levels[i + 1] if i + 1 < len(levels) else None

    def expected_seconds(self, setting: Setting) -> float:
        """About how long one round of :meth:`run` takes: per stage, a screen per
        layer (where single layers show on a screen), one for the floors, a few joint
        screens and two deciding measurements, at this run's pace."""
        gm = self.oracle.state(setting).gm
        layers = len(screened_layers(gm, floor_layers(gm)))
        return sum(self._stage_seconds(self.oracle.stages[k], layers, measurements=2) for k in self._stages(setting))

    def _stage_seconds(self, stage: Stage, layers: int, measurements: int) -> float:
        # unscreened layers cost the joint screens of a halving from all of them
        screens = layers + 5 if stage.layer_screens else layers.bit_length() + 3
        return screens * self.ev.expected_seconds("screen") + \
            measurements * self.effort * self.ev.expected_seconds("finetune")

    def run(self, setting: Setting, rounds: int | None = None) -> LayerOutcome:
        """Rounds of the step until one keeps nothing, no layer can go further, the
        budget is spent or ``rounds`` (None: no limit) were run. Each round starts
        from the model the last one kept, each layer from its own position, so the
        time a budget has left after the first round buys a second step for the
        layers that took the first one cheaply. A round after the first starts a
        stage only if its screens and one deciding measurement fit the budget."""
        outcome = LayerOutcome(None)
        parent = self.oracle.state(setting)
        at = _Position(parent, parent.candidate.size_bytes, {})
        floors = floor_layers(parent.gm)
        order = self._stages(setting)
        round_ = 1
        try:
            while rounds is None or round_ <= rounds:
                saved = {k: bytes_ for k in order
                         if (bytes_ := self._push_stage(outcome, setting, at, k, floors, round_))}
                if not saved:
                    break
                # the stage that saved most goes first: the budget may end the round before the last
                order = sorted(order, key=lambda k: -saved.get(k, 0))
                round_ += 1
        except BudgetExhausted:
            outcome.budget_exhausted = True
        return outcome

    def _push_stage(self, outcome: LayerOutcome, setting: Setting, at: _Position, k: int,
                    floors: set[str], round_: int) -> int:
        """One stage's push in one round: screen each layer one position further
        than ``at``, allocate the slack by bytes per point, fit the allocation on a
        joint screen and measure it (halving on a miss, :data:`MAX_TRIES` times at
        most). A push that meets the target and is smaller moves ``at`` to it and
        becomes ``outcome.state``. Returns the bytes it saved (0: nothing kept)."""
        stage = self.oracle.stages[k]
        label = stage.name if round_ == 1 else f"round {round_}: {stage.name}"
        if round_ == 1:
            back, base_accuracy, base_bytes = self._floors_back(outcome, at.parent, setting, at.overrides, k,
                                                                floors, at.bytes)
        else:
            back, base_accuracy, base_bytes = {}, at.parent.val_accuracy, at.bytes
        fixed = {**at.overrides.get(k, {}), **back}
        pushes = {name: nxt for name in screened_layers(at.parent.gm, floors)
                  if (nxt := self._next(setting, {k: fixed}, k, name)) is not None}
        if not pushes:
            return 0
        if round_ > 1:
            self.ev.budget.check(self._stage_seconds(stage, len(pushes), measurements=1))
        if stage.layer_screens:
            gains, costs, ranked_by = self._screen_layers(outcome, setting, at, k, fixed, pushes,
                                                          base_accuracy, base_bytes, label)
        else:
            # a single layer's screen would be noise: every layer, the most weights
            # re-coded first, and the joint screens find how many fit
            gains = {name: nonzero_weights(at.parent.gm, name) for name in pushes}
            costs, ranked_by = dict.fromkeys(pushes, 0.0), None
        chosen = allocate(gains, costs, self.slack(base_accuracy), floors, ranked_by)
        for _ in range(MAX_TRIES):
            chosen, estimate = self._fit_on_screen(outcome, at.parent, setting, {**at.overrides, k: fixed}, k,
                                                   {name: pushes[name] for name in chosen},
                                                   base_accuracy, label)
            if not chosen:
                return 0
            if estimate is None:  # one layer, which allocate took on its own screen
                estimate = base_accuracy - costs[next(iter(chosen))]
            trial = {**at.overrides, k: {**fixed, **chosen}}
            specs, steps = self._specs(setting, trial, k)
            start, specs = self.oracle.measured_from(setting, trial, accepted=(at.parent, specs))
            # a push that screened at the target may need no training (measure_pipeline)
            c = self.ev.measure_pipeline(start, specs, stage.name, next(iter(chosen.values())),
                                         steps=steps, effort=self.effort,
                                         untrained_first=start is at.parent and estimate >= self.ev.target)
            accepted = c.meets and c.size_bytes < at.bytes
            self._log(outcome, "layers", f"{label}: {len(chosen)} layers +1", c, c.accuracy, accepted)
            if accepted:
                # the next stage's layers start from this model, its overrides in the weights
                saved = at.bytes - c.size_bytes
                outcome.state = self.ev.state_of(start, specs, c, steps=steps)
                at.parent, at.bytes, at.overrides = outcome.state, c.size_bytes, trial
                return saved
            chosen = dict(list(chosen.items())[:len(chosen) // 2])
        return 0

    def _screen_layers(self, outcome: LayerOutcome, setting: Setting, at: _Position, k: int,
                       fixed: Mapping[str, Any], pushes: Mapping[str, Any], base_accuracy: float,
                       base_bytes: int, label: str) -> tuple[dict[str, int], dict[str, float],
                                                             dict[str, float] | None]:
        """Each layer of ``pushes`` screened alone one position further: (bytes it
        saves, points it costs, and the divergences to rank by, or None where a
        screen has none or ``by_divergence`` is off); with divergences the costs are
        the stage's sum spread by them (:func:`spread_by_divergence`)."""
        stage = self.oracle.stages[k]
        gains, costs, divergences = {}, {}, {}
        for name, nxt in pushes.items():
            specs, steps = self._specs(setting, {**at.overrides, k: {**fixed, name: nxt}}, k)
            c = self.ev.screen_pipeline(at.parent, specs, stage.name, nxt, steps=steps)
            estimate = self.ev.screen_estimate(at.parent, c)
            if estimate is None:
                continue
            gains[name], costs[name] = base_bytes - c.size_bytes, base_accuracy - estimate
            if "divergence" in c.extra:
                divergences[name] = c.extra["divergence"]
            self._log(outcome, "layers", f"{label} {name}+1", c, estimate, False)
        if not (self.by_divergence and divergences.keys() == costs.keys()):
            return gains, costs, None
        return gains, spread_by_divergence(costs, divergences), divergences

    def slack(self, base_accuracy: float) -> float:
        """The estimated accuracy the layers pushed together may lose from
        ``base_accuracy`` and still be expected to meet the target once fine-tuned."""
        if self.share is None:
            return base_accuracy - self.ev.target + self.margin
        # base - d + share * d >= target - MIN_MARGIN, solved for the drop d
        return (base_accuracy - self.ev.target + MIN_MARGIN) / max(1.0 - self.share, 1e-3)

    def within(self, estimate: float, base_accuracy: float) -> bool:
        """Whether a screen ``estimate`` of a push from ``base_accuracy`` is worth a
        deciding measurement."""
        if self.share is None:
            return estimate >= self.ev.target - self.margin
        return expected_recovery(estimate, base_accuracy, self.share) >= self.ev.target - MIN_MARGIN

    def _floors_back(self, outcome: LayerOutcome, parent: State, setting: Setting,
                     overrides: Mapping[int, dict[str, Any]], k: int, floors: set[str],
                     parent_bytes: int) -> tuple[dict[str, Any], float, int]:
        """The floors one position less compressed than the rest of stage ``k``, if
        that screens better than ``parent``: (their overrides, the estimated val
        accuracy, the bytes) to start the layers' screens from; else ``parent``'s
        own ({}, its val accuracy, its bytes). The accuracy they buy back is slack
        the other layers can spend."""
        stage, i = self.oracle.stages[k], setting.index[k]
        if i < 1 or not floors:
            return {}, parent.val_accuracy, parent_bytes
        kept = dict.fromkeys(sorted(floors), stage.levels[i - 1])
        specs, steps = self._specs(setting, {**overrides, k: {**overrides.get(k, {}), **kept}}, k)
        c = self.ev.screen_pipeline(parent, specs, stage.name, stage.levels[i - 1], steps=steps)
        estimate = self.ev.screen_estimate(parent, c)
        self._log(outcome, "layers", f"{stage.name}: floors -1", c, estimate, False)
        if estimate is None or estimate <= parent.val_accuracy:
            return {}, parent.val_accuracy, parent_bytes
        return kept, estimate, c.size_bytes

    def _fit_on_screen(self, outcome: LayerOutcome, parent: State, setting: Setting,
                       overrides: Mapping[int, dict[str, Any]], k: int, chosen: Mapping[str, Any],
                       base_accuracy: float, label: str | None = None) -> tuple[dict[str, Any], float | None]:
        """The longest prefix of ``chosen`` (layer -> its next level, best first;
        halving) whose layers, pushed together, screen :meth:`within` reach of the
        target from ``base_accuracy`` (the parent's accuracy after the floors' step
        back), down to its best layer alone; and that joint screen's estimate (None
        for one layer, which allocate took on its own screen). Where the stage's layers
        were not screened alone (``layer_screens``), the best layer alone is screened
        too, and nothing is left ({}, None) if it does not fit."""
        stage = self.oracle.stages[k]
        chosen = dict(chosen)
        # one layer's own screen fits: allocate took it within the slack
        while len(chosen) > (1 if stage.layer_screens else 0):
            trial = {**overrides, k: {**overrides.get(k, {}), **chosen}}
            specs, steps = self._specs(setting, trial, k)
            c = self.ev.screen_pipeline(parent, specs, stage.name, next(iter(chosen.values())), steps=steps)
            estimate = self.ev.screen_estimate(parent, c)
            self._log(outcome, "layers", f"{label or stage.name}: {len(chosen)} layers +1", c, estimate, False)
            if estimate is not None and self.within(estimate, base_accuracy):
                return chosen, estimate
            chosen = dict(list(chosen.items())[:len(chosen) // 2])
        return chosen, None

    @staticmethod
    def _log(outcome: LayerOutcome, phase: str, kind: str, c: Any, accuracy: float | None, accepted: bool) -> None:
        outcome.moves.append(Move(phase, kind, (), accuracy, c.size_bytes, c.phase != "screen", accepted))

