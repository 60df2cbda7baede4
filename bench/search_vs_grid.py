"""The compile's search (the marginal one, the default) against the brute-force
grid, in one run, on the same model, target, levels and per-candidate fine-tuning.

The grid measures every combination of (slim ratio or off) x (mask sparsity or
off) x (codebook bits or off), each with BatchNorm recalibration, fine-tuning
for --finetune-epochs and accuracy on val; the marginal search explores the
same levels (docs: pyprune/search/marginal.py). Printed: candidates
measured and fine-tuned, wall time, chosen pipeline, file size and compression
(fp32 bytes / file bytes), val and test accuracy (val and test are the two fixed
halves of the CIFAR-10 test set, --val-from test), then the ratios.

    python bench/search_vs_grid.py                   # the README's table (about 15 min on 2 cores)
    python bench/search_vs_grid.py --slim 0.2 --mask 0.5,0.8 --bits 6,3 --finetune-epochs 0.02
"""

from __future__ import annotations

import argparse

from _compile_runs import HEADERS, add_common_args, compile_run
from _measure import table


def floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, finetune_epochs=0.05)
    p.add_argument("--slim", type=floats, default=(0.1, 0.2, 0.3, 0.4), help="slim ratios of the grid")
    p.add_argument("--mask", type=floats, default=(0.5, 0.6, 0.7, 0.8, 0.9), help="mask sparsities of the grid")
    p.add_argument("--bits", type=lambda t: tuple(int(v) for v in t.split(",")), default=(8, 6, 4, 3),
                   help="codebook bits of the grid")
    args = p.parse_args()
    levels = {"slim": args.slim, "mask": args.mask, "quant": args.bits}
    size = (len(args.slim) + 1) * (len(args.mask) + 1) * (len(args.bits) + 1) - 1
    print(f"{args.arch}, target: val top-1 >= baseline - {args.max_drop}; grid: slim {args.slim} x mask "
          f"{args.mask} x bits {args.bits} (each also off) = {size} pipelines; fine-tuning "
          f"{args.finetune_epochs} epoch per candidate; val {args.val_limit} images (screen {args.screen_limit})",
          flush=True)
    heuristic = compile_run(args, "marginal", levels=levels)  # the default search (--search marginal)
    grid = compile_run(args, "grid", levels=levels, search="grid")
    print()
    print(table(HEADERS, [heuristic.row(), grid.row()]))
    h, g = heuristic.report, grid.report
    print()
    print(f"search time: grid / heuristic = {g['search']['seconds'] / h['search']['seconds']:.1f}x; "
          f"fine-tunes: {g['search']['finetuned']} / {h['search']['finetuned']}; "
          f"heuristic compression = {h['chosen']['compression'] / g['chosen']['compression']:.1%} of the grid's")


if __name__ == "__main__":
    main()
