"""Measuring candidates: apply a setting to a copy of the parent model,
recalibrate BatchNorm statistics, then either screen it (accuracy on a subset of
val) or fine-tune it and measure it on all of val; size it as the bytes of its
``.ppz`` file. Every measurement goes through the :class:`Journal` first."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from .. import distributed
from ..data import ArrayDataset
from ..encode import ppz_bytes
from ..ir import PassManager, example_input
from ..passes import constraint_hooks, create_pass, parse_pipeline, pass_class, read_codebooks
from ..train import DivergenceError, EvalResult, TrainConfig, evaluate, fine_tune, recalibrate_bn
from .candidates import Candidate, Stage, State
from .journal import Journal
from .progress import Progress


#: The most of a time budget that sparsity training may take before the search:
#: on a busy machine its configured epochs alone can take half of a short budget.
L1_BUDGET_SHARE = 0.2


#: Writing the chosen model evaluates it on val and test and the baseline on test,
#: and exports and verifies it in onnxruntime: measured at 7-8 times one evaluation
#: of val (make demo, idle and under load), which the budget keeps back for it.
WRITING_EVALS = 8


def kl_divergence(parent: torch.Tensor, child: torch.Tensor) -> float:
    """Mean over images of KL(parent || child), from log-softmax outputs [n, classes]:
    how far a screened child's predictions moved from its parent's, whether or not
    the top-1 class changed. Unlike a top-1 difference on a thousand images (a few
    flips, about as many as noise makes), it moves with every image, so it ranks
    small pushes far more steadily (``bench/screen_noise.py``)."""
    return F.kl_div(child, parent, log_target=True, reduction="batchmean").item()


class BudgetExhausted(Exception):
    """The search's time budget is spent: keep the best verified result so far."""


class Budget:
    """Wall-clock budget of a search, counting the time earlier runs spent on the
    candidates a resumed run replays from the journal.

    A measurement starts only if it is expected to end within the budget, with
    :attr:`reserve` seconds left for the work after it: ``check(expected)`` refuses
    it otherwise, so a budget is overrun by at most the error of that expectation,
    not by a whole measurement started at the last second. The reserve is the sum
    of named parts (``keep``), so that each of its owners (the final fine-tune and
    the writing; a later step of the search) updates its own part without undoing
    the others'."""

    def __init__(self, minutes: float | None, journal: Journal, clock: Callable[[], float] = time.perf_counter) -> None:
        self.seconds = None if minutes is None else minutes * 60.0
        self.journal = journal
        self.clock = clock
        self.start = clock()
        self.kept: dict[str, float] = {}

    @property
    def reserve(self) -> float:
        return sum(self.kept.values())

    def keep(self, name: str, seconds: float) -> None:
        """Keep ``seconds`` back for ``name`` (0 releases it)."""
        self.kept[name] = seconds

    def spent(self) -> float:
        return self.clock() - self.start + self.journal.replayed_seconds

    def left(self) -> float | None:
        return None if self.seconds is None else self.seconds - self.spent()

    def exhausted_for(self, expected: float = 0.0) -> bool:
        over = self.seconds is not None and self.spent() + expected + self.reserve >= self.seconds
        # rank 0's clock decides for every process, which must all stop at the same candidate
        return bool(distributed.broadcast_object(over))

    @property
    def exhausted(self) -> bool:
        return self.exhausted_for(0.0)

    def check(self, expected: float = 0.0) -> None:
        if self.exhausted_for(expected):
            raise BudgetExhausted(f"time budget of {self.seconds / 60:g} min spent"
                                  + (f" (the next step needs about {expected:.0f}s)" if expected else ""))


@dataclass
class SearchData:
    train: ArrayDataset
    val: ArrayDataset
    screen: ArrayDataset  # a prefix of val
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_shape: tuple[int, ...]


