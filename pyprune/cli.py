"""Command line: ``pyprune info | eval | train | opt | compile | export-onnx | inspect | models``.
A thin layer over :mod:`pyprune.api` and :mod:`pyprune.compile`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__, distributed
from .distributed import is_main
from .export import DEFAULT_ATOL, DEFAULT_IMAGES, DEFAULT_OPSET, FORMS, MIN_OPSET, VerificationError
from .runtime.plan import RUNTIMES
from .text import format_table as _format_table

EPILOG = """\
Naming a model (the same for every subcommand):
  pyprune eval model.pt --arch resnet56          a checkpoint (state dict) for a zoo architecture
  pyprune eval --arch resnet56 --weights FILE     the same, as a flag
  pyprune eval --arch resnet56 --pretrained       the published checkpoint ($PYPRUNE_MODELS, cache, --download)
  pyprune info --arch resnet56                    random initialisation (seeded by --seed)
  pyprune eval --arch torchvision:resnet18 --weights FILE --num-classes 1000
                                                  a torchvision.models classifier, your weights (never downloads)
  pyprune info --arch mypkg.models:make_net       your own model class or factory
  pyprune eval whole_model.pt --trust-pickle      a pickled nn.Module (unpickling runs code: trusted files only)

Data is found under --data-root, else $PYPRUNE_DATA, else ./data.
"""


OPT_EPILOG = """
Pipelines (--passes), in the style of LLVM's opt -passes=:
  slim(ratio=0.4)                     remove the 40% of channel groups with the smallest BatchNorm |gamma|
  slim(ratio=0.5,combine=sum,min_keep=0.1)
  slim(layer_ratios={'layer1.0.bn1':0.5},ratio=0)
Options of slim: ratio, combine (max|sum|mean), min_channels, min_keep, layer_ratios, mode (apply|mask).
  mask(sparsity=0.8)                  zero the 80% smallest |w| of all conv/linear weights (one global threshold)
  mask(sparsity=0.7,scope=layer,layers={'linear':0.9})
Options of mask: sparsity, scope (global|layer: exactly round(S*n) zeros per layer), layers ({name: sparsity}
  overrides), include (conv|linear|'conv,linear'), min_params (skip smaller layers).
  quant(bits=5)                       share weights: per-layer k-means on the non-zero weights, 2^5 codes
  quant(conv_bits=8,linear_bits=5,init=density)
Options of quant: bits, conv_bits, linear_bits, layers ({name: bits}; 0 leaves a layer alone),
  init (linear|kmeans++|density), iters, seed, grad (mean|sum: centroid gradient in fine-tuning). Zeros stay zero.
Fine-tuning after a pass keeps the constraints of every earlier mask and quant: masked weights stay
exactly zero, and shared weights stay tied (their centroids train on the summed gradients).

Deep compression's pruning and weight sharing, with fine-tuning after each:
  pyprune opt --arch resnet20 --pretrained --passes "mask(sparsity=0.8),quant(bits=5)" \\
      --finetune-epochs 1 -o resnet20-dc.pt

Network slimming on the pretrained ResNet-56:
  pyprune opt --arch resnet56 --pretrained --slim-l1 1e-4 --l1-epochs 2 \\
      --passes "slim(ratio=0.4)" --finetune-epochs 2 -o resnet56-slim.pt
  pyprune eval resnet56-slim.pt --split test
"""


DEFAULT_ORDER_TEXT = ("slim", "mask", "quant")

COMPILE_EPILOG = """
Examples:
  pyprune compile --arch resnet56 --pretrained --max-drop 0.01 --val-from test -o out/
  pyprune compile model.pt --arch resnet20 --target-acc 0.80 --finetune-epochs 0.2 --budget-minutes 10 -o out/
  pyprune compile --arch resnet20 --pretrained --max-drop 0.01 --search grid \\
      --slim-levels 0.2,0.4 --mask-levels 0.5,0.8 --bits-levels 8,5 -o grid/
  pyprune compile ... -o out/ --resume       # after Ctrl-C or a kill: finished candidates are not redone

