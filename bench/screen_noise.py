"""How well a per-layer screen ranks layers: top-1 on the screening subset against
lower-variance measures on the same images, judged by held-out images.

The per-layer step (``pyprune/search/layerwise.py``) pushes each layer of a chosen
model one position further, recalibrates BatchNorm and measures the screening
subset (the first ``--screen-limit`` images of val): the paired top-1 drop is the
layer's *cost*, and layers are allocated by bytes per point of it. A single layer's
drop is a few flipped images out of a thousand, about the size of the subset's own
noise. This benchmark pushes every screened layer of ``--base`` one step further on
``--stage`` and measures, on the screening subset A:

* ``top-1``: the paired drop in top-1 (what the step uses today);
* ``CE``: the paired rise in mean cross-entropy;
* ``KL``: the mean KL divergence of the pushed model's predictions from the base's;

and on the rest of val (B, images no A measure saw) the paired top-1 drop. A measure
on A that ranks layers well should agree with B's ranking: the table gives the
Spearman correlation of each with B's drop (both are noisy, so the figures are
attenuated alike; higher is better), per stage.

    python bench/screen_noise.py --arch resnet56 --base "slim(ratio=0.1),mask(sparsity=0.6),quant(bits=4)"
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from _measure import table
from _recovery import add_recovery_args, recovery_setup

from pyprune.passes import build_pipeline, parse_pipeline
from pyprune.search.evaluator import kl_divergence
from pyprune.search.layerwise import floor_layers, screened_layers
from pyprune.train import evaluate, recalibrate_bn

NEXT = {"mask": ("sparsity", {0.5: 0.6, 0.6: 0.7, 0.7: 0.75, 0.75: 0.8, 0.8: 0.85}),
        "quant": ("bits", {6: 5, 5: 4, 4: 3, 3: 2})}


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(v: list[float]) -> torch.Tensor:
        return torch.tensor(v, dtype=torch.float64).argsort().argsort().double()
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recovery_args(p)
    p.add_argument("--base", default="slim(ratio=0.1),mask(sparsity=0.6),quant(bits=4)")
    p.add_argument("--stages", nargs="+", default=["quant", "mask"])
    p.add_argument("--screen-limit", type=int, default=1000)
    p.set_defaults(val_limit=2500)
    args = p.parse_args()

    setup = recovery_setup(args)
    model, train = setup.model, setup.train
    a = setup.val.subset(slice(0, args.screen_limit))
    b = setup.val.subset(slice(args.screen_limit, len(setup.val)))
    specs = parse_pipeline(args.base)

    def built(overrides: dict[str, dict[str, float]]) -> torch.nn.Module:
        text = ",".join(
            f"{s.name}({','.join(f'{k}={v!r}' for k, v in s.options.items())}"
            + (f",layers={overrides[s.name]!r}" if s.name in overrides else "") + ")" for s in specs)
        g = copy.deepcopy(setup.gm)
        for pass_ in build_pipeline(text):
            pass_(g)
        recalibrate_bn(g, train, model.mean, model.std, 1024, channels_last=True)
        return g

    def measured(g: torch.nn.Module, data) -> tuple[float, float, torch.Tensor]:
        """(top-1, mean cross-entropy, log-probs) on ``data``."""
        r = evaluate(g, data, model.mean, model.std, progress=False, log_probs=True)
        return r.accuracy, r.loss, r.log_probs

    base = built({})
    base_a, base_b = measured(base, a), measured(base, b)
    print(f"{args.arch} ({setup.checkpoint}), base {args.base}: top-1 A {base_a[0]:.4f} "
          f"({len(a)} images), B {base_b[0]:.4f} ({len(b)})", flush=True)
    layers = screened_layers(base, floor_layers(base))
    rows = []
    for stage in args.stages:
        option, ladder = NEXT[stage]
        level = next(s.options[option] for s in specs if s.name == stage)
        nxt = ladder[level]
        measures: dict[str, list[float]] = {"top-1": [], "CE": [], "KL": [], "B": []}
        start = time.perf_counter()
        for name in layers:
            g = built({stage: {name: nxt}})
            on_a, on_b = measured(g, a), measured(g, b)
            measures["top-1"].append(base_a[0] - on_a[0])
            measures["CE"].append(on_a[1] - base_a[1])
            measures["KL"].append(kl_divergence(base_a[2], on_a[2]))
            measures["B"].append(base_b[0] - on_b[0])
            print(f"  {stage} {name} -> {nxt}: " + ", ".join(f"{k} {v[-1]:+.4f}" for k, v in measures.items()),
                  flush=True)
        rows.append([f"{stage} {level} -> {nxt}", str(len(layers)),
                     *(f"{spearman(measures[k], measures['B']):.2f}" for k in ("top-1", "CE", "KL")),
                     f"{time.perf_counter() - start:.0f}"])
    print()
    print(table(["push (one layer)", "layers", "Spearman with B: top-1 on A", "CE on A", "KL on A", "seconds"],
                rows))


if __name__ == "__main__":
    main()
