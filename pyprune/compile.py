"""``pyprune compile``: the smallest model that still meets an accuracy target.

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

import hashlib
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__, distributed
from .api import LoadedModel
from .data import ArrayDataset, load_dataset
from .encode import graph_state_dict, inspect, load_ppz, save_ppz
from .encode.files import atomic_write
from .export import OnnxExportError, VerificationError, verification_inputs, write_onnx
from .ir import example_input, propagate_shapes, trace
from .passes import pass_class, read_codebooks
from .search.candidates import Candidate, State, make_stages
from .search.evaluator import Budget, EvalSettings, Evaluator, SearchData
from .search.grid import GridSearch
from .search.heuristic import HeuristicSearch, SearchOutcome, explore_orders
from .search.boundary import last_passing
from .search.journal import Journal
from .search.progress import Progress
from .search.report import layer_table, plot_pareto, render_markdown, write_json
from .search.target import Target
from .train import TrainConfig, evaluate

STATE_DIR = ".compile-state"
OUTPUTS = ("model.ppz", "model.onnx", "model.unverified.onnx", "report.json", "report.md", "pareto.png")
EXIT_ONNX_FAILED = 3
VAL_FROM = {"train": ("val", "test"), "test": ("test-search", "test-report")}
# The paper's order: structured slimming first, then deep compression's pruning and sharing.
DEFAULT_ORDER = ("slim", "mask", "quant")


@dataclass
class CompileConfig:
    target: Target
    output: Path
    search: str = "heuristic"  # or "grid"
    order: tuple[str, ...] = DEFAULT_ORDER
    explore_order: bool = False
    levels: dict[str, tuple[float | int, ...]] = field(default_factory=dict)
    finetune_epochs: float = 0.1
    slim_l1: float = 0.0
    l1_epochs: float = 1.0
    budget_minutes: float | None = None
    val_from: str = "train"
    val_limit: int | None = 2500
    screen_limit: int = 1000
    test_limit: int | None = None
    train_limit: int | None = None
    recal_images: int = 1024
    margin: float = 0.1
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=1.0))
    data: str = "cifar10"
    data_root: str | None = None
    download: bool = False
    resume: bool = False
    force: bool = False
    quiet: bool = False
    onnx_verify: int = 256

    def __post_init__(self) -> None:
        self.output = Path(self.output)
        if self.search not in ("heuristic", "grid"):
            raise ValueError(f"--search must be heuristic or grid, got {self.search!r}")
        if self.val_from not in VAL_FROM:
            raise ValueError(f"--val-from must be train or test, got {self.val_from!r}")
        for flag, value in (("--finetune-epochs", self.finetune_epochs), ("--slim-l1", self.slim_l1),
                            ("--recover-margin", self.margin)):
            if value < 0:
                raise ValueError(f"{flag} must be >= 0, got {value}")
        for flag, value in (("--val-limit", self.val_limit), ("--screen-limit", self.screen_limit),
                            ("--test-limit", self.test_limit), ("--train-limit", self.train_limit),
                            ("--recal-images", self.recal_images)):
            if value is not None and value <= 0:
                raise ValueError(f"{flag} must be positive, got {value}")
        if self.onnx_verify < 0:
            raise ValueError(f"--onnx-verify must be >= 0, got {self.onnx_verify}")
        if self.budget_minutes is not None and self.budget_minutes <= 0:
            raise ValueError(f"--budget-minutes must be positive, got {self.budget_minutes}")
        if self.slim_l1 > 0 and self.l1_epochs <= 0:
            raise ValueError("--slim-l1 needs --l1-epochs > 0")
        self.stages = make_stages(tuple(self.order), self.levels)  # validates order and levels
        if self.slim_l1 > 0 and self.sparsity_trained_stage() is None:
            raise ValueError("--slim-l1 schedules sparsity training for a stage that gains from it (network "
                             "slimming), but --order has no such stage")
        if self.search == "grid" and (self.explore_order or self.slim_l1 > 0):
            raise ValueError("--explore-order and --slim-l1 belong to the heuristic search, not to --search grid")

    def sparsity_trained_stage(self):
        """The stage whose pass gains from network slimming's sparsity training, if any."""
        return next((s for s in self.stages if pass_class(s.name).gains_from_sparsity_training), None)

    def fingerprint(self, model: LoadedModel) -> dict[str, Any]:
        """The settings that decide the search's results (a resume must match)."""
        digest = hashlib.sha256()
        for k, v in sorted(model.module.state_dict().items()):
            digest.update(k.encode())
            digest.update(v.detach().cpu().contiguous().numpy().tobytes())
        t = self.train
        return {"model": model.name, "weights": digest.hexdigest()[:16], "target": self.target.to_dict(),
                "search": self.search, "order": list(self.order), "explore_order": self.explore_order,
                "levels": {s.name: list(s.levels) for s in self.stages}, "finetune_epochs": self.finetune_epochs,
                "slim_l1": self.slim_l1, "l1_epochs": self.l1_epochs, "val_from": self.val_from,
                "val_limit": self.val_limit, "screen_limit": self.screen_limit, "train_limit": self.train_limit,
                "recal_images": self.recal_images, "margin": self.margin, "data": self.data,
                "lr": t.lr, "batch_size": t.batch_size, "seed": t.seed,
                # only when off, so that journals written before the switch existed still resume
                **({} if t.sync_batchnorm else {"sync_batchnorm": False})}


