"""``pyprune train``: fine-tune or train a model and save its weights."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .. import api
from ..distributed import is_main
from .args import (MODEL_EPILOG, Formatter, add_data_args, add_model_args, add_run_args, add_sgd_args, add_sync_bn, data_spec,
                   load, refuse_existing_output)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", formatter_class=Formatter, epilog=MODEL_EPILOG,
                       help="fine-tune or train a model and save its weights",
                       description="Fine-tune with SGD, momentum, cosine schedule and weight decay; "
                                   "--slim-l1 adds network slimming's L1 penalty on BatchNorm gammas.")
    add_model_args(p)
    add_data_args(p, "train")
    add_run_args(p)
    add_sync_bn(p)
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=float, default=1.0, help="may be fractional")
    add_sgd_args(g, batch_size=None)
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=5e-4, help="L2 penalty on the weights")
    g.add_argument("--slim-l1", type=float, default=0.0, metavar="S",
                   help="L1 strength on BatchNorm gammas (network slimming uses 1e-4)")
    g.add_argument("--no-augment", action="store_true", help="train without crop and flip")
    g.add_argument("--eval-split", choices=["val", "test", "none"], default="val",
                   help="split to report accuracy on after training")
    g.add_argument("-o", "--output", required=True, metavar="FILE", help="where to save the weights (.pt)")
    g.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    g.add_argument("--json", action="store_true", help="end the output with one JSON line")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    refuse_existing_output(args)
    api.set_threads(args.threads)
    model = load(args)
    config = api.TrainConfig(epochs=args.epochs, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                             batch_size=args.batch_size, slim_l1=args.slim_l1, seed=args.seed,
                             augment=not args.no_augment, progress=not args.no_progress,
                             sync_batchnorm=not args.no_sync_bn)
    data = data_spec(args)
    logs = api.train_model(model, config, data, args.split, args.limit)
    for log in logs:
        print(f"epoch {log.epoch}: loss {log.loss:.4f}, train acc {log.accuracy:.4f}, "
              f"{log.images_per_s:.0f} images/s, {log.seconds:.1f}s")
    path = api.save_weights(model, args.output, force=args.force) if is_main() else Path(args.output)
    print(f"saved {path}")
    summary = {"model": model.name, "output": str(path), "epochs": [vars(log) for log in logs]}
    if args.eval_split != "none":
        result = api.evaluate_model(model, data, args.eval_split, progress=not args.no_progress)
        print(f"{args.eval_split} top-1 {result.accuracy:.4f} on {result.n} images")
        summary.update(eval_split=args.eval_split, accuracy=result.accuracy, n=result.n)
    if args.json:
        print(json.dumps(summary))
    return 0