@dataclass
class EvalSettings:
    finetune_epochs: float
    train: TrainConfig  # lr, batch size, seed and progress of every fine-tune
    recal_images: int = 1024
    final_epochs: float = 0.0  # the recovery fine-tune after the search, whose time the budget keeps back
    # A measured candidate that masks reaches its zeros during its fine-tune (cubic
    # schedule: the pass's gradually()) rather than all at once before it; the
    # passes after the mask then run, and get this share of the epochs to recover.
    gradual_mask: bool = False
    after_mask_share: float = 0.5
    # A screen's short recovery: this many straight-through fine-tuning steps (with
    # every constraint and the teacher) after recalibration, before the subset is
    # measured. Recalibration alone underrates what fine-tuning recovers, most for
    # masking; a few dozen steps recover much of it (0: recalibration only).
    screen_steps: int = 0
    # The peak learning rate of a fine-tune whose model this search already fine-tuned
    # (a continuation, and the final recovery); None: train.lr, as for the first ones.
    # Restarting a settled model's schedule at the first fine-tunes' rate can cost
    # more accuracy than the fine-tune recovers.
    continue_lr: float | None = None

    def train_for(self, state: "State", **changes: Any) -> TrainConfig:
        """The training settings of a fine-tune of ``state``."""
        lr = self.continue_lr if self.continue_lr is not None and state.tuned else self.train.lr
        return replace(self.train, lr=lr, **changes)


