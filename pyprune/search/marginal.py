"""The marginal-rate search: spend the accuracy budget where it buys the most bytes.

A *setting* gives every technique (stage) one position on its ladder, ``-1``
meaning "off". Accuracy falls and the file shrinks as any position grows. The
search works in three phases, so that any time budget ends with a model that uses
every technique that pays:

1. **Alone.** Each stage's screened boundary with the others off, by bisection
   over its ladder (BatchNorm recalibration plus a screening subset: no training).
   These are the single-technique endpoints.
2. **Together, cheaply.** The same fraction of every stage's boundary, the
   largest fraction whose screen still meets the target (bisection over
   :data:`FRACTIONS`), then verified by the deciding measurement (fine-tuning,
   all of val). A verified model using every technique exists after a handful of
   screens and one fine-tune.
3. **Trade.** From the accepted setting, screen one move per stage: that stage
   ``k`` positions further (``k`` doubles after a stage's move is accepted and
   halves after one fails). Among moves whose screen estimate is within the
   recovery margin of the target, measure the one that saves the most bytes per
   point of estimated accuracy lost; accept it if it meets the target and its file
   is smaller than the accepted one's (measured, not screened, bytes). A stage
   whose one-position move failed is done. When no stage can move, try *swaps*:
   one stage backed off one position while another goes one or two further, or
   all the others one further; the (at most :data:`MAX_SWAPS`) best by bytes per
   point are measured, and the first that meets (and is smaller) is taken. The
   recovery margin adapts: after two deciding measurements it is 1.5 times the most
   that fine-tuning recovered over a screen. This is how a technique that costs more
   accuracy than it saves gives its budget away, down to being dropped.

   With ``recovery="proportional"`` a screen is judged by what fine-tuning is
   expected to win back of *its own* drop: a move whose screen lost ``d`` points
   from the model it started from is expected to regain ``share * d``, where
   ``share`` is the most any deciding measurement at that effort regained of its
   screen's drop (:data:`PRIOR_SHARE` before two were seen). Recovery on CIFAR
   ResNets is roughly such a share (64-92% of the drop in 7 of 8 measurements on
   ResNet-56), so a large move is no longer ruled out by a margin learnt on small
   ones. Phases 1 and 2 then bisect by that expectation, not by the bare
   screen, so the first verified setting is a bolder one.

   A deciding measurement here or in phase 2 that misses the target by a little
   (:data:`NEAR_MISS`, then the most such a retry added) is *trained on*: measured
   again at twice the effort, which continues the same fine-tune rather than
   starting it again (:meth:`~.evaluator.Evaluator.tuned_to`), so a move that needs
   one more fine-tune costs one more, not the retry of phase 4 from scratch.

4. **Recover more.** When no move is left and time is, phase 3 runs again with
   twice the fine-tuning per deciding measurement (up to ``max_effort`` times the
   configured epochs): moves that missed the target by a little are bought with
   training rather than given up.

The answer is the smallest setting that passed a deciding measurement, so the
search can never return more bytes than any endpoint it verified, a single
technique's included. Before it ends (or when the budget runs out) any screened
setting that met the target and is smaller than that answer, a single-technique
endpoint for example, is verified too, smallest first, so a cheap answer found
on a screen is never lost to the baseline only because time ran out.

The search sees the model only through a :class:`SettingOracle`; tests drive it
with functions of the setting, and :mod:`.marginal_oracle` connects it to the
:class:`~.evaluator.Evaluator`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .evaluator import BudgetExhausted

#: Phase 2's shares of each stage's own boundary, bisected; 1.0 is every stage at its
#: single-technique boundary at once, which seldom meets the target.
FRACTIONS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
MAX_STEP = 4  # the furthest a phase-3 move goes in one measurement, in ladder positions
MAX_SWAPS = 3  # swaps measured (fine-tuned) each time no move is left
MIN_MARGIN = 0.005  # the narrowest recovery margin, in points of accuracy
# A deciding measurement that missed the target by at most this much (until a
# continuation has shown what one more fine-tune adds) is trained on at twice the
# effort at once, rather than dropped and bought again later at full price.
NEAR_MISS = 0.01
# A deciding measurement costs a fine-tune; a move or swap whose screen promises less
# than this share of the accepted file's bytes is not worth one (a ResNet-56 hour spent
# six minutes on a swap that promised 5 bytes of 243,000, then walked back and forth).
MIN_SAVING = 0.002
# A move that costs (almost) no accuracy has an unbounded rate; this floor, in points
# of accuracy, ranks such moves by their bytes instead.
MIN_COST = 1e-4
# How a screen's promise is judged (see the module docstring): fine-tuning recovers
# up to a margin learnt from the deciding measurements, or a share of the screen's drop.
RECOVERY_MODELS = ("additive", "proportional")
#: The proportional model's share of a screen's drop that fine-tuning regains, until
#: two deciding measurements at the search's effort have shown it.
PRIOR_SHARE = 0.5
# A screen that lost less than this from its starting model says little about the
# share fine-tuning regains (the ratio of two small differences): not counted.
MIN_DROP = 0.01


def expected_recovery(screen: float, start: float, share: float) -> float:
    """The proportional model's expectation of a move that screened ``screen`` from a
    model of accuracy ``start``: the screen plus ``share`` of its drop."""
    return screen + share * max(0.0, start - screen)


@dataclass(frozen=True, order=True)
class Setting:
    """One ladder position per stage, ``-1`` for off."""

    index: tuple[int, ...]

    @classmethod
    def off(cls, stages: int) -> "Setting":
        return cls((-1,) * stages)

    def moved(self, stage: int, by: int) -> "Setting":
        index = list(self.index)
        index[stage] += by
        return Setting(tuple(index))

    def at_most(self, other: "Setting") -> bool:
        return all(a <= b for a, b in zip(self.index, other.index))

    @property
    def stages_on(self) -> int:
        return sum(i >= 0 for i in self.index)

    def describe(self, names: Sequence[str], ladders: Sequence[Sequence[Any]]) -> str:
        parts = [f"{n}={ladder[i]!r}" for n, ladder, i in zip(names, ladders, self.index) if i >= 0]
        return ",".join(parts) or "baseline"


@dataclass
class Point:
    """What the oracle said of one setting: ``accuracy`` is a screen estimate of the
    val accuracy (``verified`` False) or the deciding measurement (True)."""

    setting: Setting
    accuracy: float | None  # None: training diverged
    bytes: int
    meets: bool
    verified: bool


class SettingOracle(Protocol):
    """What the search asks of a model. Both methods may raise
    :class:`~.evaluator.BudgetExhausted` before doing any work, except
    ``measure(..., final=True)``, which the search uses at most once, to keep a
    screened answer when the budget ran out before anything was verified.
    ``measure(Setting.off(n))`` is the baseline. ``effort`` multiplies the
    fine-tuning of a deciding measurement."""

    target: float

    def screen(self, setting: Setting) -> Point: ...

    def measure(self, setting: Setting, final: bool = False, effort: int = 1) -> Point: ...


@dataclass
class Move:
    """One row of the search's trail (``report.json``'s ``search.moves``)."""

    phase: str  # alone, together, trade, swap, settle
    kind: str  # what was tried, e.g. "mask+2" or "slim-1,quant+1"
    setting: tuple[int, ...]
    accuracy: float | None
    bytes: int
    verified: bool
    accepted: bool
    rate: float | None = None  # bytes saved per point of estimated accuracy lost

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass
class MarginalOutcome:
    best: Point | None  # the smallest verified setting that met the target; None: the baseline
    singles: dict[int, int] = field(default_factory=dict)  # stage -> screened boundary alone (-1: none)
    fraction: float | None = None  # phase 2's share of the boundaries
    moves: list[Move] = field(default_factory=list)
    budget_exhausted: bool = False
    kept_on_screen: bool = False  # the budget ran out and the answer was verified after it


class MarginalSearch:
    """See the module docstring. ``ladders[i]`` is the number of positions of stage
    ``i``; ``margin`` (points of accuracy) is how far below the target a screen may
    estimate a move and still have it measured, since fine-tuning recovers; with
    ``screen_only`` nothing is fine-tuned and screens decide."""

    def __init__(self, oracle: SettingOracle, ladders: Sequence[int], margin: float = 0.0,
                 names: Sequence[str] | None = None, max_effort: int = 1, recovery: str = "additive") -> None:
        if recovery not in RECOVERY_MODELS:
            raise ValueError(f"recovery must be one of {', '.join(RECOVERY_MODELS)}, got {recovery!r}")
        self.oracle = oracle
        self.ladders = tuple(ladders)
        self.initial_margin = margin
        self.max_effort = max_effort
        self.recovery = recovery
        self.recoveries: dict[int, list[float]] = {}  # effort -> measured minus screen estimate
        self.shares: dict[int, list[float]] = {}  # effort -> that, over the screen's drop from its start
        self.starts: dict[Setting, float] = {}  # a screened move -> the accuracy of the model it moved from
        self.names = tuple(names) if names else tuple(f"stage{i}" for i in range(len(self.ladders)))
        self.screens: dict[Setting, Point] = {}
        self.measured: dict[Setting, Point] = {}  # the latest deciding measurement of each setting
        self.effort = 1  # fine-tuning of a deciding measurement, in multiples of the configured epochs
        self.continued: list[float] = []  # what training a near miss on at twice the effort added
        self._by_effort: dict[tuple[Setting, int], Point] = {}
        self.outcome = MarginalOutcome(None)

    # -- bookkeeping

    @property
    def target(self) -> float:
        return self.oracle.target

    def screen(self, setting: Setting, start: float | None = None) -> Point:
        """The screen estimate of ``setting``; ``start`` is the accuracy of the model
        the move began from, which the proportional recovery model measures drops against."""
        if setting not in self.screens:
            self.screens[setting] = self.oracle.screen(setting)
        if start is not None:
            self.starts.setdefault(setting, start)
        return self.screens[setting]

    def measure(self, setting: Setting, final: bool = False, effort: int | None = None) -> Point:
        """The deciding measurement of ``setting`` at ``effort`` (default: the search's)."""
        effort = self.effort if effort is None else effort
        known = self.measured.get(setting)
        if known is not None and (known.meets or not setting.stages_on):
            return known  # met the target: more fine-tuning is not needed to accept it
        if (setting, effort) not in self._by_effort:
            point = self.oracle.measure(setting, final=final, effort=effort)
            screened = self.screens.get(setting)
            if screened is not None and screened.accuracy is not None and point.accuracy is not None:
                self.recoveries.setdefault(effort, []).append(point.accuracy - screened.accuracy)
                drop = self.starts.get(setting, screened.accuracy) - screened.accuracy
                if drop >= MIN_DROP:
                    self.shares.setdefault(effort, []).append((point.accuracy - screened.accuracy) / drop)
            self._by_effort[setting, effort] = self.measured[setting] = point
            if point.meets and setting.stages_on and (self.outcome.best is None or point.bytes < self.outcome.best.bytes):
                self.outcome.best = point
        return self._by_effort[setting, effort]

    @property
    def near_miss(self) -> float:
        """How far below the target a measurement may land and still be trained on at
        once: :data:`NEAR_MISS` until a continuation was seen, then the most one added
        (never below :data:`MIN_MARGIN`)."""
        return max(MIN_MARGIN, max(self.continued)) if self.continued else NEAR_MISS

    def decide(self, setting: Setting) -> tuple[Point, bool]:
        """:meth:`measure` at the search's effort; a near miss (see :attr:`near_miss`)
        is measured again at twice that effort while ``max_effort`` allows, which
        trains the same candidate on (the oracle continues the held fine-tune).
        Returns the last measurement and whether it was trained on."""
        point = self.measure(setting)
        effort = 2 * self.effort
        if point.meets or point.accuracy is None or effort > self.max_effort or \
                point.accuracy < self.target - self.near_miss:
            return point, False
        again = self.measure(setting, effort=effort)
        if again.accuracy is not None:
            self.continued.append(again.accuracy - point.accuracy)
        return again, True

    def verified_effort(self, setting: Setting) -> int:
        """The least effort at which ``setting`` met the target (1 if it never did)."""
        return min((e for (s, e), p in self._by_effort.items() if s == setting and p.meets), default=1)

    def _log(self, phase: str, kind: str, point: Point, accepted: bool, rate: float | None = None) -> None:
        self.outcome.moves.append(Move(phase, kind, point.setting.index, point.accuracy, point.bytes,
                                       point.verified, accepted, rate))

    def _valid(self, setting: Setting) -> bool:
        return all(-1 <= i < n for i, n in zip(setting.index, self.ladders))

    # -- the phases

    def run(self, recover_more: bool = True) -> MarginalOutcome:
        """Phases 1-3, then phase 4 unless ``recover_more`` is False (a caller that
        does other work first calls :meth:`recover_more` itself)."""
        current = Setting.off(len(self.ladders))
        try:
            self.measure(current)  # the baseline: meets by definition, and where phase 3 starts if phase 2 fails
            self.alone()
            current = self.together()
            self.trade(current)
            self.settle(final=False)
        except BudgetExhausted:
            self.outcome.budget_exhausted = True
            self.settle(final=True)
        return self.recover_more() if recover_more else self.outcome

    def recover_more(self) -> MarginalOutcome:
        """Phase 4: moves left untaken get twice the fine-tuning, while the budget lasts."""
        if self.outcome.budget_exhausted:
            return self.outcome
        current = self.outcome.best.setting if self.outcome.best is not None else Setting.off(len(self.ladders))
        try:
            while self.effort < self.max_effort:
                self.effort *= 2
                current = self.trade(current)
                self.settle(final=False)
        except BudgetExhausted:
            self.outcome.budget_exhausted = True
            self.settle(final=True)
        return self.outcome

    def alone(self) -> None:
        """Phase 1: each stage's screened boundary with the others off."""
        off = Setting.off(len(self.ladders))
        baseline = self.measured[off].accuracy if off in self.measured else None
        for i, n in enumerate(self.ladders):
            lo, hi = -1, n
            while hi - lo > 1:
                mid = (lo + hi) // 2
                point = self.screen(off.moved(i, mid + 1), start=baseline)
                self._log("alone", f"{self.names[i]}@{mid}", point, self._promising(point))
                lo, hi = (mid, hi) if self._promising(point) else (lo, mid)
            self.outcome.singles[i] = lo

    def _share(self, fraction: float) -> Setting:
        return Setting(tuple(round(fraction * (s + 1)) - 1 for s in
                             (self.outcome.singles[i] for i in range(len(self.ladders)))))

    def together(self) -> Setting:
        """Phase 2: the largest common share of the boundaries that meets on a
        screen, then verified (backing off by halving the share if it misses)."""
        off = Setting.off(len(self.ladders))
        baseline = self.measured[off].accuracy if off in self.measured else None
        lo, hi = -1, len(FRACTIONS)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            setting = self._share(FRACTIONS[mid])
            point = self.screen(setting, start=baseline) if setting != off else None
            if point is not None:
                self._log("together", f"share {FRACTIONS[mid]:g}", point, self._promising(point))
            # a share that rounds every stage off is the baseline, which meets by definition
            lo, hi = (mid, hi) if point is None or self._promising(point) else (lo, mid)
        while lo >= 0:
            setting = self._share(FRACTIONS[lo])
            if setting == off:
                break
            point, trained_on = self.decide(setting)
            self._log("together", f"share {FRACTIONS[lo]:g}" + (" trained on" if trained_on else ""), point,
                      point.meets)
            if point.meets:
                self.outcome.fraction = FRACTIONS[lo]
                return setting
            lo = lo // 2 if lo > 0 else -1
        return off

    def _promising(self, point: Point) -> bool:
        """Phases 1 and 2's test of a screen: it meets the target, or, under the
        proportional model, is expected to once fine-tuned."""
        if self.recovery == "proportional" and point.setting in self.starts:
            return self.expected(point) >= self.target
        return point.meets

    @staticmethod
    def _rate(frm: Point, to: Point) -> float:
        return (frm.bytes - to.bytes) / max(frm.accuracy - to.accuracy, MIN_COST)

    @property
    def margin(self) -> float:
        """How far below the target a screen may estimate a move that is still worth
        fine-tuning: ``margin`` until two measurements at this effort showed what
        fine-tuning recovers, then 1.5 times the most it recovered (never below
        :data:`MIN_MARGIN`)."""
        return self.margin_at(self.effort)

    def margin_at(self, effort: int) -> float:
        """:attr:`margin` for measurements at ``effort``."""
        seen = self.recoveries.get(effort, [])
        if len(seen) < 2:
            return self.initial_margin
        return min(self.initial_margin, max(MIN_MARGIN, 1.5 * max(seen)))

    def share_at(self, effort: int) -> float:
        """The proportional model's share of a screen's drop that a deciding measurement
        at ``effort`` regains: the most seen (at most all of it), :data:`PRIOR_SHARE`
        until two were seen."""
        seen = self.shares.get(effort, [])
        return min(1.0, max(seen)) if len(seen) >= 2 else PRIOR_SHARE

    def expected(self, point: Point) -> float | None:
        """What a deciding measurement of a screened ``point`` is expected to find:
        the screen plus the share of its drop fine-tuning regains (proportional model;
        a point with no known start is taken as it screened)."""
        if point.accuracy is None:
            return None
        start = self.starts.get(point.setting)
        if start is None:
            return point.accuracy
        return expected_recovery(point.accuracy, start, self.share_at(self.effort))

    def _recoverable(self, point: Point) -> bool:
        if point.accuracy is None:
            return False
        if self.recovery == "proportional" and point.setting in self.starts:
            return self.expected(point) >= self.target - MIN_MARGIN
        return point.accuracy >= self.target - self.margin

    def trade(self, current: Setting) -> Setting:
        """Phase 3: marginal moves, then swaps, until no move is accepted."""
        step = [1] * len(self.ladders)
        done: set[int] = set()
        tried_swaps: set[Setting] = set()
        while True:
            here = self.measured[current]
            moves = []
            for i in range(len(self.ladders)):
                by = min(step[i], self.ladders[i] - 1 - current.index[i])
                while i not in done and by > 0:
                    point = self.screen(current.moved(i, by), start=here.accuracy)
                    if self._recoverable(point) and self._saves(point, here):
                        moves.append((self._rate(here, point), i, by, point))
                        break
                    self._log("trade", f"{self.names[i]}+{by}", point, False)
                    by //= 2
                    step[i] = max(1, by)
                if by <= 0:
                    done.add(i)
            if moves:
                rate, i, by, screened = max(moves, key=lambda m: (m[0], -m[1]))
                point, trained_on = self.decide(screened.setting)
                accepted = self._smaller_and_meets(point, here)
                self._log("trade", f"{self.names[i]}+{by}" + (" trained on" if trained_on else ""), point,
                          accepted, rate)
                if accepted:
                    current = point.setting
                    step[i] = min(MAX_STEP, 2 * by)
                elif by == 1:
                    done.add(i)
                else:
                    step[i] = max(1, by // 2)
                continue
            swapped = self._swap(current, tried_swaps)
            if swapped is None:
                return current
            current = swapped
            done.clear()
            step = [1] * len(self.ladders)

    def _swap(self, current: Setting, tried: set[Setting]) -> Setting | None:
        here = self.measured[current]
        options = []
        for a in range(len(self.ladders)):
            if current.index[a] < 0:
                continue
            others = [b for b in range(len(self.ladders)) if b != a]
            # another stage one or two further, or every other stage one further (the
            # accuracy one stage gives back may be worth most when all share it)
            pushes = [{b: by} for b in others for by in (1, 2)] + ([dict.fromkeys(others, 1)] if len(others) > 1 else [])
            for push in pushes:
                setting = current.moved(a, -1)
                for b, by in push.items():
                    setting = setting.moved(b, by)
                if not self._valid(setting) or setting in tried:
                    continue
                tried.add(setting)
                point = self.screen(setting, start=here.accuracy)
                kind = ",".join([f"{self.names[a]}-1"] + [f"{self.names[b]}+{by}" for b, by in push.items()])
                if self._recoverable(point) and self._saves(point, here):
                    options.append((self._rate(here, point), kind, point))
                else:
                    self._log("swap", kind, point, False)
        # best bytes per point first; a stuck search measures only a few of them
        for _, kind, screened in sorted(options, key=lambda o: (-o[0], o[1]))[:MAX_SWAPS]:
            point, trained_on = self.decide(screened.setting)
            accepted = self._smaller_and_meets(point, here)
            self._log("swap", kind + (" trained on" if trained_on else ""), point, accepted)
            if accepted:
                return point.setting
        return None

    @staticmethod
    def _saves(point: Point, here: Point) -> bool:
        """Whether a screened move promises enough bytes to be worth a fine-tune
        (:data:`MIN_SAVING`)."""
        return point.bytes <= here.bytes * (1.0 - MIN_SAVING)

    @staticmethod
    def _smaller_and_meets(point: Point, here: Point) -> bool:
        """Whether a deciding measurement is a step forward from ``here``: it meets the
        target and its file is smaller. A screen's bytes promise that, but a screen is
        sized on the model it moved from, which need not be the one measured: from the
        baseline (``compile --measure-from baseline``), a codebook of the original
        weights codes less tightly than one of an already quantized parent (12% more
        bytes in a ResNet-20 run), and a cached screen may come from an earlier
        parent. Moving to a larger model would only spend time walking back."""
        return point.meets and point.bytes < here.bytes

    def settle(self, final: bool) -> None:
        """Verify screened settings that met the target and are smaller than the
        best verified one, smallest first, until one holds. With ``final`` (the
        budget is spent) only when nothing is verified yet, and only one."""
        if final and self.outcome.best is not None:
            return
        best = self.outcome.best.bytes if self.outcome.best is not None else float("inf")
        waiting = sorted((p for s, p in self.screens.items() if p.meets and p.bytes < best and s not in self.measured),
                         key=lambda p: (p.bytes, p.setting))
        for screened in waiting[:1] if final else waiting:
            try:
                point = self.measure(screened.setting, final=final)
            except BudgetExhausted:
                self.outcome.budget_exhausted = True
                return self.settle(final=True)
            self._log("settle", "screened answer verified", point, point.meets)
            if point.meets:
                self.outcome.kept_on_screen = final
                return
