"""Which weights a compile benchmark starts from.

Issue 16's rule: measure compression from checkpoints already adapted to the JPEG
copy of CIFAR-10, because any fine-tuning of the published ones gains 4-6 points
on it, which a compile would otherwise count as room to compress. An adapted
checkpoint is looked up in ``$PYPRUNE_MODELS`` as ``<arch>-jpeg-*.th``; where
there is none, it is made by the recipe of ``../shared/models/README.md``
(``pyprune train --split train --epochs 3 --lr 0.01 --seed 0``, the 45,000-image
train split only) and cached outside the repository, in ``$PYPRUNE_CACHE/adapted``
(default ``~/.cache/pyprune/adapted``).

    python bench/_checkpoints.py --arch resnet56     # what `make baselines` runs
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from pyprune.api import load_model
from pyprune.models import LoadedModel

RECIPE = ["--split", "train", "--epochs", "3", "--lr", "0.01", "--seed", "0"]


def add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", choices=("adapted", "original"), default="adapted",
                   help="adapted: fine-tuned on the JPEG copy's train split (found in $PYPRUNE_MODELS, else made "
                        "and cached); original: the published checkpoint")
    p.add_argument("--weights", help="a state-dict file for --arch, in place of --checkpoint")


def cache_dir() -> Path:
    root = os.environ.get("PYPRUNE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "pyprune") / "adapted"


def shipped_adapted(arch: str) -> Path | None:
    for folder in os.environ.get("PYPRUNE_MODELS", "").split(os.pathsep):
        if folder:
            found = sorted(Path(folder).glob(f"{arch}-jpeg-*.th"))
            if found:
                return found[0]
    return None


def adapted_path(arch: str, data_root: str | None = None) -> Path:
    """The adapted checkpoint of ``arch``: shipped, cached, or made now (minutes)."""
    shipped = shipped_adapted(arch)
    if shipped is not None:
        return shipped
    cached = cache_dir() / f"{arch}-jpeg-e3-lr0.01-s0.pt"
    if not cached.exists():
        cached.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pyprune", "train", "--arch", arch, "--pretrained", *RECIPE,
                   "--eval-split", "val", "-o", str(cached)]
        if data_root:
            command += ["--data-root", data_root]
        print(f"adapting {arch} to the JPEG copy (no adapted checkpoint in $PYPRUNE_MODELS): "
              f"{' '.join(command[1:])}", flush=True)
        subprocess.run(command, check=True)
    return cached


def load_checkpoint(args: argparse.Namespace) -> tuple[LoadedModel, str]:
    """(the model, which checkpoint it is) for a benchmark's ``--arch``, ``--checkpoint``
    and ``--weights``."""
    if args.weights:
        return load_model(arch=args.arch, weights=args.weights), Path(args.weights).name
    if args.checkpoint == "original":
        return load_model(arch=args.arch, pretrained=True), f"{args.arch} published checkpoint"
    path = adapted_path(args.arch, getattr(args, "data_root", None))
    # shipped (.th) and made here (`pyprune train -o`, .pt): both are state dicts of --arch
    return load_model(arch=args.arch, weights=str(path)), path.name


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", action="append", required=True, help="zoo model (repeat for several)")
    p.add_argument("--data-root", help="default: $PYPRUNE_DATA, else ./data")
    args = p.parse_args()
    for arch in args.arch:
        print(f"{arch}: {adapted_path(arch, args.data_root)}")


if __name__ == "__main__":
    main()