class Evaluator:
    """Measures candidates against ``target`` (an absolute val accuracy)."""

    def __init__(self, data: SearchData, settings: EvalSettings, target: float, journal: Journal,
                 budget: Budget, progress: Progress, meta: dict[str, Any], search: str = "heuristic") -> None:
        self.data = data
        self.settings = settings
        self.target = target
        self.journal = journal
        self.budget = budget
        self.progress = progress
        self.meta = meta
        self.search = search
        self.measured = 0  # candidates measured in this run (not replayed)
        self._states: dict[str, State] = {}  # fine-tuned states of this run, by key
        self._offsets: dict[str, float] = {}  # state key -> val accuracy minus screen-subset accuracy
        self._screen_log_probs: dict[str, torch.Tensor] = {}  # state key -> its log-softmax on the screening subset
        self._seconds: dict[str, list[float]] = {}  # phase -> how long its measurements in this run took
        self.teacher: fx.GraphModule | None = None  # what fine-tunes distil from (the uncompressed model)

    def begin(self, target: float, journal: Journal, baseline: Candidate | None = None) -> None:
        """Measure against ``target`` from now on, recording into ``journal`` (with
        ``baseline``, measured before the target was known, unless it is there)."""
        self.target = target
        self.journal = self.budget.journal = journal
        if baseline is not None and baseline.key not in journal:
            journal.put(baseline)

    # -- primitives

    def _example(self):
        return example_input(self.data.input_shape)

    def apply(self, parent: State, specs: Sequence[str], steps: Sequence[str] | None = None) -> State:
        """``specs`` applied to a copy of ``parent`` (graph checked after each pass),
        then BatchNorm statistics recalibrated on training images. ``steps``: the
        pipeline the child stands for, when it is not ``parent``'s followed by ``specs``
        (a stage pushed further on a model where it already ran)."""
        gm = copy.deepcopy(parent.gm)
        passes = [create_pass(s.name, **s.options) for s in parse_pipeline(",".join(specs))]
        gm = PassManager(passes, (self._example(),)).run(gm).graph_module
        recalibrate_bn(gm, self.data.train, self.data.mean, self.data.std, self.settings.recal_images,
                       channels_last=True)
        steps = tuple(steps) if steps is not None else (*parent.steps, *specs)
        key = f"{parent.key}>{','.join(specs)}@bn"
        return State(gm, steps, key, parent.prefix)

    def accuracy(self, gm: fx.GraphModule, dataset: ArrayDataset) -> float:
        return self._evaluate(gm, dataset).accuracy

    def _evaluate(self, gm: fx.GraphModule, dataset: ArrayDataset, log_probs: bool = False) -> EvalResult:
        # NHWC: screens are mostly forward passes, and they run twice as fast so here
        return evaluate(gm, dataset, self.data.mean, self.data.std, progress=False, channels_last=True,
                        log_probs=log_probs)

    def size(self, state: State) -> tuple[int, int]:
        """(bytes of the state's .ppz file, parameters)."""
        books = read_codebooks(state.gm, state.codebook_layers())
        params = sum(p.numel() for p in state.gm.parameters())
        return len(ppz_bytes(state.gm, self.meta, books)), params

    def finetune(self, state: State, epochs: float, slim_l1: float = 0.0, key: str | None = None) -> State:
        """Fine-tune a copy of ``state`` keeping its constraints; raises
        :class:`DivergenceError` (the copy is dropped: ``state`` is untouched)."""
        return self._finetune_logged(state, epochs, slim_l1, key, None)[0]

    def _finetune_logged(self, state: State, epochs: float, slim_l1: float, key: str | None,
                         max_seconds: float | None) -> tuple[State, float]:
        """:meth:`finetune` for at most ``max_seconds`` (see :class:`TrainConfig`), and
        the epochs it trained."""
        gm = copy.deepcopy(state.gm)
        config = self.settings.train_for(state, epochs=epochs, slim_l1=slim_l1, max_seconds=max_seconds)
        logs = fine_tune(gm, self.data.train, self.data.mean, self.data.std, config,
                         hooks=constraint_hooks(state.passes(), gm), teacher=self.teacher)
        trained = sum(log.images for log in logs) / len(self.data.train)
        return State(gm, state.steps, key or state.key.removesuffix("@bn") + "@ft", state.prefix), trained

    def _tuned(self, parent: State, specs: Sequence[str], steps: Sequence[str] | None, epochs: float,
               key: str) -> State:
        """``specs`` applied to ``parent`` and fine-tuned ``epochs``: masking at once or,
        with ``gradual_mask``, during the fine-tune (:meth:`finetune_masking`)."""
        mask_at = None
        if self.settings.gradual_mask:
            # the first pass that can reach its result during the fine-tune (magnitude pruning)
            mask_at = next((i for i, spec in enumerate(parse_pipeline(",".join(specs))) if pass_class(spec.name).gradual),
                           None)
        if mask_at is None:
            return self.finetune(self.apply(parent, specs, steps), epochs, key=key)
        return self.finetune_masking(parent, specs, mask_at, steps, epochs, key)

    def finetune_masking(self, parent: State, specs: Sequence[str], mask_at: int, steps: Sequence[str] | None,
                         epochs: float, key: str) -> State:
        """``specs`` applied to ``parent`` with the mask at ``mask_at`` reached during
        fine-tuning: the passes before it run, then a fine-tune prunes gradually to the
        mask's exact zeros, keeping the constraints of the passes before the mask in
        the child's pipeline (earlier masks' zeros are never given back); then the
        passes after it run, and the rest of ``epochs`` recovers with every
        constraint. Raises :class:`DivergenceError` (``parent`` is untouched)."""
        steps = tuple(steps) if steps is not None else (*parent.steps, *specs)
        mask_spec = specs[mask_at]
        before_mask = steps[:len(steps) - 1 - steps[::-1].index(mask_spec)]  # specs end the pipeline
        child = self.apply(parent, specs[:mask_at], steps=before_mask) if mask_at else \
            State(copy.deepcopy(parent.gm), before_mask, parent.key, parent.prefix)
        after = specs[mask_at + 1:]
        ramp_epochs = epochs * (1.0 - self.settings.after_mask_share) if after else epochs
        (spec,) = parse_pipeline(mask_spec)
        gradual = create_pass(spec.name, **spec.options).gradually(child.gm)
        hooks = constraint_hooks(child.passes(), child.gm).extend(gradual.hooks())
        config = self.settings.train_for(child, epochs=ramp_epochs, slim_l1=0.0)
        fine_tune(child.gm, self.data.train, self.data.mean, self.data.std, config, hooks=hooks, teacher=self.teacher)
        gradual.finish(child.gm)
        masked = State(child.gm, (*before_mask, mask_spec), child.key, parent.prefix)
        if not after:
            return State(child.gm, steps, key, parent.prefix)
        return self.finetune(self.apply(masked, after, steps=steps), epochs - ramp_epochs, key=key)

    def _record(self, key: str, state: State | None, stage: str, level: Any, phase: str, accuracy: float | None,
                n: int, epochs: float, start: float, status: str = "ok", reason: str = "",
                pipeline: str | None = None, estimate: float | None = None,
                trained: float | None = None, divergence: float | None = None) -> Candidate:
        size, params = self.size(state) if state is not None else (0, 0)
        judged = estimate if estimate is not None else accuracy
        meets = status == "ok" and judged is not None and judged >= self.target
        extra = {"estimate": estimate} if estimate is not None else {}
        if divergence is not None:
            extra["divergence"] = divergence
        c = Candidate(key, self.search, pipeline if pipeline is not None else state.pipeline, stage, level, phase,
                      accuracy, n, meets, size, params, epochs, time.perf_counter() - start, status, reason, extra)
        # fine-tunes by the time of one of the configured length, so efforts compare
        # (``trained``: the epochs this call trained, when it continued a held fine-tune)
        trained = epochs if trained is None else trained
        units = trained / self.settings.finetune_epochs if phase == "finetune" and trained > 0 else 1.0
        self._took(phase, c.seconds / units)
        self.measured += 1
        self.journal.put(c)
        self.progress.done(c, cached=False)
        return c

    def _took(self, phase: str, seconds: float) -> None:
        self._seconds.setdefault(phase, []).append(seconds)
        tunes = self._seconds.get("finetune")
        if tunes and self.settings.final_epochs > 0 and self.settings.finetune_epochs > 0:
            per_epoch = sorted(tunes)[len(tunes) // 2] / self.settings.finetune_epochs
            self.budget.keep("final fine-tune", per_epoch * self.settings.final_epochs)
        if phase == "val":
            self.budget.keep("writing", WRITING_EVALS * max(self._seconds["val"]))

    def expected_seconds(self, phase: str) -> float:
        """How long the next measurement of ``phase`` should take: the longest of the
        last three in this run (0 before the first); for ``finetune``, one of
        ``finetune_epochs``."""
        return max(self._seconds.get(phase, [])[-3:], default=0.0)

    def _cached(self, key: str) -> Candidate | None:
        c = self.journal.get(key)
        if c is not None:
            self.progress.done(c, cached=True)
        return c

    # -- candidates of one stage

    def screen(self, parent: State, stage: Stage, level: Any) -> Candidate:
        """Cheap: recalibrated accuracy on the screening subset of val (after
        :attr:`EvalSettings.screen_steps` fine-tuning steps, if any)."""
        return self.screen_pipeline(parent, [stage.spec(level)], stage.name, level)

    def screen_pipeline(self, parent: State, specs: Sequence[str], stage: str, level: Any,
                        steps: Sequence[str] | None = None) -> Candidate:
        """:meth:`screen` of several passes applied to ``parent`` at once."""
        recovery = f"@s{self.settings.screen_steps}" if self.settings.screen_steps else ""
        key = f"{parent.key}>{','.join(specs)}@bn{recovery}#screen"
        c = self._cached(key)
        if c is not None:
            return c
        self.budget.check(self.expected_seconds("screen"))
        start = time.perf_counter()
        child = self.apply(parent, specs, steps)
        if self.settings.screen_steps:
            try:
                child = self._recover_briefly(child)
            except DivergenceError as exc:
                return self._record(key, None, stage, level, "screen", None, len(self.data.screen), 0.0, start,
                                    status="failed", reason=f"screen's recovery: {exc}",
                                    pipeline=child.pipeline)
        offset = self._offset(parent)
        result = self._evaluate(child.gm, self.data.screen, log_probs=True)
        return self._record(key, child, stage, level, "screen", result.accuracy, len(self.data.screen), 0.0, start,
                            estimate=result.accuracy + offset,
                            divergence=kl_divergence(self._screen_log_probs[parent.key], result.log_probs))

    def _recover_briefly(self, child: State) -> State:
        """``child`` after :attr:`EvalSettings.screen_steps` steps of fine-tuning in
        place, keeping its constraints, distilling as a deciding fine-tune does."""
        config = replace(self.settings.train, epochs=1.0, max_steps=self.settings.screen_steps, slim_l1=0.0,
                         max_seconds=None, progress=False)
        fine_tune(child.gm, self.data.train, self.data.mean, self.data.std, config,
                  hooks=constraint_hooks(child.passes(), child.gm), teacher=self.teacher)
        return child

    def _offset(self, parent: State) -> float:
        """``parent``'s val accuracy minus its accuracy on the screening subset (and
        its predictions there, which a screen's divergence is measured from)."""
        if parent.key not in self._offsets:
            if parent.val_accuracy is None:
                raise ValueError(f"state {parent.key} has no val accuracy to estimate from")
            result = self._evaluate(parent.gm, self.data.screen, log_probs=True)
            self._offsets[parent.key] = parent.val_accuracy - result.accuracy
            self._screen_log_probs[parent.key] = result.log_probs
        return self._offsets[parent.key]

    def screen_estimate(self, parent: State, candidate: Candidate) -> float | None:
        """The val accuracy a screened child is expected to have: the parent's val
        accuracy plus the child-minus-parent difference on the same screening
        images. A paired difference, so the subset's own difficulty cancels out
        (the subset alone can sit points away from all of val). Recorded with
        the screen as ``extra["estimate"]``; its ``meets`` is judged on it."""
        if candidate.status != "ok":
            return None
        if "estimate" in candidate.extra:
            return candidate.extra["estimate"]
        return candidate.accuracy + self._offset(parent)

    def screen_meets(self, parent: State, stage: Stage, level: Any, slack: float = 0.0) -> bool:
        estimate = self.screen_estimate(parent, self.screen(parent, stage, level))
        return estimate is not None and estimate >= self.target - slack

    def measure(self, parent: State, stage: Stage, level: Any) -> Candidate:
        """The deciding measurement: fine-tuned (if there is a fine-tuning budget)
        and measured on all of val."""
        return self.measure_pipeline(parent, [stage.spec(level)], stage.name, level)

    def measure_pipeline(self, parent: State, specs: Sequence[str], stage: str, level: Any,
                         steps: Sequence[str] | None = None, within_budget: bool = True,
                         effort: int = 1, untrained_first: bool = False) -> Candidate:
        """:meth:`measure` of several passes applied to ``parent`` at once, fine-tuned
        ``effort`` times the configured epochs (a power of two: see :meth:`tuned_to`,
        which continues the same candidate's shorter fine-tune when this run holds
        it, so a retry at twice the effort costs one fine-tune, not two). With
        ``within_budget`` False it runs even when the budget is spent (the search's
        one measurement that keeps a screened answer). With ``untrained_first`` the
        recalibrated model is first measured on all of val (:meth:`validate_pipeline`),
        and if that meets the target it is the measurement and nothing is trained: a
        small push from a model fine-tuned already can lose more to a restarted
        schedule than it needs back (a ResNet-56 push that screened no loss at all
        measured 0.6 points lower after its 0.5 epoch)."""
        epochs = self.settings.finetune_epochs * effort
        if epochs <= 0 or untrained_first:
            c = self.validate_pipeline(parent, specs, stage, level, steps, within_budget)
            if epochs <= 0 or c.meets:
                return c
        base_key = f"{parent.key}>{','.join(specs)}"
        key = f"{self._tuned_key(base_key, effort)}#val"
        c = self._cached(key)
        if c is not None:
            return c
        held = self._held_effort(base_key, effort)
        if within_budget:
            self.budget.check(self.expected_seconds("finetune") * (effort - held))
        start = time.perf_counter()
        trained = epochs - self.settings.finetune_epochs * held
        try:
            child = self.tuned_to(parent, specs, steps, effort)
        except DivergenceError as exc:
            pipeline = ",".join(s for s in (parent.prefix, *(steps or (*parent.steps, *specs))) if s)
            return self._record(key, None, stage, level, "finetune", None, len(self.data.val), epochs, start,
                                status="failed", reason=f"rolled back: {exc}", pipeline=pipeline, trained=trained)
        return self._record(key, child, stage, level, "finetune", self.accuracy(child.gm, self.data.val),
                            len(self.data.val), epochs, start, trained=trained)

    def validate_pipeline(self, parent: State, specs: Sequence[str], stage: str, level: Any,
                          steps: Sequence[str] | None = None, within_budget: bool = True) -> Candidate:
        """``specs`` applied to ``parent``, BatchNorm recalibrated, measured on all of
        val without training (phase ``val``)."""
        key = f"{parent.key}>{','.join(specs)}@bn#val"
        c = self._cached(key)
        if c is not None:
            return c
        if within_budget:
            self.budget.check(self.expected_seconds("val"))
        start = time.perf_counter()
        child = self.apply(parent, specs, steps)
        return self._record(key, child, stage, level, "val", self.accuracy(child.gm, self.data.val),
                            len(self.data.val), 0.0, start)

    @staticmethod
    def _tuned_key(base_key: str, effort: int) -> str:
        return f"{base_key}@ft" if effort == 1 else f"{base_key}@ft{effort}x"

    def _held(self, key: str, steps: Sequence[str], prefix: str) -> State | None:
        """The fine-tuned state of ``key`` from memory or the journal's folder."""
        state = self._states.get(key)
        if state is None:
            gm = self.journal.load_weights(key)
            if gm is not None:
                state = self._states[key] = State(gm, tuple(steps), key, prefix)
        return state

    def _held_effort(self, base_key: str, effort: int) -> int:
        """The largest effort below ``effort`` at which this candidate's fine-tuned
        weights are held (0: none), which :meth:`tuned_to` continues."""
        shorter = effort // 2
        while shorter >= 1:
            key = self._tuned_key(base_key, shorter)
            if key in self._states or self.journal.has_weights(key):
                return shorter
            shorter //= 2
        return 0

    def tuned_to(self, parent: State, specs: Sequence[str], steps: Sequence[str] | None, effort: int) -> State:
        """``specs`` applied to ``parent`` and fine-tuned ``effort`` times the configured
        epochs, where effort ``2e`` is *defined* as effort ``e``'s model fine-tuned
        ``e`` more (at the continuation rate): a candidate that missed the target by a
        little is trained on rather than started again, and its weights are the same
        whether or not the shorter fine-tune was held (it is redone when lost, which
        keeps a resumed search exact). Every state made is kept (memory and journal).
        Raises :class:`DivergenceError`."""
        if effort < 1 or effort & (effort - 1):
            raise ValueError(f"a fine-tune's effort must be a power of two >= 1, got {effort}")
        steps = tuple(steps) if steps is not None else (*parent.steps, *specs)
        base_key = f"{parent.key}>{','.join(specs)}"
        key = self._tuned_key(base_key, effort)
        held = self._held(key, steps, parent.prefix)
        if held is not None:
            return held
        if effort == 1:
            child = self._tuned(parent, specs, steps, self.settings.finetune_epochs, key=key)
        else:
            shorter = self.tuned_to(parent, specs, steps, effort // 2)
            child = self.finetune(shorter, self.settings.finetune_epochs * (effort // 2), key=key)
        self.journal.save_weights(child.key, child.gm)
        self._states[child.key] = child
        return child

    def state_of(self, parent: State, specs: Sequence[str], candidate: Candidate,
                 steps: Sequence[str] | None = None) -> State:
        """The model a measured candidate stands for: fine-tuned weights from
        memory or the journal's folder, or the recalibrated child rebuilt (the
        passes, the recalibration and the fine-tunes are deterministic)."""
        steps = tuple(steps) if steps is not None else (*parent.steps, *specs)
        if candidate.phase == "finetune":
            effort = max(1, round(candidate.finetune_epochs / self.settings.finetune_epochs))
            state = self.tuned_to(parent, specs, steps, effort)  # held, or redone when the weights were lost
        else:
            state = self.apply(parent, specs, steps)
        state.candidate = candidate
        state.val_accuracy = candidate.accuracy if candidate.phase != "screen" else \
            self.screen_estimate(parent, candidate)
        return state

    def forget(self, keep: str | None = None) -> None:
        """Drop the fine-tuned models held in memory, all but the one of key ``keep``."""
        self._states = {keep: self._states[keep]} if keep in self._states else {}

    # -- whole-model steps

    def baseline(self, base: State) -> Candidate:
        key = "base#val"
        c = self._cached(key)
        if c is not None:
            return c
        start = time.perf_counter()
        return self._record(key, base, "baseline", None, "val", self.accuracy(base.gm, self.data.val),
                            len(self.data.val), 0.0, start)

    def sparsity_train(self, base: State, strength: float, epochs: float) -> tuple[Candidate, State | None]:
        """Network slimming's sparsity training (L1 on BatchNorm gammas) of the
        whole model: the state later stages may start from instead of ``base``.
        Under a time budget it trains for at most :data:`L1_BUDGET_SHARE` of it
        (fewer epochs on a slow or busy machine), so the search keeps its time; the
        candidate records the epochs actually trained."""
        prefix = f"l1(strength={strength!r},epochs={epochs!r})"
        key = f"{prefix}@ft"
        c = self._cached(f"{key}#val")
        if c is None:
            self.budget.check()
            start = time.perf_counter()
            limit = None if self.budget.seconds is None else L1_BUDGET_SHARE * self.budget.seconds
            try:
                state, trained = self._finetune_logged(base, epochs, strength, key, limit)
            except DivergenceError as exc:
                c = self._record(f"{key}#val", None, "l1", strength, "finetune", None, len(self.data.val), epochs,
                                 start, status="failed", reason=f"rolled back: {exc}", pipeline=prefix)
                return c, None
            trained = min(round(trained, 3), epochs)  # a whole run rounds to just above the epochs asked
            if trained < epochs:
                prefix = f"l1(strength={strength!r},epochs={trained!r})"
                self.progress.say(f"sparsity training cut to {trained:g} of {epochs:g} epochs: it may use "
                                  f"{L1_BUDGET_SHARE:.0%} of the time budget ({limit:.0f}s)")
            state.prefix = prefix
            self.journal.save_weights(key, state.gm)
            self._states[key] = state
            c = self._record(f"{key}#val", state, "l1", strength, "finetune", self.accuracy(state.gm, self.data.val),
                             len(self.data.val), trained, start)
        if c.status != "ok":
            return c, None
        prefix = c.pipeline
        state = self._states.get(key)
        if state is None:
            gm = self.journal.load_weights(key)
            state = State(gm, (), key, prefix) if gm is not None else \
                State(self.finetune(base, c.finetune_epochs, slim_l1=strength, key=key).gm, (), key, prefix)
        state.candidate, state.val_accuracy = c, c.accuracy
        return c, state
