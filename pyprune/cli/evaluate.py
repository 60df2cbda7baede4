"""``pyprune eval``: top-1 accuracy of a model on one split, optionally on the
inference runtime."""

from __future__ import annotations

import argparse
import json

from .. import api
from ..distributed import is_main
from ..files import atomic_write
from .args import MODEL_EPILOG, Formatter, add_data_args, add_model_args, add_run_args, data_spec, load


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", formatter_class=Formatter, epilog=MODEL_EPILOG, help="top-1 accuracy on a split",
                       description="Evaluate top-1 accuracy of a model on one split of a dataset.")
    add_model_args(p)
    add_data_args(p, "test")
    add_run_args(p)
    p.add_argument("--json", action="store_true",
                   help="end the output with one JSON line holding accuracy and n (and the runtime plan)")
    p.add_argument("--predictions", metavar="FILE",
                   help="write the top-1 class of every image to FILE, one per line, in dataset order")
    g = p.add_argument_group("inference runtime (saved .ppz or graph files only)")
    g.add_argument("--runtime", choices=api.RUNTIMES,
                   help="run the saved model through the inference runtime: BatchNorm folded into the conv "
                        "before it, ReLUs fused, and each Conv2d/Linear layer on the dense (torch) or sparse "
                        "kernel; from 8 images on (--runtime-batch), runs of sparse convolutions keep their "
                        "activations in the lanes layout (images on the vector lanes). dense: every layer "
                        "dense; sparse: every layer the sparse kernel supports (groups 1); auto: per layer the "
                        "fastest, timed at load on the layer's real input shape and cached (by file sha256, "
                        "batch, threads, CPU) in $PYPRUNE_CACHE, else ~/.cache/pyprune/runtime. All three give "
                        "the same predictions. The model then runs as one native program (no Python per "
                        "layer) where every node of its graph has a lowering, else node by node; --verbose "
                        "says which. Without --runtime the model runs as loaded")
    g.add_argument("--runtime-batch", type=int, default=1, metavar="N",
                   help="batch size at which --runtime auto times the layers: 1 tunes for latency; the value of "
                        "--batch-size tunes for this evaluation's throughput")
    g.add_argument("--runtime-weights", choices=("codes", "csr"), default="codes",
                   help="how sparse layers hold quantized weights: codes, code and gap bits per non-zero as the "
                        ".ppz stores them, unpacked per call (about the file's size in memory, but slower: "
                        "the unpacking shows at batch 1, see bench/end_to_end.py); csr: fp32 CSR, 8 bytes per "
                        "non-zero")
    g.add_argument("--verbose", action="store_true",
                   help="with --runtime, print the per-layer plan: choice, sparsity, BN/ReLU fusion, timings")
    p.set_defaults(func=run)


def _load_runtime(args: argparse.Namespace) -> api.LoadedModel:
    if not args.model or args.arch or args.weights or args.pretrained or args.trust_pickle or args.input_size:
        raise ValueError("--runtime runs a saved pyprune model: give a .ppz or graph file written by "
                         "`pyprune opt -o` or `pyprune compile`, without --arch, --weights, --pretrained "
                         "--trust-pickle or --input-size")
    return api.load_runtime(args.model, runtime=args.runtime, batch_size=args.runtime_batch,
                            codes=args.runtime_weights == "codes", max_bytes=api.decoded_bound(args.max_decoded_mb))


def run(args: argparse.Namespace) -> int:
    api.set_threads(args.threads)
    model = _load_runtime(args) if args.runtime else load(args)
    plan = model.module.plan if args.runtime else None
    if plan is not None and args.verbose:
        print(plan.table())
    result = api.evaluate_model(model, data_spec(args), args.split, args.limit, args.batch_size,
                                progress=not args.no_progress)
    runtime = f" (runtime {args.runtime})" if args.runtime else ""
    print(f"{model.name}{runtime} on {args.data}/{args.split}: top-1 {result.accuracy:.4f} "
          f"({round(result.accuracy * result.n)}/{result.n}), loss {result.loss:.4f}, {result.seconds:.1f}s")
    if args.predictions and is_main():
        text = "".join(f"{c}\n" for c in result.predictions.tolist()).encode()
        atomic_write(args.predictions, lambda f: f.write(text), force=True)
    if args.json:
        summary = {"model": model.name, "data": args.data, "split": args.split,
                   "accuracy": result.accuracy, "n": result.n, "loss": result.loss}
        if plan is not None:
            summary["runtime"] = plan.to_dict()
        print(json.dumps(summary))
    return 0