@dataclass
class CompileResult:
    report: dict[str, Any]
    output: Path
    exit_code: int = 0


def _check_output(config: CompileConfig) -> None:
    out = config.output
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if not out.exists() or not any(out.iterdir()):
        return
    state = out / STATE_DIR / "journal.jsonl"
    if config.force:
        return
    if config.resume:
        if not state.is_file():
            raise FileExistsError(f"{out} holds no interrupted compile to resume (no {STATE_DIR}/journal.jsonl); "
                                  "pass --force to start over")
        return
    raise FileExistsError(f"{out} is not empty; pass --resume to continue an interrupted compile, or --force "
                          "to start over (pyprune's own outputs there are replaced)")


def _clear_outputs(out: Path) -> None:
    for name in OUTPUTS:
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)


def _load_data(config: CompileConfig, model: LoadedModel) -> tuple[SearchData, ArrayDataset]:
    val_split, test_split = VAL_FROM[config.val_from]

    def get(split: str, limit: int | None) -> ArrayDataset:
        return load_dataset(config.data, split, config.data_root, config.download, limit,
                            input_shape=model.input_shape)

    val = get(val_split, config.val_limit)
    data = SearchData(get("train", config.train_limit), val, val.subset(slice(0, config.screen_limit)),
                      model.mean, model.std, model.input_shape)
    return data, get(test_split, config.test_limit)


def fp32_bytes(gm: torch.nn.Module) -> int:
    """Bytes of the model's floating-point state as float32: the uncompressed size."""
    return 4 * sum(t.numel() for t in graph_state_dict(gm).values() if t.is_floating_point())


def _warn(message: str) -> None:
    print(message, file=sys.stderr)


