"""``pyprune opt``: run a pass pipeline on a model and save the result."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .. import api
from ..distributed import is_main
from .args import (MODEL_EPILOG, Formatter, add_data_source, add_model_args, add_run_args, add_sgd_args, add_sync_bn, load,
                   positive_int, refuse_existing_output)
from .present import history_line, pipeline_help

EXAMPLES = """
Deep compression's pruning and weight sharing, with fine-tuning after each:
  pyprune opt --arch resnet20 --pretrained --passes "mask(sparsity=0.8),quant(bits=5)" \\
      --finetune-epochs 1 -o resnet20-dc.pt

Network slimming on the pretrained ResNet-56:
  pyprune opt --arch resnet56 --pretrained --slim-l1 1e-4 --l1-epochs 2 \\
      --passes "slim(ratio=0.4)" --finetune-epochs 2 -o resnet56-slim.pt
  pyprune eval resnet56-slim.pt --split test
"""


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("opt", formatter_class=Formatter,
                       epilog=MODEL_EPILOG + "\n" + pipeline_help(api.list_passes()) + "\n" + EXAMPLES,
                       help="run a compression pass pipeline and save the result",
                       description="Run a pipeline of compression passes on a model, optionally with network "
                                   "slimming's sparsity training before it and fine-tuning after each pass, "
                                   "report size and accuracy after every step, and save the result as one "
                                   "file that loads without pickle (pyprune eval/info OUT).")
    add_model_args(p, traces=True)
    g = p.add_argument_group("pipeline")
    g.add_argument("--passes", required=True, metavar="PIPELINE",
                   help='comma-separated passes, e.g. "slim(ratio=0.4)"; see below and `pyprune passes`')
    g.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="where to save the optimized model: NAME.ppz for the compressed container, "
                        "any other name for a plain graph file")
    g.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    g.add_argument("--json", action="store_true", help="end the output with one JSON line of every step")
    g = p.add_argument_group("training")
    g.add_argument("--slim-l1", type=float, default=0.0, metavar="S",
                   help="sparsity training before the pipeline: L1 strength on BatchNorm gammas (e.g. 1e-4)")
    g.add_argument("--l1-epochs", type=float, default=0.0, metavar="E", help="epochs of sparsity training")
    g.add_argument("--finetune-epochs", type=float, default=0.0, metavar="E",
                   help="fine-tuning epochs after each pass (0: none)")
    add_sgd_args(g)
    g.add_argument("--train-limit", type=positive_int, metavar="N", help="train on the first N training images only")
    g = p.add_argument_group("data")
    add_data_source(g)
    g.add_argument("--eval-split", choices=["val", "test", "none"], default="val",
                   help="split on which every step's accuracy is measured")
    g.add_argument("--eval-limit", type=int, metavar="N", help="measure on the first N images of that split")
    add_run_args(p)
    add_sync_bn(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    refuse_existing_output(args)
    api.set_threads(args.threads)
    train = api.TrainConfig(lr=args.lr, batch_size=args.batch_size, seed=args.seed, progress=not args.no_progress,
                            sync_batchnorm=not args.no_sync_bn)
    config = api.OptConfig(args.passes, finetune_epochs=args.finetune_epochs, slim_l1=args.slim_l1,
                           l1_epochs=args.l1_epochs, train=train,
                           eval_split=None if args.eval_split == "none" else args.eval_split,
                           eval_limit=args.eval_limit, train_limit=args.train_limit,
                           data=api.DataSpec(args.data, args.data_root, args.download))
    model = load(args)
    history = history_line(model)
    if history and not getattr(args, "quiet", False):
        print(history)
    result = api.optimize_model(model, config, log=print, output=args.output)
    for line in result.summaries():
        print(line)
    codebooks = result.codebooks() if Path(args.output).suffix == ".ppz" else None
    path = Path(args.output)
    if is_main():
        api.save_model(model, path, gm=result.graph_module, provenance=result.provenance(), codebooks=codebooks,
                       force=args.force)
    first, last = result.steps[0], result.steps[-1]
    print(f"saved {path}: {first.params:,} -> {last.params:,} parameters ({first.params / last.params:.2f}x), "
          f"{first.macs / 1e6:.1f}M -> {last.macs / 1e6:.1f}M MACs")
    if args.json:
        print(json.dumps({"model": model.name, "output": str(path), "pipeline": args.passes,
                          "steps": result.report()}))
    return 0
