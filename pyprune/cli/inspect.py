"""``pyprune inspect``: how a ``.ppz`` file stores each tensor."""

from __future__ import annotations

import argparse
import json

from .. import api
from .args import Formatter, add_max_decoded
from .present import inspect_table


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", formatter_class=Formatter,
                       help="how a .ppz file stores each tensor: encoding, density, bits, stream bytes",
                       description="Decode and validate a .ppz container and print, per tensor: shape, encoding, "
                                   "density, bits per code and per gap, bytes of each stream, fp32 bytes and "
                                   "the ratio; then totals, the compression against the original model (when the "
                                   "file records it) and against its own tensors as float32, where the bytes are "
                                   "(manifest and table, code and index streams, codebooks, vectors, raw tensors, "
                                   "container overhead), and each Huffman stream's size against its Shannon "
                                   "entropy.")
    p.add_argument("file", metavar="FILE.ppz")
    p.add_argument("--all", action="store_true",
                   help="also list the 1-D tensors (BatchNorm vectors, biases, scales, counters)")
    p.add_argument("--json", action="store_true", help="print the full inspection as one JSON object")
    add_max_decoded(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report = api.inspect_file(args.file, args.max_decoded_mb)
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "manifest"}))
    else:
        print(inspect_table(report, args.all))
    return 0