def compile_model(model: LoadedModel, config: CompileConfig, log: Callable[[str], None] = print,
                  warn: Callable[[str], None] = _warn) -> CompileResult:
    """Search for the smallest model that meets ``config.target``; write
    ``model.ppz``, ``report.json``, ``report.md`` and ``pareto.png`` into
    ``config.output``. See the module docstring for the order of work."""
    started = time.perf_counter()
    _check_output(config)
    gm = propagate_shapes(trace(model.module), example_input(model.input_shape))
    data, test_set = _load_data(config, model)
    meta = {"arch": model.name, "mean": list(model.mean), "std": list(model.std),
            "input_shape": list(model.input_shape)}
    main = distributed.is_main()  # under torchrun, only rank 0 writes and talks
    progress = Progress(config.quiet or not main)
    train = TrainConfig(**{**vars(config.train), "progress": not config.quiet and main})
    settings = EvalSettings(config.finetune_epochs, train, config.recal_images)
    # The baseline is measured before out/ exists (the target may refuse it), so into a
    # journal in memory; the evaluator moves to the real one once the target is known.
    scratch = Journal()
    ev = Evaluator(data, settings, float("-inf"), scratch, Budget(config.budget_minutes, scratch), progress, meta,
                   search=config.search)
    base = State(gm)
    try:
        baseline = ev.baseline(base)
        base.candidate, base.val_accuracy = baseline, baseline.accuracy
        target = config.target.resolve(baseline.accuracy, data.val.name)  # may refuse: nothing written yet
        baseline.meets = True  # by definition of a target it resolved
        progress.say(f"baseline {baseline.accuracy:.4f} on {data.val.name} ({len(data.val)} images); "
                     f"target {target:.4f} ({config.target.describe()})")

        if config.force and config.output.exists() and main:
            _clear_outputs(config.output)
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
    shutil.rmtree(config.output / STATE_DIR, ignore_errors=True)
    if onnx.get("error"):
        warn(f"error: {config.output / 'model.onnx'} was not written: {onnx['error']}")
    if not chosen["met_target"]:
        warn(f"warning: no compressed candidate met the target {target:.4f} within the budget; "
            f"{config.output / 'model.ppz'} holds the baseline, packed losslessly")
    if not config.quiet:
        log(f"chose {chosen['pipeline'] or 'the baseline'}: val {chosen['val_accuracy']:.4f}, test "
            f"{chosen['test_accuracy']:.4f}, {chosen['file_bytes']:,} bytes ({chosen['compression']:.2f}x "
            f"smaller than fp32); {report['search']['candidates']} candidates in {report['search']['seconds']:.0f}s; "
            f"wrote {config.output}/")
    return CompileResult(report, config.output, EXIT_ONNX_FAILED if onnx.get("error") else 0)


def _write_onnx(gm: torch.nn.Module, out: Path, val: ArrayDataset, meta: dict[str, Any],
                n: int) -> dict[str, Any]:
    """The compact ONNX file of the decoded model, verified on ``n`` validation
    images; a failure is reported, not raised, so the search's result is kept."""
    inputs, described = verification_inputs(val, n, meta["mean"], meta["std"]) if n else (None, None)
    try:
        return write_onnx(gm, out / "model.onnx", "compact", meta["input_shape"], inputs=inputs, data=described,
                          meta=meta, force=True).to_dict()
    except VerificationError as exc:
        return {"path": None, "kept": exc.kept, "verified": False, "verification": exc.verification.to_dict(),
                "error": f"ONNX verification failed: {exc}"}
    except OnnxExportError as exc:
        return {"path": None, "verified": False, "verification": None, "error": f"ONNX export failed: {exc}"}


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
    outcome = HeuristicSearch(ev, stages, config.margin).run(start)
    outcome.l1, outcome.orders = l1_record, orders
    return outcome


def _decide_l1(ev: Evaluator, base: State, config: CompileConfig, slim) -> tuple[State, dict[str, Any]]:
    """Sparsity-train a copy, then keep it only if it lets slimming go further on
    the screen (the cheap proxy): network slimming's premise, checked per model."""
    candidate, trained = ev.sparsity_train(base, config.slim_l1, config.l1_epochs)
    record = {"strength": config.slim_l1, "epochs": config.l1_epochs, "val_accuracy": candidate.accuracy,
              "status": candidate.status, "boundary_without": None, "boundary_with": None, "paid_off": False}
    if trained is None:
        return base, record

    def boundary(state: State) -> int:
        return last_passing(lambda i: ev.screen_meets(state, slim, slim.levels[i]), -1, len(slim.levels))

    without, with_l1 = boundary(base), boundary(trained)
    level = lambda i: slim.levels[i] if i >= 0 else 0.0
    record.update(boundary_without=level(without), boundary_with=level(with_l1), paid_off=with_l1 > without)
    ev.progress.say(f"sparsity training: slim boundary {level(with_l1)} with L1 vs {level(without)} without: "
                    f"{'used' if with_l1 > without else 'not used'}")
    return (trained if with_l1 > without else base), record