Exit codes: 0 done (also when nothing beat the baseline: a warning says so, and
model.ppz holds the baseline packed losslessly); 2 bad input, or the baseline is
already below --target-acc (nothing is written); 3 model.onnx could not be exported
or failed verification (everything else is written; report.json says why);
130 interrupted (resume with --resume).
"""


EXIT_UNVERIFIED = 3  # the ONNX file does not reproduce the model

EXPORT_EPILOG = """
Forms:
  dense     every weight float32; BatchNorm folded into the conv before it. Runs anywhere ONNX runs.
  compact   each Conv/Gemm weight that is smaller so (the quantized ones) is stored as uint8 codes
            (uint16 past 256 values) plus a float32 codebook and rebuilt in the graph by Cast + Gather;
            BatchNorm stays a node after those convs. onnxruntime folds both back into constants when
            it opens the session, so it runs as fast as the dense form.
Both: opset 18 by default (17 at least), input "input" (N, C, H, W) float32 normalised with the
mean and std stored in the file's metadata (pyprune.mean, pyprune.std), output "logits", batch
axis dynamic, constant folding, onnx.checker on the result.

Verification runs onnxruntime (CPU) and PyTorch on the first N images of --split and requires
every logit within --atol and the same top-1 class on every image.

Examples:
  pyprune export-onnx out/model.ppz -o model.onnx                       compact, verified on 256 val images
  pyprune export-onnx out/model.ppz -o model-dense.onnx --form dense --verify 1000
  pyprune export-onnx --arch resnet56 --pretrained -o resnet56.onnx --form dense

