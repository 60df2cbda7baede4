"""The ``pyprune`` program: the parser assembled from one table of subcommands,
and ``main``, which runs one under torchrun when asked and turns the errors that
are the user's to fix into one line and an exit code."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from .. import api, distributed
from ..version import __version__
from . import compile, evaluate, export, info, inspect, opt, passes, train
from .args import MODEL_EPILOG, Formatter

EXIT_FAILED = 1  # the run could not go on (a process of an --nproc run could not join the others)
EXIT_USAGE = 2  # bad input: flags, files, data, models
EXIT_UNVERIFIED = 3  # the ONNX file does not reproduce the model
EXIT_INTERRUPTED = 130

# In the order `pyprune --help` lists them.
COMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    info.add_parsers, evaluate.add_parsers, train.add_parsers, opt.add_parsers, compile.add_parsers,
    export.add_parsers, inspect.add_parsers, passes.add_parsers, info.add_models_parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyprune", formatter_class=Formatter, epilog=MODEL_EPILOG,
        description="A compiler for CNN compression: structured channel slimming plus deep "
                    "compression, driven by a target accuracy.")
    parser.add_argument("--version", action="version", version=f"pyprune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


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
    parser = build_parser()
    if not argv:  # the list of commands says more than "required: COMMAND"
        parser.print_help()
        return EXIT_USAGE
    args = parser.parse_args(argv)
    if getattr(args, "nproc", 1) < 1:
        print(f"pyprune {args.command}: error: --nproc must be >= 1, got {args.nproc}", file=sys.stderr)
        return EXIT_USAGE
    if getattr(args, "nproc", 1) > 1 and not distributed.launched_by_torchrun():
        batch = getattr(args, "batch_size", None)
        if args.command != "eval" and batch and batch % args.nproc:
            print(f"pyprune {args.command}: error: --batch-size {batch} must be a multiple of --nproc {args.nproc}: "
                  "it is the global batch, split evenly between the processes", file=sys.stderr)
            return EXIT_USAGE
        return distributed.launch(args.nproc, _without_nproc(argv))
    try:
        distributed.init_from_env()
    except distributed.JoinError as exc:
        print(f"pyprune {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if not distributed.is_main():
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
    except api.USER_ERRORS as exc:
        print(f"pyprune {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except api.VerificationError as exc:
        print(f"pyprune {args.command}: error: ONNX verification failed: {exc}", file=sys.stderr)
        return EXIT_UNVERIFIED
    except KeyboardInterrupt:
        hint = " (resume with the same command plus --resume)" if args.command == "compile" else ""
        print(f"interrupted{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Output piped into `head` and closed early: not an error. Point stdout at
        # devnull so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:
        # After BrokenPipeError, itself an OSError. A full disk, a permission, a
        # read-only folder: one line that names the path.
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"pyprune {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
