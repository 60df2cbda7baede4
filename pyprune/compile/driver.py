"""The compile driver: checks, baseline and target, search, then the outputs.

Order of work, so that bad input costs nothing and leaves nothing behind:
check the settings and the output folder, trace the model, load the data,
measure the baseline and resolve the target (refusing a baseline below an
absolute target), and only then create ``out/``. The search keeps its journal
and fine-tuned weights in ``out/.compile-state/`` (what ``--resume`` reads);
the outputs are written at the end, each atomically, ``report.json`` last, and
the state folder is removed once they are all in place. ``model.onnx`` (the
compact ONNX form, verified in onnxruntime on the first ``onnx_verify`` validation
images) is written from the decoded ``model.ppz``; when it cannot be exported or
does not verify, every other output is still written, the report says why, and
the exit code is 3.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import distributed
from ..data import ArrayDataset
from ..encode import GraphFormatError, graph_to_json
from ..ir import example_input, inference_only, propagate_shapes, trace
from ..models import LoadedModel
from ..search import (Budget, Candidate, EvalSettings, Evaluator, GridSearch, HeuristicSearch, Journal, SearchData,
                      SearchOutcome, Stage, StageOutcome, State, explore_orders, last_passing)
from ..search.layerwise import LayerRefinement
from ..search.marginal import MarginalSearch, Setting
from ..search.marginal_oracle import EvaluatorOracle
from ..search.progress import Progress
from ..train import MemoizedTeacher, TrainConfig
from .config import CompileConfig
from .final import recover, write_final
from .outputs import STATE_DIR, check_output, clear_outputs, no_onnx, remove_state, write_compact_onnx, write_reports
from .report import build_report

EXIT_ONNX_FAILED = 3


@dataclass
class CompileResult:
    report: dict[str, Any]
    output: Path
    exit_code: int = 0


def _load_data(config: CompileConfig, model: LoadedModel) -> tuple[SearchData, ArrayDataset]:
    val_split, test_split = config.splits

    def get(split: str, limit: int | None) -> ArrayDataset:
        return config.data.load(split, limit, input_shape=model.input_shape, model=model.described)

    val = get(val_split, config.val_limit)
    data = SearchData(get("train", config.train_limit), val, val.subset(slice(0, config.screen_limit)),
                      model.mean, model.std, model.input_shape)
    return data, get(test_split, config.test_limit)


def _warn(message: str) -> None:
    print(message, file=sys.stderr)


def compile_model(model: LoadedModel, config: CompileConfig, log: Callable[[str], None] = print,
                  warn: Callable[[str], None] = _warn) -> CompileResult:
    """Search for the smallest model that meets ``config.target``; write
    ``model.ppz``, ``report.json``, ``report.md`` and ``pareto.png`` into
    ``config.output``. See the module docstring for the order of work."""
    started = time.perf_counter()
    check_output(config.output, config.resume, config.force)
    folded = inference_only(model.module)
    if folded and (config.finetune_epochs > 0 or config.slim_l1 > 0):
        raise ValueError(f"{model.name}'s BatchNorm was folded for inference ({folded[0]}, ...), so it cannot be "
                         "fine-tuned: compile it with --finetune-epochs 0, or compile the model before folding")
    gm = propagate_shapes(trace(model.module, leaf_modules=model.leaf_modules), example_input(model.input_shape))
    try:  # before any work: a model the file format cannot describe would fail only at the end
        graph_to_json(gm)
    except GraphFormatError as exc:
        raise GraphFormatError(f"{config.output / 'model.ppz'} could not hold this model: {exc}") from None
    data, test_set = _load_data(config, model)
    meta = model.meta()
    main = distributed.is_main()  # under torchrun, only rank 0 writes and talks
    progress = Progress(config.quiet or not main)
    train = TrainConfig(**{**vars(config.train), "progress": not config.quiet and main})
    settings = EvalSettings(config.finetune_epochs, train, config.recal_images, config.final_epochs,
                            gradual_mask=config.gradual_mask, screen_steps=config.screen_steps,
                            continue_lr=config.continue_lr)
    # The baseline is measured before out/ exists (the target may refuse it), so into a
    # journal in memory; the evaluator moves to the real one once the target is known.
    scratch = Journal()
    ev = Evaluator(data, settings, float("-inf"), scratch, Budget(config.budget_minutes, scratch), progress, meta,
                   search=config.search)
    base = State(gm)
    if config.distill > 0:
        # the uncompressed model, which fine-tuning never changes: every fine-tune replays
        # the same seeded batches, so its outputs are computed once
        ev.teacher = MemoizedTeacher(copy.deepcopy(gm))
    try:
        baseline = ev.baseline(base)
        base.candidate, base.val_accuracy = baseline, baseline.accuracy
        target = config.target.resolve(baseline.accuracy, data.val.name)  # may refuse: nothing written yet
        baseline.meets = True  # by definition of a target it resolved
        progress.say(f"baseline {baseline.accuracy:.4f} on {data.val.name} ({len(data.val)} images); "
                     f"target {target:.4f} ({config.target.describe()})")

        if config.force and config.output.exists() and main:
            clear_outputs(config.output)
        distributed.barrier()
        settings_used = config.fingerprint(model)
        journal = Journal(config.output / STATE_DIR, settings_used, resume=config.resume)
        distributed.barrier()  # every process has read the journal before rank 0 appends to it
        ev.begin(target, journal, baseline)
        outcome = _search(ev, base, config)
        report = _finish(ev, base, baseline, outcome, config, test_set, target, meta, settings_used, started)
    finally:
        progress.close()
    chosen = report["chosen"]
    onnx = report["onnx"]
    if not main:
        return CompileResult(report, config.output, EXIT_ONNX_FAILED if onnx.get("error") else 0)
    remove_state(config.output)
    if onnx.get("error"):
        warn(f"error: {config.output / 'model.onnx'} was not written: {onnx['error']}")
    if chosen["unconfirmed"]:
        u = chosen["unconfirmed"]
        warn(f"warning: the search recorded {u['pipeline']} at val {u['search_val_accuracy']:.4f}, but the file "
             f"written for it measures {u['file_val_accuracy']:.4f}, below the target {target:.4f} (a journal "
             f"edited or left by other settings?); {config.output / 'model.ppz'} holds the baseline, packed "
             "losslessly")
    elif not chosen["met_target"]:
        warn(f"warning: no compressed candidate met the target {target:.4f} within the budget; "
            f"{config.output / 'model.ppz'} holds the baseline, packed losslessly")
    if not config.quiet:
        log(f"chose {chosen['pipeline'] or 'the baseline'}: val {chosen['val_accuracy']:.4f}, test "
            f"{chosen['test_accuracy']:.4f}, {chosen['file_bytes']:,} bytes ({chosen['compression']:.2f}x "
            f"smaller than fp32); {report['search']['candidates']} candidates in {report['search']['seconds']:.0f}s; "
            f"wrote {config.output}/")
    return CompileResult(report, config.output, EXIT_ONNX_FAILED if onnx.get("error") else 0)


def _search(ev: Evaluator, base: State, config: CompileConfig) -> SearchOutcome:
    stages = list(config.stages)
    if config.search == "grid":
        return GridSearch(ev, stages).run(base)
    start, l1_record = base, None
    if config.slim_l1 > 0:
        start, l1_record = _decide_l1(ev, base, config, config.sparsity_trained_stage())
    orders = None
    if config.explore_order and len(stages) > 1:
        stages, orders = explore_orders(ev, start, stages, config.margin)
        ev.progress.say(f"order chosen on the screen-only proxy: {' -> '.join(s.name for s in stages)}")
    if config.search == "marginal":
        outcome = _marginal(ev, start, stages, config.margin if config.finetune_epochs > 0 else 0.0,
                            config.max_effort if config.finetune_epochs > 0 else 1, config.per_layer,
                            config.measure_from == "baseline",
                            # without fine-tuning nothing is recovered: screens decide
                            config.recovery if config.finetune_epochs > 0 else "additive")
    else:
        outcome = HeuristicSearch(ev, stages, config.margin).run(start)
    outcome.l1, outcome.orders = l1_record, orders
    return outcome


def _marginal(ev: Evaluator, start: State, stages: list[Stage], margin: float, max_effort: int,
              per_layer: bool, from_baseline: bool = False, recovery: str = "additive") -> SearchOutcome:
    oracle = EvaluatorOracle(ev, stages, start, from_baseline)
    names, ladders = [s.name for s in stages], [s.levels for s in stages]
    ev.progress.expect(sum(math.ceil(math.log2(len(s.levels) + 1)) for s in stages) + 4)
    search = MarginalSearch(oracle, [len(s.levels) for s in stages], margin, names, max_effort, recovery)
    result = search.run(recover_more=False)
    layers = LayerRefinement(ev, oracle, margin)
    kept_back = layers.expected_seconds(result.best.setting) if per_layer and result.best is not None else 0.0
    # phase 4 (more fine-tuning) stops early enough to leave the per-layer step its time
    ev.budget.keep("per-layer settings", kept_back)
    try:
        result = search.recover_more()
    finally:
        ev.budget.keep("per-layer settings", 0.0)
    final = oracle.state(result.best.setting) if result.best is not None else start
    layer_moves: list[dict] = []
    if per_layer and result.best is not None and not (result.budget_exhausted and not kept_back):
        ev.progress.say("per-layer settings: screening each layer one step further than the rest")
        # measured as the chosen model was verified, with what fine-tuning that long recovers
        # (the step stops at the budget like any other: its screens may fit and not its measurement)
        layers.effort = search.verified_effort(result.best.setting)
        layers.margin = search.margin_at(layers.effort)
        layers.share = search.share_at(layers.effort) if recovery == "proportional" else None
        refinement = layers.run(result.best.setting)
        result.budget_exhausted = result.budget_exhausted or refinement.budget_exhausted
        layer_moves = [{**m.to_dict(), "levels": ""} for m in refinement.moves]
        if refinement.state is not None:
            final = refinement.state
            ev.progress.say(f"per-layer settings kept: {final.pipeline}")
    chosen = result.best.setting.index if result.best is not None else (-1,) * len(stages)
    rows = [StageOutcome(s.name, s.levels[c] if c >= 0 else None,
                         s.levels[result.singles[i]] if result.singles.get(i, -1) >= 0 else None, None, margin,
                         screens=sum(m.phase == "alone" and m.kind.startswith(f"{s.name}@") for m in result.moves))
            for i, (s, c) in enumerate(zip(stages, chosen))]
    if result.budget_exhausted:
        ev.progress.say(f"time budget spent: keeping {final.pipeline or 'the baseline'}"
                        + (" (verified after the budget ran out)" if result.kept_on_screen else ""))
    return SearchOutcome(final, tuple(names), rows, result.budget_exhausted,
                         moves=[{**m.to_dict(), "levels": Setting(m.setting).describe(names, ladders)}
                                for m in result.moves] + layer_moves, kept_on_screen=result.kept_on_screen)


def _decide_l1(ev: Evaluator, base: State, config: CompileConfig, stage: Stage) -> tuple[State, dict[str, Any]]:
    """Sparsity-train a copy, then keep it only if it lets ``stage`` (slimming) go
    further on the screen (the cheap proxy): network slimming's premise, checked
    per model."""
    candidate, trained = ev.sparsity_train(base, config.slim_l1, config.l1_epochs)
    # the epochs trained: fewer than asked when the budget cut them (Evaluator.sparsity_train)
    record = {"strength": config.slim_l1, "epochs": candidate.finetune_epochs, "val_accuracy": candidate.accuracy,
              "status": candidate.status, "boundary_without": None, "boundary_with": None, "paid_off": False}
    if trained is None:
        return base, record

    def boundary(state: State) -> int:
        return last_passing(lambda i: ev.screen_meets(state, stage, stage.levels[i]), -1, len(stage.levels))

    without, with_l1 = boundary(base), boundary(trained)
    level = lambda i: stage.levels[i] if i >= 0 else 0.0
    record.update(boundary_without=level(without), boundary_with=level(with_l1), paid_off=with_l1 > without)
    ev.progress.say(f"sparsity training: {stage.name} boundary {level(with_l1)} with L1 vs {level(without)} without: "
                    f"{'used' if with_l1 > without else 'not used'}")
    return (trained if with_l1 > without else base), record


def _finish(ev: Evaluator, base: State, baseline: Candidate, outcome: SearchOutcome, config: CompileConfig,
            test_set: ArrayDataset, target: float, meta: dict[str, Any], settings: dict[str, Any],
            started: float) -> dict[str, Any]:
    out = config.output
    search_seconds = ev.budget.spent()
    say = ev.progress.say
    recovery = None
    chosen = outcome.final
    if config.final_epochs > 0 and chosen is not base and chosen.candidate is not None and chosen.candidate.meets:
        say(f"final recovery: fine-tuning {chosen.pipeline} for {config.final_epochs:g} epochs")
        outcome.final, recovery = recover(ev, chosen, config.final_epochs, target)
        say(f"final recovery: val {recovery['val_after']}" if recovery["kept"] else
            f"final recovery not kept: {recovery['reason']}")
    say(f"writing {out / 'model.ppz'} and measuring it on {ev.data.val.name} and {test_set.name}")
    final = write_final(ev, base, outcome, test_set, out, target, meta, config.fold_batchnorm)
    if config.onnx:
        say(f"exporting {out / 'model.onnx'}" + (" and verifying it in onnxruntime" if config.onnx_verify else ""))
        onnx = write_compact_onnx(final.decoded, out, ev.data.val, meta, config.onnx_verify) \
            if distributed.is_main() else None
        onnx = distributed.broadcast_object(onnx)
    else:
        onnx = no_onnx(skipped="--no-onnx")
    report = build_report(ev, base, baseline, outcome, final, onnx, config, test_set, target, settings,
                          search_seconds, time.perf_counter() - started + ev.journal.replayed_seconds,
                          distributed.current().world)
    report["search"]["final_recovery"] = recovery
    if distributed.is_main():
        write_reports(report, out)
    return report
