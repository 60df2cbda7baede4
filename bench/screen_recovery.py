"""How well a screen predicts a deciding fine-tune, by the number of recovery steps.

From the same model (the adapted checkpoint by default), each pipeline is applied at
once and BatchNorm recalibrated, as a compile's screen does; then it is fine-tuned
(straight through, distilled from the uncompressed model, as ``compile`` does) for
each of ``--steps`` optimizer steps, each a fresh run from the recalibrated model,
and measured on the screening subset (the first ``--screen-limit`` images of the
search's val split); and fine-tuned ``--epochs`` (a deciding measurement's length),
measured on all of val. Step 0 is today's screen (recalibration only).

The table gives, per pipeline, each screen's paired estimate of val accuracy (the
uncompressed model's val accuracy plus child-minus-parent on the subset, as the
search estimates) and the deciding measurement. A screen is useful when its
estimates rank the pipelines as the deciding measurements do, and sit close to
them; the last rows give the largest gap and the seconds each screen cost.

    python bench/screen_recovery.py [--pipelines "mask(sparsity=0.7)" ...] [--steps 0 8 16 32 64]
"""

from __future__ import annotations

import argparse
import copy
import time

from _measure import table
from _recovery import add_recovery_args, recovery_setup

from pyprune.passes import build_pipeline, constraint_hooks
from pyprune.train import TrainConfig, fine_tune, recalibrate_bn

PIPELINES = ["mask(sparsity=0.7)", "mask(sparsity=0.85)", "quant(bits=3)", "mask(sparsity=0.7),quant(bits=3)",
             "slim(ratio=0.2)"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recovery_args(p)
    p.add_argument("--pipelines", nargs="+", default=PIPELINES)
    p.add_argument("--steps", type=int, nargs="+", default=[0, 8, 16, 32, 64])
    p.add_argument("--epochs", type=float, default=0.5, help="the deciding fine-tune's length")
    p.add_argument("--screen-limit", type=int, default=1000)
    args = p.parse_args()

    setup = recovery_setup(args)
    model, train, val, gm, teacher, accuracy = setup.model, setup.train, setup.val, setup.gm, setup.teacher, \
        setup.accuracy
    screen = val.subset(slice(0, args.screen_limit))

    base_val = accuracy(gm, val)
    offset = base_val - accuracy(gm, screen)  # the search's paired estimate: parent's val + child - parent
    print(f"{args.arch} ({setup.checkpoint}): val top-1 {base_val:.4f} on {len(val)} images, screens on the first "
          f"{len(screen)}; distill {args.distill}; seed {args.seed}", flush=True)

    def recalibrated(pipeline: str):
        g = copy.deepcopy(gm)
        passes = build_pipeline(pipeline)
        for pass_ in passes:
            pass_(g)
        recalibrate_bn(g, train, model.mean, model.std, 1024)
        return g, passes

    def tuned(g, passes, **limits) -> float:
        start = time.perf_counter()
        config = TrainConfig(distill=args.distill, seed=args.seed, progress=False, **limits)
        fine_tune(g, train, model.mean, model.std, config, hooks=constraint_hooks(passes, g), teacher=teacher)
        return time.perf_counter() - start

    rows, gaps, seconds = [], {n: [] for n in args.steps}, {n: [] for n in args.steps}
    for pipeline in args.pipelines:
        estimates = {}
        for n in args.steps:
            start = time.perf_counter()
            g, passes = recalibrated(pipeline)
            if n:
                tuned(g, passes, epochs=1.0, max_steps=n)
            estimates[n] = accuracy(g, screen) + offset
            seconds[n].append(time.perf_counter() - start)
        g, passes = recalibrated(pipeline)
        took = tuned(g, passes, epochs=args.epochs)
        decided = accuracy(g, val)
        for n in args.steps:
            gaps[n].append(decided - estimates[n])
        print(f"  {pipeline}: " + ", ".join(f"{n} steps {estimates[n]:.4f}" for n in args.steps)
              + f"; {args.epochs:g} epoch {decided:.4f} ({took:.0f}s)", flush=True)
        rows.append([pipeline, *(f"{estimates[n]:.4f}" for n in args.steps), f"{decided:.4f}"])
    rows.append(["largest gap (points)", *(f"{100 * max(gaps[n]):+.1f}" for n in args.steps), ""])
    rows.append(["median seconds per screen", *(f"{sorted(seconds[n])[len(seconds[n]) // 2]:.1f}"
                                                  for n in args.steps), ""])
    print()
    print(table(["pipeline", *(f"screen, {n} steps" for n in args.steps), f"fine-tuned {args.epochs:g} epoch"],
                rows))


if __name__ == "__main__":
    main()
