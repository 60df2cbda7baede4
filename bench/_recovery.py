"""Shared by the fine-tuning benchmarks (``straight_through.py``, ``screen_recovery.py``):
the checkpoint, the data a compile with ``--val-from test`` searches on, the traced
model and the teacher a compile distils from."""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass

from torch import fx

from _checkpoints import add_checkpoint_args, load_checkpoint
from pyprune.data import ArrayDataset, DataSpec
from pyprune.ir import example_input, propagate_shapes, trace
from pyprune.models import LoadedModel
from pyprune.train import evaluate


@dataclass
class RecoverySetup:
    model: LoadedModel
    checkpoint: str  # which weights, for the table's caption
    train: ArrayDataset
    val: ArrayDataset  # the first ``--val-limit`` images of test-search
    gm: fx.GraphModule  # the model as the passes see it
    teacher: fx.GraphModule  # an untouched copy, in eval mode

    def accuracy(self, g: fx.GraphModule, dataset: ArrayDataset | None = None) -> float:
        """Top-1 of ``g`` on ``dataset`` (default: all of val)."""
        data = self.val if dataset is None else dataset
        return evaluate(g, data, self.model.mean, self.model.std, progress=False).accuracy


def add_recovery_args(p: argparse.ArgumentParser) -> None:
    """The options :func:`recovery_setup` reads, and the distillation and seed every
    fine-tune of these benchmarks uses (as ``compile`` does by default)."""
    p.add_argument("--arch", default="resnet20")
    add_checkpoint_args(p)
    p.add_argument("--data-root", help="default: $PYPRUNE_DATA, else ./data")
    p.add_argument("--val-limit", type=int, default=2000)
    p.add_argument("--distill", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)


def recovery_setup(args: argparse.Namespace) -> RecoverySetup:
    """From the benchmark's ``--arch``/``--checkpoint``/``--weights``, ``--data-root``
    and ``--val-limit``."""
    model, checkpoint = load_checkpoint(args)
    data = DataSpec(root=args.data_root)
    train = data.load("train", None, input_shape=model.input_shape)
    val = data.load("test-search", args.val_limit, input_shape=model.input_shape)
    gm = propagate_shapes(trace(model.module), example_input(model.input_shape))
    return RecoverySetup(model, checkpoint, train, val, gm, copy.deepcopy(gm).eval())
