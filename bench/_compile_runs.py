"""Shared by the compile benchmarks: run ``compile_model`` with stated settings
and print a table of what each run found and what it cost."""

from __future__ import annotations

import argparse
import contextlib
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from _checkpoints import add_checkpoint_args, load_checkpoint
from pyprune.api import RECOVERY_MODELS
from pyprune.compile import CompileConfig, compile_model
from pyprune.data import DataSpec
from pyprune.search.target import Target
from pyprune.train import TrainConfig


def add_common_args(p: argparse.ArgumentParser, finetune_epochs: float) -> None:
    p.add_argument("--arch", default="resnet20", help="zoo model with a published checkpoint ($PYPRUNE_MODELS)")
    p.add_argument("--max-drop", type=float, default=0.01, help="target: val accuracy points below the baseline")
    p.add_argument("--finetune-epochs", type=float, default=finetune_epochs)
    p.add_argument("--val-limit", type=int, default=2000)
    p.add_argument("--screen-limit", type=int, default=1000)
    p.add_argument("--train-limit", type=int, help="fine-tune on the first N training images only")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-root", help="default: $PYPRUNE_DATA, else ./data")
    p.add_argument("--budget-minutes", type=float, help="the same wall-clock budget for every run")
    p.add_argument("--distill", type=float, default=0.5, help="compile's --distill (0: labels only)")
    p.add_argument("--final-epochs", type=float, default=0.0, help="compile's --final-epochs")
    p.add_argument("--screen-steps", type=int, default=0, help="compile's --screen-steps")
    p.add_argument("--measure-from", choices=("accepted", "baseline"), default="accepted",
                   help="compile's --measure-from (the marginal search's deciding measurements)")
    p.add_argument("--no-per-layer", dest="per_layer", action="store_false",
                   help="compile's --no-per-layer: the search explores only the stages' ladders, as a grid does")
    p.add_argument("--recovery-model", choices=RECOVERY_MODELS, default="additive",
                   help="compile's --recovery-model (how the marginal search expects fine-tuning to recover)")
    p.add_argument("--keep-reports", metavar="DIR",
                   help="keep each run's compile output (report.json with the search's moves, report.md, "
                        "model.ppz) in DIR/<arch>-<label>; by default it is deleted")
    add_checkpoint_args(p)


@dataclass
class Run:
    label: str
    report: dict

    def row(self) -> list[str]:
        r, c, s = self.report, self.report["chosen"], self.report["search"]
        return [self.label, str(s["candidates"]), str(s["finetuned"]), f"{s['seconds']:.0f}",
                c["pipeline"] or "(baseline)", f"{c['file_bytes'] / 1024:.1f}", f"{c['compression']:.2f}x",
                f"{c['val_accuracy']:.4f}", f"{c['test_accuracy']:.4f}"]


HEADERS = ["search", "candidates", "fine-tuned", "seconds", "chosen pipeline", "KiB", "ratio", "val top-1",
           "test top-1"]


def compile_run(args: argparse.Namespace, label: str, **settings) -> Run:
    torch.set_num_threads(args.threads)
    model, checkpoint = load_checkpoint(args)
    settings = {"budget_minutes": args.budget_minutes, "distill": args.distill, "final_epochs": args.final_epochs,
                "screen_steps": args.screen_steps, "measure_from": args.measure_from,
                "recovery": args.recovery_model, "per_layer": args.per_layer, **settings}
    kept = Path(args.keep_reports) / re.sub(r"[^A-Za-z0-9.]+", "-", f"{args.arch}-{label}") if args.keep_reports \
        else None
    with contextlib.nullcontext(kept) if kept else tempfile.TemporaryDirectory() as tmp:
        config = CompileConfig(Target(max_drop=args.max_drop), kept or Path(tmp) / "out",
                               finetune_epochs=args.finetune_epochs, val_from="test", val_limit=args.val_limit,
                               screen_limit=args.screen_limit, train_limit=args.train_limit,
                               train=TrainConfig(), data=DataSpec(root=args.data_root), quiet=True, **settings)
        result = compile_model(model, config, log=lambda s: None)
    result.report["checkpoint"] = checkpoint
    print(f"  {label}: {result.report['chosen']['pipeline'] or '(baseline)'}, "
          f"{result.report['search']['seconds']:.0f}s" + (f"; output in {kept}" if kept else ""), flush=True)
    return Run(label, result.report)