def _finish(ev: Evaluator, base: State, baseline: Candidate, outcome: SearchOutcome, config: CompileConfig,
            test_set: ArrayDataset, target: float, meta: dict[str, Any], settings: dict[str, Any],
            started: float) -> dict[str, Any]:
    out = config.output
    search_seconds = ev.budget.spent()
    final = outcome.final
    met = final is not base and final.candidate is not None and final.candidate.meets
    if not met:
        final = base
    books = read_codebooks(final.gm, final.codebook_layers())
    file_meta = {**meta, "provenance": [{"compile": final.pipeline, "target": target}]}
    model_path = out / "model.ppz"
    if distributed.is_main():
        save_ppz(final.gm, model_path, file_meta, books, force=True)
    distributed.barrier()
    decoded, _ = load_ppz(model_path)  # measure what was written, not what is in memory
    mean, std = ev.data.mean, ev.data.std
    val_acc = evaluate(decoded, ev.data.val, mean, std, progress=False).accuracy
    test_acc = evaluate(decoded, test_set, mean, std, progress=False).accuracy
    base_test = evaluate(base.gm, test_set, mean, std, progress=False).accuracy
    file_bytes = model_path.stat().st_size
    onnx = _write_onnx(decoded, out, ev.data.val, meta, config.onnx_verify) if distributed.is_main() else None
    onnx = distributed.broadcast_object(onnx)
    original = fp32_bytes(base.gm)
    inspection = inspect(model_path)
    candidates = [c.to_dict() for c in ev.journal]
    measured = [c for c in candidates if c["stage"] != "baseline"]
    report = {
        "pyprune": __version__, "model": meta["arch"],
        "settings": {**settings, "budget_minutes": config.budget_minutes},
        "target": {**config.target.to_dict(), "accuracy": target},
        "data": {"name": config.data, "val_from": config.val_from, "val_split": ev.data.val.name,
                 "val_n": len(ev.data.val), "screen_n": len(ev.data.screen), "test_split": test_set.name,
                 "test_n": len(test_set), "train_n": len(ev.data.train)},
        "baseline": {"val_accuracy": baseline.accuracy, "test_accuracy": base_test, "params": baseline.params,
                     "fp32_bytes": original, "ppz_bytes": baseline.size_bytes},
        "chosen": {"pipeline": final.pipeline if met else "", "key": final.key, "met_target": met,
                   "val_accuracy": val_acc, "search_val_accuracy": final.candidate.accuracy if met else
                   baseline.accuracy, "test_accuracy": test_acc,
                   "params": sum(p.numel() for p in final.gm.parameters()), "file_bytes": file_bytes,
                   "fp32_bytes": original, "compression": original / file_bytes},
        "search": {
            "kind": config.search, "order": list(outcome.order),
            "candidates": len(measured),
            "screened": sum(c["phase"] == "screen" for c in measured),
            "finetuned": sum(c["phase"] == "finetune" for c in measured),
            "validated": sum(c["phase"] == "val" for c in measured),
            "failed": sum(c["status"] != "ok" for c in measured),
            "cache_hits": ev.journal.hits, "seconds": search_seconds,
            "budget_minutes": config.budget_minutes, "budget_exhausted": outcome.budget_exhausted,
            "stages": [s.to_dict() for s in outcome.stages], "l1": outcome.l1, "orders": outcome.orders,
        },
        "onnx": onnx,
        "layers": layer_table(base.gm, final.gm, inspection, set(final.codebook_layers())),
        "candidates": candidates,
    }
    report["total_seconds"] = time.perf_counter() - started + ev.journal.replayed_seconds
    report["processes"] = distributed.current().world
    if not distributed.is_main():
        return report
    text = render_markdown(report)
    atomic_write(out / "report.md", lambda f: f.write(text.encode()), force=True)
    plot_pareto(report, out / "pareto.png")
    write_json(out / "report.json", report)
    return report
