"""The paper's table, measured: each method alone against the combination, on the
adapted checkpoints (bench/_checkpoints.py), with the same target and the same
wall-clock budget per method.

Rows per architecture: network slimming only (``--order slim``), deep compression
only (``--order mask,quant``), combined (``slim,mask,quant``, the marginal search)
and, with ``--grid``, the brute-force grid over the same three stages' default
ladders thinned to ``--grid-levels`` each (it fine-tunes every combination, so its
own budget cuts it short). Target: ``--max-drop`` below the model's own val
accuracy, val and test being the two fixed halves of the CIFAR-10 test set
(``--val-from test``). Bytes are whole ``.ppz`` files; ratio = fp32 bytes / file bytes.

    python bench/paper_table.py                               # ResNet-20 and ResNet-56, 20 min per method
    python bench/paper_table.py --arch resnet20 --budget-minutes 8
"""

from __future__ import annotations

import argparse

from _compile_runs import add_common_args, compile_run
from _measure import table

from pyprune.passes import pass_class

HEADERS = ["model", "method", "checkpoint", "bytes", "ratio", "val top-1", "test top-1", "candidates",
           "fine-tuned", "seconds", "chosen pipeline"]


def thinned(name: str, n: int) -> tuple:
    ladder = pass_class(name).knob.ladder
    step = max(1, len(ladder) // n)
    return tuple(ladder[step - 1::step][:n])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, finetune_epochs=0.1)
    p.set_defaults(arch=None, budget_minutes=20.0)
    p.add_argument("--archs", default="resnet20,resnet56", help="comma-separated zoo models")
    p.add_argument("--grid", action="store_true", help="add the grid baseline row")
    p.add_argument("--grid-levels", type=int, default=3, help="settings per stage in the grid")
    args = p.parse_args()
    rows, ratios = [], []
    for arch in args.archs.split(","):
        args.arch = arch
        print(f"{arch}: target val >= own val - {args.max_drop}, {args.budget_minutes} min per method, "
              f"fine-tuning {args.finetune_epochs} epoch per candidate, distill {args.distill}, recovery model {args.recovery_model}, seed 0", flush=True)
        methods = [("slimming only", {"order": ("slim",)}), ("deep compression only", {"order": ("mask", "quant")}),
                   ("combined", {"order": ("slim", "mask", "quant")})]
        if args.grid:
            levels = {s: thinned(s, args.grid_levels) for s in ("slim", "mask", "quant")}
            methods.append(("grid", {"search": "grid", "levels": levels}))
        runs = {label: compile_run(args, label, **settings) for label, settings in methods}
        for label, run in runs.items():
            r, c, s = run.report, run.report["chosen"], run.report["search"]
            rows.append([arch, label, r["checkpoint"], f"{c['file_bytes']:,}", f"{c['compression']:.2f}x",
                         f"{c['val_accuracy']:.4f}", f"{c['test_accuracy']:.4f}", str(s["candidates"]),
                         str(s["finetuned"]), f"{s['seconds']:.0f}", c["pipeline"] or "(baseline)"])
        single = max(runs["slimming only"].report["chosen"]["compression"],
                     runs["deep compression only"].report["chosen"]["compression"])
        ratios.append(f"{arch}: combined / best single = {runs['combined'].report['chosen']['compression'] / single:.2f}x")
    print()
    print(table(HEADERS, rows))
    print()
    print("\n".join(ratios))


if __name__ == "__main__":
    main()
