"""At one target, the compression of each technique alone against the combined
heuristic, in one run: the paper's central claim is that combined beats either.

* slimming only: the heuristic with the single stage ``slim``;
* deep compression only: ``mask`` then ``quant`` (then Huffman, as always);
* combined: ``slim``, ``mask``, ``quant``.

All three search the default levels with the same fine-tuning budget, val
(one fixed half of the CIFAR-10 test set) and target; each writes a real .ppz,
whose bytes give the ratio (fp32 bytes / file bytes).

    python bench/single_vs_combined.py               # the README's table (about 10 min on 2 cores)
"""

from __future__ import annotations

import argparse

from _compile_runs import HEADERS, add_common_args, compile_run
from _measure import table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, finetune_epochs=0.1)
    args = p.parse_args()
    print(f"{args.arch} ({args.weights or args.checkpoint} checkpoint), target: val top-1 >= baseline - "
          f"{args.max_drop}; fine-tuning {args.finetune_epochs} epoch per deciding candidate (distill "
          f"{args.distill}); val {args.val_limit} images (screen {args.screen_limit}); budget "
          f"{args.budget_minutes or 'none'} min per run", flush=True)
    runs = [compile_run(args, "slimming only", order=("slim",)),
            compile_run(args, "deep compression only", order=("mask", "quant")),
            compile_run(args, "combined", order=("slim", "mask", "quant"))]
    print()
    print(table(HEADERS, [r.row() for r in runs]))
    best_single = max(runs[:2], key=lambda r: r.report["chosen"]["compression"])
    combined = runs[2].report["chosen"]["compression"]
    print()
    print(f"combined / best single ({best_single.label}) = "
          f"{combined / best_single.report['chosen']['compression']:.2f}x")


if __name__ == "__main__":
    main()
