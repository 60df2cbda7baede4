"""Argument groups shared by the subcommands, each defined once, and the helpers
that turn parsed arguments into the API's values."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import api

SPLITS = ("train", "val", "test", "test-search", "test-report")

MODEL_EPILOG = """\
Naming a model (the same for every subcommand):
  pyprune eval model.pt --arch resnet56          a checkpoint (state dict) for a zoo architecture
  pyprune eval --arch resnet56 --weights FILE     the same, as a flag
  pyprune eval --arch resnet56 --pretrained       the published checkpoint ($PYPRUNE_MODELS, cache, --download)
  pyprune info --arch resnet56                    random initialisation (seeded by --seed)
  pyprune eval --arch torchvision:resnet18 --weights FILE --num-classes 1000
                                                  a torchvision.models classifier, your weights (never downloads)
  pyprune info --arch mypkg.models:make_net       your own model class or factory
  pyprune eval model.pt2                          a torch.export program (torch.export.save): no --arch, nothing unpickled
  pyprune eval out/model.ppz                      a model pyprune wrote (.ppz or graph file): no --arch
  pyprune eval whole_model.pt --trust-pickle      a pickled nn.Module (unpickling runs code: trusted files only)

Data is found under --data-root, else $PYPRUNE_DATA, else ./data.
"""


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Help with each option's default, said once: not where the help text already
    says it, and not for flags and options whose absence is the default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, [], argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)".lstrip()


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def add_sgd_args(g: argparse._ArgumentGroup, batch_size: int | None = 128) -> None:
    """The optimiser settings every training command takes (``batch_size=None``: the
    command's data group already has --batch-size)."""
    g.add_argument("--lr", type=positive_float, default=0.01,
                   help="SGD learning rate at the start of the cosine schedule")
    if batch_size is not None:
        g.add_argument("--batch-size", type=positive_int, default=batch_size,
                       help="training images per SGD step (the global batch with --nproc)")


def add_model_args(p: argparse.ArgumentParser, traces: bool = False) -> None:
    """The model, named as every subcommand names it. ``traces``: the command traces
    the model with torch.fx, so it takes ``--leaf-module``."""
    g = p.add_argument_group("model")
    g.add_argument("model", nargs="?", metavar="MODEL",
                   help="model file: a torch.export program (.pt2) or a file pyprune wrote (.ppz, graph file), "
                        "alone; a state dict with --arch; a pickled module with --trust-pickle")
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
    add_max_decoded(g)
    if traces:
        g.add_argument("--leaf-module", action="append", default=[], metavar="NAME", dest="leaf_modules",
                       help="keep this module as one opaque call when tracing (repeatable): a class name "
                            "(Block), package.module:Class, or a submodule's qualified name (layer1.0). Use it "
                            "for a module torch.fx cannot trace. No channel is pruned across it; mask and quant "
                            "still reach its Conv and Linear layers; a file format that cannot describe its "
                            "class refuses to save it")


def add_max_decoded(g: argparse._ArgumentGroup | argparse.ArgumentParser) -> None:
    g.add_argument("--max-decoded-mb", type=positive_float, metavar="MB",
                   help="the most a .ppz file's tensors may decode to, checked before anything is allocated "
                        "(default: 1024 times the file's size, at least 256 MiB)")


def add_data_source(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--data", default="cifar10",
                   help="dataset name (cifar10), or imagefolder:PATH for images in PATH/{train,val}/<class>/")
    g.add_argument("--data-root", metavar="DIR", help="dataset folder (default: $PYPRUNE_DATA, else ./data)")


def add_data_args(p: argparse.ArgumentParser, split: str) -> None:
    """Where the images come from, which split, how many, in which batches."""
    g = p.add_argument_group("data")
    add_data_source(g)
    g.add_argument("--split", default=split, choices=SPLITS,
                   help="val is a fixed class-balanced 5,000-image hold-out of train; test-search and "
                        "test-report are the two fixed class-balanced halves of test that compile --val-from "
                        "test uses")
    g.add_argument("--limit", type=positive_int, metavar="N", help="use only the first N images of the split")
    g.add_argument("--batch-size", type=positive_int, default=500 if split != "train" else 128,
                   help="images per step" + (" of SGD (the global batch with --nproc)" if split == "train" else ""))


def add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=positive_int, metavar="N", help="torch intra-op threads (default: torch's choice)")


def add_run_args(p: argparse.ArgumentParser) -> None:
    add_threads(p)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_nproc(p)


def add_nproc(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="run as N processes under torchrun (DistributedDataParallel; gloo on CPUs, NCCL on GPUs): "
                        "a shortcut for `torchrun --standalone --nproc-per-node N -m pyprune ...`; only rank 0 "
                        "writes and prints; exits with the code of the first process that failed. See "
                        "docs/reference.md, Scaling out")


def add_sync_bn(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-sync-bn", action="store_true",
                   help="with several processes, BatchNorm layers in training take their statistics over each "
                        "process's own share of the batch (DDP's default; faster, but then the result depends on "
                        "the number of processes), not over the whole global batch")


def add_output(g: argparse._ArgumentGroup, metavar: str, help: str) -> None:
    g.add_argument("-o", "--output", required=True, metavar=metavar, help=help)
    g.add_argument("--force", action="store_true", help=f"overwrite {metavar} if it exists")


def data_spec(args: argparse.Namespace) -> api.DataSpec:
    return api.DataSpec(args.data, args.data_root, args.download)


def load(args: argparse.Namespace) -> api.LoadedModel:
    """The model the arguments name (see :func:`add_model_args`)."""
    # a fixed-size dataset refuses a model of another size when it is loaded, naming both
    return api.load_model(args.model, args.arch, args.weights, pretrained=args.pretrained,
                          download=args.download, trust_pickle=args.trust_pickle, seed=args.seed,
                          num_classes=args.num_classes, input_size=args.input_size,
                          leaf_modules=getattr(args, "leaf_modules", ()), max_decoded_mb=args.max_decoded_mb)


def refuse_existing_output(args: argparse.Namespace) -> None:
    """Before any work: an existing -o is kept unless --force says otherwise."""
    if Path(args.output).exists() and not args.force:
        raise FileExistsError(f"{args.output} exists; pass --force to overwrite it")