Exit codes: 0 written and verified; 2 bad input or a model the exporter cannot take (the message
names the operator with no ONNX mapping); 3 verification failed (the figures are printed, and the
file is kept as NAME.unverified.onnx, not at -o).
"""


def _levels(kind: type):
    def parse(text: str) -> tuple:
        try:
            values = tuple(kind(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}")
        if not values:
            raise argparse.ArgumentTypeError("expected at least one value")
        return values
    return parse


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("model", nargs="?", metavar="MODEL",
                   help="checkpoint file: a state dict used with --arch, or a pickled module with --trust-pickle")
    g.add_argument("--arch", help="zoo architecture (see `pyprune models`) or package.module:callable")
    g.add_argument("--weights", metavar="FILE", help="state-dict checkpoint for --arch")
    g.add_argument("--pretrained", action="store_true",
                   help="use the published checkpoint of --arch (looked up in $PYPRUNE_MODELS and the cache)")
    g.add_argument("--trust-pickle", action="store_true",
                   help="allow loading a whole pickled nn.Module; unpickling runs code from the file")
    g.add_argument("--download", action="store_true",
                   help="download what is missing: CIFAR-10 through torchvision, --pretrained weights from GitHub")
    g.add_argument("--num-classes", type=int, default=10, help="classifier outputs when building --arch")
    g.add_argument("--input-size", type=int, metavar="PIXELS",
                   help="square input resolution of a model built from --arch (default: the architecture's, "
                        "224 for torchvision: models); images from --data imagefolder: are resized to it")
    g.add_argument("--seed", type=int, default=0, help="seed for random initialisation and training")


def _add_data_args(p: argparse.ArgumentParser, split: str) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default="cifar10",
                   help="dataset name (cifar10), or imagefolder:PATH for images in PATH/{train,val}/<class>/")
    g.add_argument("--data-root", metavar="DIR", help="dataset folder (default: $PYPRUNE_DATA, else ./data)")
    g.add_argument("--split", default=split, choices=["train", "val", "test", "test-search", "test-report"],
                   help="val is a fixed class-balanced 5,000-image hold-out of train; test-search and "
                        "test-report are the two fixed class-balanced halves of test that compile --val-from "
                        "test uses")
    g.add_argument("--limit", type=int, metavar="N", help="use only the first N images of the split")
    g.add_argument("--batch-size", type=int, default=500 if split != "train" else 128)


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, metavar="N", help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    _add_nproc(p)


def _add_nproc(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="run as N processes under torchrun (DistributedDataParallel; gloo on CPUs, NCCL on GPUs): "
                        "a shortcut for `torchrun --standalone --nproc-per-node N -m pyprune ...`; only rank 0 "
                        "writes and prints; exits with the code of the first process that failed. See README, "
                        "Scaling out")


def _add_sync_bn(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-sync-bn", action="store_true",
                   help="with several processes, BatchNorm layers in training take their statistics over each "
                        "process's own share of the batch (DDP's default; faster, but then the result depends on "
                        "the number of processes), not over the whole global batch")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyprune", formatter_class=_Formatter, epilog=EPILOG,
        description="A compiler for CNN compression: structured channel slimming plus deep "
                    "compression, driven by a target accuracy.")
    parser.add_argument("--version", action="version", version=f"pyprune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("info", formatter_class=_Formatter, epilog=EPILOG,
                       help="per-layer table of output shapes, parameters, bytes and MACs",
                       description="Trace the model with torch.fx, propagate shapes, and print per-layer "
                                   "output shape, parameters, bytes (parameters and buffers) and MACs per sample.")
    _add_model_args(p)
    p.add_argument("--all-nodes", action="store_true",
                   help="list every graph node, not only those with parameters or MACs")
    p.add_argument("--json", action="store_true",
                   help='print one JSON object {"layers": [...], "total": {"params", "bytes", "macs"}}')
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("eval", formatter_class=_Formatter, epilog=EPILOG, help="top-1 accuracy on a split",
                       description="Evaluate top-1 accuracy of a model on one split of a dataset.")
    _add_model_args(p)
    _add_data_args(p, "test")
    _add_run_args(p)
    p.add_argument("--json", action="store_true",
                   help="end the output with one JSON line holding accuracy and n (and the runtime plan)")
    p.add_argument("--predictions", metavar="FILE",
                   help="write the top-1 class of every image to FILE, one per line, in dataset order")
    g = p.add_argument_group("inference runtime (saved .ppz or graph files only)")
    g.add_argument("--runtime", choices=RUNTIMES,
                   help="run the saved model through the inference runtime: BatchNorm folded into the conv "
                        "before it, ReLUs fused, and each Conv2d/Linear layer on the dense (torch) or sparse "
                        "(CSR) kernel. dense: every layer dense; sparse: every layer the sparse kernel supports "
                        "(groups 1); auto: per layer the faster of the two, timed at load on the layer's real "
                        "input shape and cached (by file sha256, batch, threads, CPU) in $PYPRUNE_CACHE, else "
                        "~/.cache/pyprune/runtime. All three give the same predictions. Without --runtime the "
                        "model runs as loaded")
    g.add_argument("--runtime-batch", type=int, default=1, metavar="N",
                   help="batch size at which --runtime auto times the layers: 1 tunes for latency; the value of "
                        "--batch-size tunes for this evaluation's throughput")
    g.add_argument("--verbose", action="store_true",
                   help="with --runtime, print the per-layer plan: choice, sparsity, BN/ReLU fusion, timings")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("train", formatter_class=_Formatter, epilog=EPILOG,
                       help="fine-tune or train a model and save its weights",
                       description="Fine-tune with SGD, momentum, cosine schedule and weight decay; "
                                   "--slim-l1 adds network slimming's L1 penalty on BatchNorm gammas.")
    _add_model_args(p)
    _add_data_args(p, "train")
    _add_run_args(p)
    _add_sync_bn(p)
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=float, default=1.0, help="may be fractional")
    g.add_argument("--lr", type=float, default=0.01)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--slim-l1", type=float, default=0.0, metavar="S",
                   help="L1 strength on BatchNorm gammas (network slimming uses 1e-4)")
    g.add_argument("--no-augment", action="store_true", help="train without crop and flip")
    g.add_argument("--eval-split", choices=["val", "test", "none"], default="val",
                   help="split to report accuracy on after training")
    g.add_argument("-o", "--output", required=True, metavar="FILE", help="where to save the weights (.pt)")
    g.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    g.add_argument("--json", action="store_true", help="end the output with one JSON line")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("opt", formatter_class=_Formatter, epilog=EPILOG + OPT_EPILOG,
                       help="run a compression pass pipeline and save the result",
                       description="Run a pipeline of compression passes on a model, optionally with network "
                                   "slimming's sparsity training before it and fine-tuning after each pass, "
                                   "report size and accuracy after every step, and save the result as one "
                                   "file that loads without pickle (pyprune eval/info OUT).")
    _add_model_args(p)
    g = p.add_argument_group("pipeline")
    g.add_argument("--passes", required=True, metavar="PIPELINE",
                   help='comma-separated passes, e.g. "slim(ratio=0.4)"; see below')
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
    g.add_argument("--lr", type=float, default=0.01)
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--train-limit", type=int, metavar="N", help="train on the first N training images only")
    g = p.add_argument_group("data")
    g.add_argument("--data", default="cifar10",
                   help="dataset name (cifar10), or imagefolder:PATH for images in PATH/{train,val}/<class>/")
    g.add_argument("--data-root", metavar="DIR", help="dataset folder (default: $PYPRUNE_DATA, else ./data)")
    g.add_argument("--eval-split", choices=["val", "test", "none"], default="val",
                   help="split on which every step's accuracy is measured")
    g.add_argument("--eval-limit", type=int, metavar="N", help="measure on the first N images of that split")
    _add_run_args(p)
    _add_sync_bn(p)
    p.set_defaults(func=cmd_opt)

    p = sub.add_parser("compile", formatter_class=_Formatter, epilog=EPILOG + COMPILE_EPILOG,
                       help="find the smallest model that meets an accuracy target",
                       description="Search how far to push channel slimming, magnitude pruning and codebook "
                                   "quantization (and in which order) so that the model still meets the target "
                                   "accuracy on the validation split, then store it with CSR + Huffman coding. "
                                   "Writes OUT/model.ppz, model.onnx (compact ONNX, verified in onnxruntime), report.json, "
                                   "report.md and pareto.png; the final model is "
                                   "evaluated once on the test split, which the search never sees.")
    _add_model_args(p)
    g = p.add_argument_group("target (one of)")
    t = g.add_mutually_exclusive_group(required=True)
    t.add_argument("--target-acc", type=float, metavar="A", help="absolute top-1 on the validation split, e.g. 0.93")
    t.add_argument("--max-drop", type=float, metavar="D",
                   help="accuracy points the model may lose against its own validation accuracy, measured "
                        "first (0.01: 92.5%% -> 91.5%%)")
    g = p.add_argument_group("search")
    g.add_argument("--search", choices=["heuristic", "grid"], default="heuristic",
                   help="heuristic: bisection per stage, fine-tuning only near the boundary; grid: the brute-force "
                        "baseline over every combination of the levels")
    g.add_argument("--order", default=",".join(DEFAULT_ORDER_TEXT), metavar="STAGES",
                   help="stages in the order they run (any of slim, mask, quant); Huffman storage is always last")
    g.add_argument("--explore-order", action="store_true",
                   help="compare every order of the stages on a cheap proxy (screening only) and use the best")
    g.add_argument("--slim-levels", type=_levels(float), metavar="R,R,...",
                   help="slim ratios to search (default 0.05..0.9 by 0.05)")
    g.add_argument("--mask-levels", type=_levels(float), metavar="S,S,...",
                   help="mask sparsities to search (default 0.3..0.98)")
    g.add_argument("--bits-levels", type=_levels(int), metavar="B,B,...", help="codebook bits to search (default 8..2)")
    g.add_argument("--recover-margin", type=float, default=0.1, metavar="M",
                   help="fine-tune candidates whose screened accuracy is at most M below the target (grows with the "
                        "recovery fine-tuning shows)")
    g.add_argument("--budget-minutes", type=float, metavar="M",
                   help="stop searching after M minutes and keep the best verified model so far")
    g = p.add_argument_group("training")
    g.add_argument("--finetune-epochs", type=float, default=0.1, metavar="E",
                   help="fine-tuning per deciding candidate (may be fractional; 0: recalibrate BatchNorm only)")
    g.add_argument("--slim-l1", type=float, default=0.0, metavar="S",
                   help="let the search try network slimming's sparsity training (L1 on BatchNorm gammas) first; "
                        "it is used only if it lets slimming go further")
    g.add_argument("--l1-epochs", type=float, default=1.0, metavar="E", help="epochs of sparsity training")
    g.add_argument("--lr", type=float, default=0.01)
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--train-limit", type=int, metavar="N", help="fine-tune on the first N training images only")
    g.add_argument("--recal-images", type=int, default=1024, metavar="N",
                   help="training images used to recalibrate BatchNorm statistics after each pass")
    g = p.add_argument_group("data")
    g.add_argument("--data", default="cifar10",
                   help="dataset name (cifar10), or imagefolder:PATH for images in PATH/{train,val}/<class>/")
    g.add_argument("--data-root", metavar="DIR", help="dataset folder (default: $PYPRUNE_DATA, else ./data)")
    g.add_argument("--val-from", choices=["train", "test"], default="train",
                   help="train: validate on the 5,000-image hold-out of train; test: on one fixed class-balanced "
                        "half of test, reporting on the other (for checkpoints trained on all of train)")
    g.add_argument("--val-limit", type=int, default=2500, metavar="N", help="validation images used by the search")
    g.add_argument("--screen-limit", type=int, default=1000, metavar="N",
                   help="validation images used to screen candidates")
    g.add_argument("--test-limit", type=int, metavar="N", help="test images for the final report (default: all)")
    g = p.add_argument_group("output")
    g.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder")
    g.add_argument("--resume", action="store_true",
                   help="continue an interrupted compile in OUT without redoing finished candidates")
    g.add_argument("--force", action="store_true", help="start over in a non-empty OUT")
    g.add_argument("--onnx-verify", type=int, default=DEFAULT_IMAGES, metavar="N",
                   help="validation images on which OUT/model.onnx (compact ONNX form) is checked against PyTorch "
                        "in onnxruntime (0: written unverified)")
    g.add_argument("--quiet", action="store_true", help="no progress bars and no per-candidate lines")
    g.add_argument("--json", action="store_true", help="end the output with one JSON line summarising the result")
    p.add_argument("--threads", type=int, metavar="N", help="torch intra-op threads (default: torch's choice)")
    _add_nproc(p)
    _add_sync_bn(p)
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("export-onnx", formatter_class=_Formatter, epilog=EPILOG + EXPORT_EPILOG,
                       help="export to ONNX (dense or compact form), verified in onnxruntime",
                       description="Export a model (a .ppz or anything eval takes) to ONNX, check it with "
                                   "onnx.checker, and verify it in onnxruntime against PyTorch on N images "
                                   "before writing it.")
    _add_model_args(p)
    g = p.add_argument_group("export")
    g.add_argument("-o", "--output", required=True, metavar="FILE.onnx", help="where to write the ONNX file")
    g.add_argument("--form", choices=FORMS, default="compact",
                   help="compact: quantized weights as codes + codebook; dense: float32 weights (see below)")
    g.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (>= {MIN_OPSET})")
    g.add_argument("--sparse-initializers", action="store_true",
                   help="compact form: store a codes tensor as an ONNX sparse initializer where that is smaller "
                        "(below ~11%% density). onnxruntime accepts them; onnx.checker's full check does not "
                        "(ONNX types them as sparse tensors), so only its structural check runs")
    g.add_argument("--force", action="store_true", help="overwrite FILE.onnx if it exists")
    g.add_argument("--json", action="store_true", help="end the output with one JSON line of the result")
    g = p.add_argument_group("verification")
    g.add_argument("--verify", type=int, default=DEFAULT_IMAGES, metavar="N",
                   help="images to compare onnxruntime with PyTorch on (0: write without verifying)")
    g.add_argument("--atol", type=float, default=DEFAULT_ATOL, help="largest allowed |logit difference|")
    g.add_argument("--data", default="cifar10",
                   help="dataset name (cifar10), or imagefolder:PATH for images in PATH/{train,val}/<class>/")
    g.add_argument("--data-root", metavar="DIR", help="dataset folder (default: $PYPRUNE_DATA, else ./data)")
    g.add_argument("--split", default="val", choices=["train", "val", "test", "test-search", "test-report"],
                   help="split whose first N images are compared")
    p.add_argument("--threads", type=int, metavar="N", help="torch intra-op threads (default: torch's choice)")
    p.set_defaults(func=cmd_export_onnx)

    p = sub.add_parser("inspect", formatter_class=_Formatter,
                       help="how a .ppz file stores each tensor: encoding, density, bits, stream bytes",
                       description="Decode and validate a .ppz container and print, per tensor: shape, encoding, "
                                   "density, bits per code and per gap, bytes of each stream, fp32 bytes and "
                                   "the ratio; then totals, and each Huffman stream's size against its Shannon "
                                   "entropy.")
    p.add_argument("file", metavar="FILE.ppz")
    p.add_argument("--all", action="store_true", help="also list small raw tensors (BatchNorm, biases)")
    p.add_argument("--json", action="store_true", help="print the full inspection as one JSON object")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("models", help="list the zoo architectures",
                       description="List the zoo architectures. torchvision's classifiers are named "
                       "torchvision:NAME (e.g. torchvision:resnet18) and are not listed here.")
    p.set_defaults(func=cmd_models)
    return parser


def _load(args: argparse.Namespace):
    from .api import load_model

    data = getattr(args, "data", None)
    if args.input_size is not None and data is not None and not data.startswith("imagefolder:"):
        raise ValueError(f"--input-size resizes the images of --data imagefolder:PATH; {data} images have "
                         "a fixed size")
    return load_model(args.model, args.arch, args.weights, pretrained=args.pretrained,
                      download=args.download, trust_pickle=args.trust_pickle,
                      seed=args.seed, num_classes=args.num_classes, input_size=args.input_size)


def cmd_info(args: argparse.Namespace) -> int:
    from .api import model_info

    info = model_info(_load(args))
    if args.json:
        print(json.dumps(info.to_dict()))
        return 0
    shown = [r for r in info.layers if args.all_nodes or r.params or r.macs]
    rows = [(r.name, r.op, "x".join(map(str, r.output_shape[1:])) if r.output_shape else "-",
             f"{r.params:,}", f"{r.bytes:,}", f"{r.macs:,}") for r in shown]
    rows.append(("total", "", "", f"{info.total.params:,}", f"{info.total.bytes:,}", f"{info.total.macs:,}"))
    print(f"{info.name}: {len(info.layers)} graph nodes, {len(shown)} shown")
    print(_format_table(("layer", "op", "output", "params", "bytes", "MACs"), rows))
    print(f"{info.total.params / 1e6:.2f}M parameters, {info.total.bytes / 2**20:.2f} MiB, "
          f"{info.total.macs / 1e6:.1f}M MACs per image")
    return 0


def _load_runtime(args: argparse.Namespace):
    from .runtime import load_runtime

    if not args.model or args.arch or args.weights or args.pretrained or args.trust_pickle or args.input_size:
        raise ValueError("--runtime runs a saved pyprune model: give a .ppz or graph file written by "
                         "`pyprune opt -o` or `pyprune compile`, without --arch, --weights, --pretrained "
                         "--trust-pickle or --input-size")
    return load_runtime(args.model, runtime=args.runtime, batch_size=args.runtime_batch)


def cmd_eval(args: argparse.Namespace) -> int:
    from .api import evaluate_model, set_threads

    set_threads(args.threads)
    model = _load_runtime(args) if args.runtime else _load(args)
    plan = model.module.plan if args.runtime else None
    if plan is not None and args.verbose:
        print(plan.table())
    result = evaluate_model(model, args.data, args.split, args.data_root, args.download, args.limit,
                            args.batch_size, progress=not args.no_progress)
    runtime = f" (runtime {args.runtime})" if args.runtime else ""
    print(f"{model.name}{runtime} on {args.data}/{args.split}: top-1 {result.accuracy:.4f} "
          f"({round(result.accuracy * result.n)}/{result.n}), loss {result.loss:.4f}, {result.seconds:.1f}s")
    if args.predictions and is_main():
        Path(args.predictions).write_text("".join(f"{c}\n" for c in result.predictions.tolist()))
    if args.json:
        summary = {"model": model.name, "data": args.data, "split": args.split,
                   "accuracy": result.accuracy, "n": result.n, "loss": result.loss}
        if plan is not None:
            summary["runtime"] = plan.to_dict()
        print(json.dumps(summary))
    return 0


def _refuse_existing_output(args: argparse.Namespace) -> None:
    """Before any work: an existing -o is kept unless --force says otherwise."""
    if Path(args.output).exists() and not args.force:
        raise FileExistsError(f"{args.output} exists; pass --force to overwrite it")


def cmd_train(args: argparse.Namespace) -> int:
    from .api import evaluate_model, save_weights, set_threads, train_model
    from .train import TrainConfig

    _refuse_existing_output(args)
    set_threads(args.threads)
    model = _load(args)
    config = TrainConfig(epochs=args.epochs, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                         batch_size=args.batch_size, slim_l1=args.slim_l1, seed=args.seed,
                         augment=not args.no_augment, progress=not args.no_progress,
                         sync_batchnorm=not args.no_sync_bn)
    logs = train_model(model, config, args.data, args.split, args.data_root, args.download, args.limit)
    for log in logs:
        print(f"epoch {log.epoch}: loss {log.loss:.4f}, train acc {log.accuracy:.4f}, "
              f"{log.images_per_s:.0f} images/s, {log.seconds:.1f}s")
    path = save_weights(model, args.output, force=args.force) if is_main() else Path(args.output)
    print(f"saved {path}")
    summary = {"model": model.name, "output": str(path), "epochs": [vars(log) for log in logs]}
    if args.eval_split != "none":
        result = evaluate_model(model, args.data, args.eval_split, args.data_root, args.download,
                                progress=not args.no_progress)
        print(f"{args.eval_split} top-1 {result.accuracy:.4f} on {result.n} images")
        summary.update(eval_split=args.eval_split, accuracy=result.accuracy, n=result.n)
    if args.json:
        print(json.dumps(summary))
    return 0


def cmd_opt(args: argparse.Namespace) -> int:
    from .api import save_model, set_threads
    from .opt import OptConfig, optimize
    from .train import TrainConfig

    _refuse_existing_output(args)
    set_threads(args.threads)
    train = TrainConfig(lr=args.lr, batch_size=args.batch_size, seed=args.seed, progress=not args.no_progress,
                        sync_batchnorm=not args.no_sync_bn)
    config = OptConfig(args.passes, finetune_epochs=args.finetune_epochs, slim_l1=args.slim_l1,
                       l1_epochs=args.l1_epochs, train=train,
                       eval_split=None if args.eval_split == "none" else args.eval_split,
                       eval_limit=args.eval_limit, train_limit=args.train_limit, data=args.data,
                       data_root=args.data_root, download=args.download)
    model = _load(args)
    result = optimize(model.module, model.mean, model.std, model.input_shape, config, log=print)
    for line in result.summaries():
        print(line)
    codebooks = result.codebooks() if Path(args.output).suffix == ".ppz" else None
    path = Path(args.output)
    if is_main():
        save_model(model, path, gm=result.graph_module, provenance=result.provenance(), codebooks=codebooks,
                   force=args.force)
    first, last = result.steps[0], result.steps[-1]
    print(f"saved {path}: {first.params:,} -> {last.params:,} parameters ({first.params / last.params:.2f}x), "
          f"{first.macs / 1e6:.1f}M -> {last.macs / 1e6:.1f}M MACs")
    if args.json:
        print(json.dumps({"model": model.name, "output": str(path), "pipeline": args.passes,
                          "steps": result.provenance()}))
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from .api import set_threads
    from .compile import CompileConfig, compile_model
    from .search.target import Target
    from .train import TrainConfig

    levels = {k: v for k, v in (("slim", args.slim_levels), ("mask", args.mask_levels),
                                ("quant", args.bits_levels)) if v}
    config = CompileConfig(
        Target(args.target_acc, args.max_drop), args.output, search=args.search,
        order=tuple(s.strip() for s in args.order.split(",") if s.strip()), explore_order=args.explore_order,
        levels=levels, finetune_epochs=args.finetune_epochs, slim_l1=args.slim_l1, l1_epochs=args.l1_epochs,
        budget_minutes=args.budget_minutes, val_from=args.val_from, val_limit=args.val_limit,
        screen_limit=args.screen_limit, test_limit=args.test_limit, train_limit=args.train_limit,
        recal_images=args.recal_images, margin=args.recover_margin,
        train=TrainConfig(lr=args.lr, batch_size=args.batch_size, seed=args.seed, sync_batchnorm=not args.no_sync_bn),
        data=args.data, data_root=args.data_root, download=args.download, resume=args.resume, force=args.force,
        quiet=args.quiet, onnx_verify=args.onnx_verify)
    set_threads(args.threads)
    model = _load(args)
    result = compile_model(model, config)
    if args.json:
        chosen, search = result.report["chosen"], result.report["search"]
        print(json.dumps({"output": str(result.output), "pipeline": chosen["pipeline"],
                          "met_target": chosen["met_target"], "val_accuracy": chosen["val_accuracy"],
                          "test_accuracy": chosen["test_accuracy"], "file_bytes": chosen["file_bytes"],
                          "compression": chosen["compression"], "candidates": search["candidates"],
                          "finetuned": search["finetuned"], "seconds": search["seconds"],
                          "onnx_bytes": result.report["onnx"].get("bytes"),
                          "onnx_verified": result.report["onnx"]["verified"]}))
    return result.exit_code


def cmd_export_onnx(args: argparse.Namespace) -> int:
    from .api import export_model_onnx, set_threads

    set_threads(args.threads)
    model = _load(args)
    report = export_model_onnx(model, args.output, args.form, args.verify, args.data, args.split, args.data_root,
                               args.download, args.atol, args.opset, args.sparse_initializers, args.force)
    print(report.summary())
    if args.json:
        print(json.dumps(report.to_dict()))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .encode.ppz import inspect

    report = inspect(args.file)
    if args.json:
        report = {k: v for k, v in report.items() if k != "manifest"}
        print(json.dumps(report))
        return 0
    rows = []
    for t in report["tensors"]:
        if not args.all and t["encoding"] == "raw" and t["numel"] < 4096:
            continue
        rows.append((t["name"], "x".join(map(str, t["shape"])), t["encoding"], f"{t['density']:.3f}",
                     t["code_bits"] if t["code_bits"] is not None else "-", t["gap_bits"] or "-",
                     f"{t['code_bytes']:,}", f"{t['gap_bytes']:,}", f"{t['bytes']:,}", f"{t['fp32_bytes']:,}",
                     f"{t['fp32_bytes'] / t['bytes']:.1f}x" if t["bytes"] else "-"))
    total = report["total"]
    rows.append(("total", "", "", f"{total['density']:.3f}", "", "", f"{total['code_bytes']:,}",
                 f"{total['gap_bytes']:,}", f"{total['bytes']:,}", f"{total['fp32_bytes']:,}",
                 f"{total['fp32_bytes'] / max(total['bytes'], 1):.1f}x"))
    print(_format_table(("tensor", "shape", "encoding", "density", "code bits", "gap bits", "code bytes",
                         "gap bytes", "bytes", "fp32 bytes", "ratio"), rows))
    print(f"file {total['file_bytes']:,} bytes (manifest {total['manifest_bytes']:,}, "
          f"overhead {total['overhead_bytes']:,}); fp32 {total['fp32_bytes']:,} bytes; "
          f"compression {total['compression']:.2f}x")
    for stream in ("codes", "gaps"):
        bits, entropy = total[f"{stream}_payload_bits"], total[f"{stream}_entropy_bits"]
        symbols = sum(t[stream]["symbols"] for t in report["tensors"] if t[stream])
        if symbols:
            print(f"{stream} stream: Huffman {bits / 8:,.0f} bytes ({bits / symbols:.3f} bits/symbol) vs entropy "
                  f"{entropy / 8:,.0f} bytes ({entropy / symbols:.3f} bits/symbol) over {symbols:,} symbols")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .models import available_models, get_spec

    for name in available_models():
        spec = get_spec(name)
        print(f"{name:14s} {spec.description}")
    return 0


# Errors that are the user's to fix: print one clear message, no traceback.
def _user_errors() -> tuple[type[BaseException], ...]:
    from .data import DatasetNotFoundError
    from .export import OnnxExportError
    from .ir import TraceError
    from .models import ModelLoadError

    return (ModelLoadError, DatasetNotFoundError, TraceError, OnnxExportError, FileNotFoundError, FileExistsError,
            ValueError)


def _without_nproc(argv: Sequence[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if getattr(args, "nproc", 1) < 1:
        print(f"pyprune {args.command}: error: --nproc must be >= 1, got {args.nproc}", file=sys.stderr)
        return 2
    if getattr(args, "nproc", 1) > 1 and not distributed.launched_by_torchrun():
        batch = getattr(args, "batch_size", None)
        if args.command != "eval" and batch and batch % args.nproc:
            print(f"pyprune {args.command}: error: --batch-size {batch} must be a multiple of --nproc {args.nproc}: "
                  "it is the global batch, split evenly between the processes", file=sys.stderr)
            return 2
        return distributed.launch(args.nproc, _without_nproc(argv))
    distributed.init_from_env()
    if not is_main():
        # every process runs the same program; only rank 0 speaks (errors still reach stderr)
        sys.stdout = open(os.devnull, "w")
    try:
        code = _run(args)
    except BaseException:
        distributed.shutdown(together=False)
        raise
    # after a failure or Ctrl-C the peers may be gone or never arrive: leave at once
    distributed.shutdown(together=code == 0)
    return code


def _run(args: argparse.Namespace) -> int:
    try:
        return args.func(args)
    except _user_errors() as exc:
        print(f"pyprune {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except VerificationError as exc:
        print(f"pyprune {args.command}: error: ONNX verification failed: {exc}", file=sys.stderr)
        return EXIT_UNVERIFIED
    except KeyboardInterrupt:
        hint = " (resume with the same command plus --resume)" if args.command == "compile" else ""
        print(f"interrupted{hint}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output piped into `head` and closed early: not an error. Point stdout at
        # devnull so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
