"""How fine-tuning keeps masks and shared weights, compared at the same length in one run.

From the same model (the adapted checkpoint by default), each setting
``mask(sparsity=S),quant(bits=B)`` is applied at once, BatchNorm recalibrated, then
fine-tuned for E epochs with the passes' own training constraints, in three ways:

* ``tied``: the zero set kept and each cluster tied to one trained value
  (``mask(regrow=False)``, ``quant(grad=mean)``: deep compression's centroid fine-tuning,
  pyprune's default before straight-through training);
* ``ste``: the zero set kept, the weights trained straight through
  (``mask(regrow=False)``, ``quant(grad=ste)``): latent full-precision weights, each
  assigned to the nearest shared value after every step;
* ``ste+regrow``: both straight through (``mask(regrow=True)``, ``quant(grad=ste)``, the
  defaults): the mask's rule runs on the latent weights after every step, so pruned
  weights can return.

All distil from the uncompressed model as ``compile`` does (weight 0.5, T = 4), with
the same seed, so each row sees the same batches. The table gives val top-1 on the
images ``compile --val-from test`` searches on (the first 2,000 of the test set's
search half), after recalibration and after the fine-tune, and the seconds of each
fine-tune.

    python bench/straight_through.py [--settings 0.7:3 0.8:3 0.7:2] [--epochs 0.5]
"""

from __future__ import annotations

import argparse
import copy
import time

from _measure import table
from _recovery import add_recovery_args, recovery_setup

from pyprune.passes import build_pipeline, constraint_hooks
from pyprune.train import TrainConfig, fine_tune, recalibrate_bn

WAYS = {"tied": ("regrow=False", "grad=mean"), "ste": ("regrow=False", "grad=ste"),
        "ste+regrow": ("regrow=True", "grad=ste")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recovery_args(p)
    p.add_argument("--settings", nargs="+", default=["0.7:3", "0.8:3", "0.7:2"],
                   help="SPARSITY:BITS pairs (default: 0.7:3 0.8:3 0.7:2)")
    p.add_argument("--epochs", type=float, nargs="+", default=[0.5])
    p.add_argument("--ways", nargs="+", choices=tuple(WAYS), default=list(WAYS))
    args = p.parse_args()

    setup = recovery_setup(args)
    model, train, val, gm, teacher, accuracy = setup.model, setup.train, setup.val, setup.gm, setup.teacher, \
        setup.accuracy
    print(f"{args.arch} ({setup.checkpoint}): val top-1 {accuracy(gm):.4f} on {len(val)} images; "
          f"distill {args.distill}; seed {args.seed}", flush=True)
    rows = []
    for epochs in args.epochs:
        config = TrainConfig(epochs=epochs, distill=args.distill, seed=args.seed, progress=False)
        for setting in args.settings:
            sparsity, bits = setting.split(":")
            for way in args.ways:
                mask_option, quant_option = WAYS[way]
                pipeline = f"mask(sparsity={sparsity},{mask_option}),quant(bits={bits},{quant_option})"
                g = copy.deepcopy(gm)
                passes = build_pipeline(pipeline)
                for pass_ in passes:
                    pass_(g)
                recalibrate_bn(g, train, model.mean, model.std, 1024)
                recalibrated = accuracy(g)
                start = time.perf_counter()
                fine_tune(g, train, model.mean, model.std, config, hooks=constraint_hooks(passes, g), teacher=teacher)
                seconds = time.perf_counter() - start
                tuned = accuracy(g)
                print(f"  {pipeline} {epochs:g} ep: recalibrated {recalibrated:.4f}, fine-tuned {tuned:.4f}, "
                      f"{seconds:.0f}s", flush=True)
                rows.append([sparsity, bits, f"{epochs:g}", way, f"{recalibrated:.4f}", f"{tuned:.4f}",
                             f"{seconds:.0f}"])
    print()
    print(table(["sparsity", "bits", "epochs", "fine-tuning", "recalibrated val", "fine-tuned val", "seconds"], rows))


if __name__ == "__main__":
    main()
