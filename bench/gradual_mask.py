"""One-shot magnitude pruning against gradual pruning at the same fine-tuning
length, in one run: which recovers more accuracy per epoch.

From the same model (the adapted checkpoint by default), for each sparsity and
fine-tuning length:

* one-shot: ``mask(sparsity=S)`` applied at once, BatchNorm recalibrated, then
  fine-tuned for E epochs with the zeros kept (what a candidate's fine-tune does
  without ``--gradual-mask``);
* gradual: fine-tuned for the same E epochs while :class:`pyprune.passes.mask.GradualMask`
  prunes on Zhu & Gupta's cubic schedule over the first 3/4 of the steps (``--ramp``), ending
  with the same pass's exact zeros.

Both distil from the unpruned model as ``compile`` does (weight 0.5, T = 4), with
the same seed, so each pair sees the same batches. The table gives val top-1 on
the same images as ``compile --val-from test`` (the first 2,000 of the test set's
search half) and the seconds of each fine-tune.

    python bench/gradual_mask.py [--sparsity 0.6 0.7 0.8] [--epochs 0.25 0.5]
"""

from __future__ import annotations

import argparse
import copy
import time

from _checkpoints import add_checkpoint_args, load_checkpoint
from _measure import table

from pyprune.data import DataSpec
from pyprune.ir import example_input, propagate_shapes, trace
from pyprune.passes import constraint_hooks
from pyprune.passes.mask import GradualMask, MaskPass
from pyprune.train import TrainConfig, evaluate, fine_tune, recalibrate_bn


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet20")
    add_checkpoint_args(p)
    p.add_argument("--data-root", help="default: $PYPRUNE_DATA, else ./data")
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.6, 0.7, 0.8])
    p.add_argument("--epochs", type=float, nargs="+", default=[0.25, 0.5])
    p.add_argument("--val-limit", type=int, default=2000)
    p.add_argument("--distill", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ramp", type=float, default=0.75, help="share of the fine-tune that prunes (default 0.75)")
    args = p.parse_args()

    model, checkpoint = load_checkpoint(args)
    data = DataSpec(root=args.data_root)
    train = data.load("train", None, input_shape=model.input_shape)
    val = data.load("test-search", args.val_limit, input_shape=model.input_shape)
    gm = propagate_shapes(trace(model.module), example_input(model.input_shape))
    teacher = copy.deepcopy(gm).eval()

    def accuracy(g) -> float:
        return evaluate(g, val, model.mean, model.std, progress=False).accuracy

    print(f"{args.arch} ({checkpoint}): val top-1 {accuracy(gm):.4f} on {len(val)} images; "
          f"distill {args.distill}; seed {args.seed}; gradual ramp {args.ramp}", flush=True)
    rows = []
    for epochs in args.epochs:
        config = TrainConfig(epochs=epochs, distill=args.distill, seed=args.seed, progress=False)
        for sparsity in args.sparsity:
            results = {}
            for how in ("one-shot", "gradual"):
                g = copy.deepcopy(gm)
                mask = MaskPass(sparsity)
                start = time.perf_counter()
                if how == "one-shot":
                    mask.call(g)
                    recalibrate_bn(g, train, model.mean, model.std, 1024)
                    hooks = constraint_hooks([mask], g)
                else:
                    gradual = GradualMask(mask, g, ramp=args.ramp)
                    hooks = gradual.hooks()
                fine_tune(g, train, model.mean, model.std, config, hooks=hooks, teacher=teacher)
                if how == "gradual":
                    gradual.finish(g)
                seconds = time.perf_counter() - start
                results[how] = (accuracy(g), seconds, mask.call(g).record["achieved"])
                print(f"  {how:8} mask({sparsity}) {epochs} ep: val {results[how][0]:.4f}, "
                      f"sparsity {results[how][2]:.4f}, {seconds:.0f}s", flush=True)
            (a, sa, _), (b, sb, _) = results["one-shot"], results["gradual"]
            rows.append([f"{sparsity:g}", f"{epochs:g}", f"{a:.4f}", f"{b:.4f}", f"{100 * (b - a):+.2f}",
                         f"{sa:.0f}", f"{sb:.0f}"])
    print()
    print(table(["sparsity", "epochs", "one-shot val", "gradual val", "gradual - one-shot (points)",
                 "one-shot s", "gradual s"], rows))


if __name__ == "__main__":
    main()
