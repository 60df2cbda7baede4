"""``pyprune info`` and ``pyprune models``: what a model is made of, and the zoo."""

from __future__ import annotations

import argparse
import json

from .. import api
from .args import MODEL_EPILOG, Formatter, add_model_args, load
from .present import info_table


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", formatter_class=Formatter, epilog=MODEL_EPILOG,
                       help="per-layer table of output shapes, parameters, bytes and MACs",
                       description="Trace the model with torch.fx, propagate shapes, and print per-layer "
                                   "output shape, parameters, bytes (parameters and buffers) and MACs per sample.")
    add_model_args(p, traces=True)
    p.add_argument("--all-nodes", action="store_true",
                   help="list every graph node, not only those with parameters or MACs")
    p.add_argument("--json", action="store_true",
                   help='print one JSON object {"layers": [...], "total": {"params", "bytes", "macs"}}')
    p.set_defaults(func=run_info)


def add_models_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the zoo architectures",
                       description="List the zoo architectures. torchvision's classifiers are named "
                       "torchvision:NAME (e.g. torchvision:resnet18) and are not listed here.")
    p.set_defaults(func=run_models)


def run_info(args: argparse.Namespace) -> int:
    info = api.model_info(load(args))
    print(json.dumps(info.to_dict()) if args.json else info_table(info, args.all_nodes))
    return 0


def run_models(args: argparse.Namespace) -> int:
    for name, description in api.list_models():
        print(f"{name:14s} {description}")
    return 0
