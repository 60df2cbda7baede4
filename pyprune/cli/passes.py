"""``pyprune passes``: every registered pass, its options, defaults and search
ladder, from the one table pipelines and the compile search read
(LLVM's ``--print-passes``)."""

from __future__ import annotations

import argparse
import json

from .. import api
from .args import Formatter
from .present import passes_table


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("passes", formatter_class=Formatter,
                       help="list the compression passes: options, defaults, search ladders",
                       description="List every registered pass: what it does, whether it changes the model's "
                                   "outputs and what fine-tuning keeps of it, its options (type, allowed values, "
                                   "default) and, for passes that can be a compile stage, the option the search "
                                   "turns and its default ladder from least to most aggressive. These are the "
                                   "names `opt --passes` and `compile --order` / `--levels` take.")
    p.add_argument("--json", action="store_true", help="print one JSON object {\"passes\": [...]}")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    passes = api.list_passes()
    print(json.dumps({"passes": passes}) if args.json else passes_table(passes))
    return 0
