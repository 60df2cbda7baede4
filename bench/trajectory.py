"""How far one training trajectory carries a model: a sequence of legs, each a
pipeline reached from the previous leg's model and fine-tuned for some epochs,
with val top-1 and the file's size after every leg.

This is what the search's deciding measurements do one at a time (a stage pushed
further on the last accepted model, BatchNorm recalibrated, fine-tuned with every
constraint kept and distilled from the uncompressed model), laid out in one run so
that the recovery a setting gets from 1, 2, 3 ... epochs of training on one path
can be read off directly. A leg is ``PIPELINE@EPOCHS`` or ``PIPELINE@EPOCHS@LR``;
its passes replace those of the same name on the current model (order: slim, mask,
quant) and only the ones that changed run again; a leg whose pipeline is the
current one continues its training. The first leg trains at ``--lr``, the rest at
``--continue-lr`` unless they state their own, as ``compile --continue-lr`` does.

    python bench/trajectory.py --arch resnet56 \\
        --legs "slim(ratio=0.05),mask(sparsity=0.6),quant(bits=3)@1" \\
               "slim(ratio=0.05),mask(sparsity=0.75),quant(bits=2)@1" \\
               "slim(ratio=0.05),mask(sparsity=0.75),quant(bits=2)@1"

Each row: the leg, val top-1 after recalibration (before training; "-" for a
continuation) and after training, the seconds of the leg, the ``.ppz`` bytes and
ratio as the search sizes a candidate, and the ratio with BatchNorm folded into
float16 vectors as ``compile`` writes the file (with that model's val top-1).
``--save DIR`` keeps every leg's model as ``DIR/leg-N.pt`` (its pipeline inside),
``--start FILE`` resumes from one.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from _measure import table
from _recovery import add_recovery_args, recovery_setup

from pyprune.compile.final import fp32_bytes
from pyprune.encode.model_ppz import ppz_bytes
from pyprune.ir import PassManager, example_input
from pyprune.passes import codebook_layers, constraint_hooks, create_pass, parse_pipeline, read_codebooks
from pyprune.train import TrainConfig, fine_tune, recalibrate_bn

ORDER = ("slim", "mask", "quant")


def parse_leg(text: str, lr: float) -> tuple[list[str], float, float]:
    """``PIPELINE@EPOCHS[@LR]``: the leg's pass specs, epochs and learning rate (``lr``
    when it states none)."""
    parts = text.split("@")
    if len(parts) not in (2, 3):
        raise SystemExit(f"a leg is PIPELINE@EPOCHS or PIPELINE@EPOCHS@LR, got {text!r}")
    return [str(s) for s in parse_pipeline(parts[0])], float(parts[1]), float(parts[2]) if len(parts) == 3 else lr


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recovery_args(p)
    p.add_argument("--legs", nargs="+", required=True, help="PIPELINE@EPOCHS[@LR], in order")
    p.add_argument("--lr", type=float, default=0.01, help="the first leg's peak learning rate")
    p.add_argument("--continue-lr", type=float, default=0.003, help="later legs' peak learning rate")
    p.add_argument("--recal-images", type=int, default=1024)
    p.add_argument("--save", type=Path, help="keep each leg's model here")
    p.add_argument("--start", type=Path, help="a model saved by --save to start from")
    args = p.parse_args()

    setup = recovery_setup(args)
    meta = {"arch": args.arch}
    gm, steps = setup.gm, []
    fp32 = fp32_bytes(gm)
    if args.start:
        saved = torch.load(args.start, weights_only=False)
        gm, steps = saved["gm"], saved["steps"]
    print(f"{args.arch} ({setup.checkpoint}): baseline val {setup.accuracy(setup.teacher):.4f} on {len(setup.val)} "
          f"images; fp32 {fp32:,} bytes; distill {args.distill}; seed {args.seed}; start {steps or 'baseline'}",
          flush=True)
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
    rows = []
    for n, text in enumerate(args.legs, 1):
        specs, epochs, lr = parse_leg(text, args.continue_lr if steps else args.lr)
        by_name = {s.split("(")[0]: s for s in steps}
        new = [s for s in specs if by_name.get(s.split("(")[0]) != s]
        start = time.perf_counter()
        recal = "-"
        if new:
            passes = [create_pass(s.name, **s.options) for s in parse_pipeline(",".join(new))]
            gm = PassManager(passes, (example_input(setup.model.input_shape),)).run(copy.deepcopy(gm)).graph_module
            recalibrate_bn(gm, setup.train, setup.model.mean, setup.model.std, args.recal_images)
            recal = f"{setup.accuracy(gm):.4f}"
            by_name.update({s.split("(")[0]: s for s in specs})
            steps = [by_name[k] for k in ORDER if k in by_name]
        passes = [create_pass(s.name, **s.options) for s in parse_pipeline(",".join(steps))]
        config = TrainConfig(epochs=epochs, lr=lr, distill=args.distill, seed=args.seed + n, progress=False)
        fine_tune(gm, setup.train, setup.model.mean, setup.model.std, config,
                  hooks=constraint_hooks(passes, gm), teacher=setup.teacher)
        seconds = time.perf_counter() - start
        val = setup.accuracy(gm)
        books = read_codebooks(gm, codebook_layers(passes, gm))
        size = len(ppz_bytes(gm, meta, books))
        folded = create_pass("bnfold", float16=True, shared=list(books))(copy.deepcopy(gm)).graph_module.eval()
        folded_size = len(ppz_bytes(folded, meta, books))
        row = [str(n), ",".join(steps), f"{epochs:g}", f"{lr:g}", recal, f"{val:.4f}", f"{seconds:.0f}",
               f"{size:,}", f"{fp32 / size:.2f}x", f"{fp32 / folded_size:.2f}x", f"{setup.accuracy(folded):.4f}"]
        rows.append(row)
        print(" | ".join(row), flush=True)
        if args.save:
            torch.save({"gm": gm, "steps": steps}, args.save / f"leg-{n}.pt")
    print(table(["leg", "pipeline", "epochs", "lr", "val recal", "val", "s", "bytes", "ratio", "folded fp16",
                 "folded val"], rows))


if __name__ == "__main__":
    main()
