"""The long fuzz run (``make fuzz``): ``python -m tests.fuzz --count 20000``.

Writes the seed files, runs ``--count`` mutants of each file kind through the CLI in
worker processes, prints one row of counts per kind and every finding, and exits 1 if
there was any finding or a worker's peak memory passed ``--max-rss-mb``."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from . import harness
from .seeds import kind_of, make_seeds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", choices=["ppz", "graph", "all"], default="all", help="file kind (default: all)")
    ap.add_argument("--count", type=int, default=20000, help="mutants per kind (default: 20000)")
    ap.add_argument("--start", type=int, default=0, help="first mutant number, to resume or replay (default: 0)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes (default: CPUs)")
    ap.add_argument("--deadline", type=float, default=30.0,
                    help="CPU seconds a worker may spend on one mutant before it counts as a hang (or 4x that "
                         "on the clock without computing)")
    ap.add_argument("--seed", type=int, default=0, help="run seed: the same seed makes the same mutants")
    ap.add_argument("--max-rss-mb", type=float, default=2048, help="peak memory a worker may reach (default: 2048)")
    ap.add_argument("--out", type=Path, default=None, help="folder for seeds and findings (default: a temporary one)")
    ap.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = ap.parse_args(argv)
    if "PYPRUNE_DATA" not in os.environ:
        ap.error("set PYPRUNE_DATA to the folder holding cifar10/ (eval runs on eight of its test images)")
    out = args.out or Path(tempfile.mkdtemp(prefix="pyprune-fuzz-"))
    seeds = make_seeds(out / "seeds")
    kinds = ["ppz", "graph"] if args.kind == "all" else [args.kind]
    summaries = []
    for kind in kinds:
        mine = {name: path.read_bytes() for name, path in seeds.items() if kind_of(name) == kind}
        summaries.append(harness.run(kind, mine, range(args.start, args.start + args.count), out, args.workers,
                                     args.deadline, args.seed, progress=not args.no_progress))
    print(harness.table(summaries))
    print()
    bad = False
    for s in summaries:
        for what, line, numbers in harness.grouped(s):
            shown = ", ".join(map(str, numbers[:8])) + (" ..." if len(numbers) > 8 else "")
            print(f"{s.kind} {what} x{len(numbers)} (mutants {shown}): {line}")
        if s.peak_rss > args.max_rss_mb * 2**20:
            print(f"\n{s.kind}: peak memory {s.peak_rss / 2**20:.0f} MB (mutant {s.peak_number}) "
                  f"over {args.max_rss_mb:.0f} MB")
            bad = True
        bad = bad or bool(s.findings)
    print(f"\nfindings and seeds in {out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
