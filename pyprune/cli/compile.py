"""``pyprune compile``: the smallest model that meets an accuracy target."""

from __future__ import annotations

import argparse
import json

from .. import api
from .args import (MODEL_EPILOG, Formatter, add_data_source, add_model_args, add_nproc, add_sgd_args, add_sync_bn,
                   add_threads, load, positive_int)
from .present import history_line

EPILOG = """
Examples:
  pyprune compile --arch resnet56 --pretrained --max-drop 0.01 --val-from test -o out/
  pyprune compile model.pt --arch resnet20 --target-acc 0.80 --finetune-epochs 0.2 --budget-minutes 10 -o out/
  pyprune compile --arch resnet20 --pretrained --max-drop 0.01 --search grid \\
      --levels slim=0.2,0.4 mask=0.5,0.8 quant=8,5 -o grid/
  pyprune compile ... -o out/ --resume       # after Ctrl-C or a kill: finished candidates are not redone

Exit codes: 0 done (also when nothing beat the baseline: a warning says so, and
model.ppz holds the baseline packed losslessly); 2 bad input, or the baseline is
already below --target-acc (nothing is written); 3 model.onnx could not be exported
or failed verification (everything else is written; report.json says why);
130 interrupted (resume with --resume).
"""


def _levels_item(text: str) -> tuple[str, tuple]:
    """``NAME=V,V,...`` of ``--levels``."""
    name, eq, values = text.partition("=")
    if not eq:
        raise argparse.ArgumentTypeError(f"expected NAME=V,V,... (e.g. {api.searchable_passes()[0]}=0.1,0.2), "
                                         f"got {text!r}")
    try:
        return name.strip(), api.parse_levels(name.strip(), values)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _levels_of(name: str):
    def parse(text: str) -> tuple:
        try:
            return api.parse_levels(name, text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse


def _level_flags() -> list[tuple[str, str, str]]:
    """(flag, pass, option) for the passes whose knob keeps a flag of its own (--bits-levels)."""
    return [(p["knob"]["flag"], p["name"], p["knob"]["option"]) for p in api.list_passes()
            if p["knob"] and p["knob"]["flag"]]


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compile", formatter_class=Formatter, epilog=MODEL_EPILOG + EPILOG,
                       help="find the smallest model that meets an accuracy target",
                       description="Search how far to push channel slimming, magnitude pruning and codebook "
                                   "quantization (and in which order) so that the model still meets the target "
                                   "accuracy on the validation split, then store it with CSR + Huffman coding. "
                                   "Writes OUT/model.ppz, model.onnx (compact ONNX, verified in onnxruntime), "
                                   "report.json, report.md and pareto.png; the final model is "
                                   "evaluated once on the test split, which the search never sees.")
    add_model_args(p, traces=True)
    g = p.add_argument_group("target (one of)")
    t = g.add_mutually_exclusive_group(required=True)
    t.add_argument("--target-acc", type=float, metavar="A", help="absolute top-1 on the validation split, e.g. 0.93")
    t.add_argument("--max-drop", type=float, metavar="D",
                   help="accuracy points the model may lose against its own validation accuracy, measured "
                        "first (0.01: 92.5%% -> 91.5%%)")
    g = p.add_argument_group("search")
    g.add_argument("--search", choices=api.SEARCHES, default="marginal",
                   help="marginal: each technique alone, then all together, then moves that save the most bytes "
                        "per point of accuracy (see docs/reference.md, 'How the search works'); heuristic: stage "
                        "by stage, bisection per stage; grid: the brute-force baseline over every combination of the levels")
    g.add_argument("--order", default=",".join(api.DEFAULT_ORDER), metavar="STAGES",
                   help=f"stages in the order they run (any pass with a search knob: "
                        f"{', '.join(api.searchable_passes())}); Huffman storage is always last")
    g.add_argument("--explore-order", action="store_true",
                   help="compare every order of the stages on a cheap proxy (screening only) and use the best")
    g.add_argument("--levels", type=_levels_item, nargs="+", action="extend", default=argparse.SUPPRESS,
                   metavar="NAME=V,V",
                   help="the settings a stage searches, in place of its default ladder (`pyprune passes` lists "
                        "them), e.g. --levels slim=0.1,0.2 mask=0.8,0.9")
    for flag, name, option in _level_flags():
        g.add_argument(flag, type=_levels_of(name), metavar="V,V,...", dest=f"levels_alias_{name}",
                       default=argparse.SUPPRESS,
                       help=f"the same as --levels {name}=V,V,... ({option} values)")
    g.add_argument("--recover-margin", type=float, default=0.1, metavar="M",
                   help="fine-tune candidates whose screened accuracy is at most M below the target (grows with the "
                        "recovery fine-tuning shows)")
    g.add_argument("--recovery-model", choices=api.RECOVERY_MODELS, default="additive",
                   help="how the marginal search expects fine-tuning to recover a screened candidate: additive "
                        "(default) measures candidates whose screen is within --recover-margin of the target, a "
                        "margin that becomes 1.5x the most fine-tuning has recovered; proportional expects "
                        "fine-tuning to win back a share of each candidate's own screened drop (the most seen so "
                        "far, 0.5 before that), so larger moves are tried, and starts from a bolder first setting; the "
                        "per-layer step judges its screens the same way")
    g.add_argument("--budget-minutes", type=float, metavar="M",
                   help="stop searching after M minutes and keep the best verified model so far")
    g = p.add_argument_group("training")
    g.add_argument("--finetune-epochs", type=float, default=0.1, metavar="E",
                   help="fine-tuning per deciding candidate (may be fractional; 0: recalibrate BatchNorm only)")
    g.add_argument("--distill", type=float, default=0.5, metavar="W",
                   help="knowledge distillation from the uncompressed model in every fine-tune: the share W of "
                        "the loss taken from its softened outputs (default 0.5; 0 trains on labels only)")
    g.add_argument("--no-distill", dest="distill", action="store_const", const=0.0, help="same as --distill 0")
    g.add_argument("--distill-temperature", type=float, default=4.0, metavar="T",
                   help="softmax temperature of distillation (default 4)")
    g.add_argument("--max-effort", type=int, metavar="K",
                   help="the most fine-tuning of one candidate, in multiples of --finetune-epochs (a power of "
                        "two; default 8 with --budget-minutes, 1 without): a candidate that missed the target by "
                        "a little is trained on at twice its fine-tuning at once, and when no move is left the "
                        "untaken moves are retried with 2x, 4x, ... up to K (1: never)")
    g.add_argument("--gradual-mask", action=argparse.BooleanOptionalAction, default=False,
                   help="a deciding candidate that masks reaches its zeros during its fine-tune, on Zhu & Gupta's "
                        "cubic schedule, instead of all at once before it; passes after the mask then get half "
                        "the epochs (bench/gradual_mask.py compares the two; default: off)")
    g.add_argument("--no-per-layer", dest="per_layer", action="store_false",
                   help="keep one setting per technique: do not push single layers further after the search "
                        "(by default every layer but the stem, the classifier and 1x1 convolutions is screened "
                        "one step further, and the best bytes per point are measured together)")
    g.add_argument("--final-epochs", type=float, default=0.0, metavar="E",
                   help="fine-tune the chosen model E more epochs after the search, kept only if it still meets "
                        "the target (the budget keeps time back for it)")
    g.add_argument("--continue-lr", type=float, default=None, metavar="LR",
                   help="peak learning rate of a fine-tune that continues from a model this search already "
                        "fine-tuned, and of --final-epochs: a settled model restarted at --lr can lose accuracy "
                        "(bench/README.md, ResNet-56 with an hour; default: --lr)")
    g.add_argument("--slim-l1", type=float, default=0.0, metavar="S",
                   help="let the search try network slimming's sparsity training (L1 on BatchNorm gammas) first; "
                        "it is used only if it lets slimming go further")
    g.add_argument("--l1-epochs", type=float, default=1.0, metavar="E", help="epochs of sparsity training")
    add_sgd_args(g)
    g.add_argument("--train-limit", type=positive_int, metavar="N", help="fine-tune on the first N training images only")
    g.add_argument("--screen-steps", type=int, default=0, metavar="N",
                   help="recover every screen with N fine-tuning steps (constraints kept, distilled) before it is "
                        "measured, so screens estimate what a fine-tune reaches rather than what recalibration "
                        "alone gives (default 0: recalibration only; each step costs about one training batch)")
    g.add_argument("--measure-from", choices=api.MEASURE_FROM, default="accepted",
                   help="where the marginal search's deciding measurements start: accepted (default) fine-tunes "
                        "the most compressed model already accepted further, carrying its training forward; "
                        "baseline applies every pass of the setting to the uncompressed model and fine-tunes that, "
                        "as the grid does (no restarted learning rate on settled weights, no codebook of a codebook)")
    g.add_argument("--recal-images", type=int, default=1024, metavar="N",
                   help="training images used to recalibrate BatchNorm statistics after each pass")
    g = p.add_argument_group("data")
    add_data_source(g)
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
    g.add_argument("--no-onnx", dest="onnx", action="store_false",
                   help="do not write OUT/model.onnx: skips its export and verification (a third of a compile of "
                        "a small model on few images); `pyprune export-onnx OUT/model.ppz --form compact -o OUT/model.onnx` writes it later")
    g.add_argument("--onnx-verify", type=int, default=api.DEFAULT_IMAGES, metavar="N",
                   help="validation images on which OUT/model.onnx (compact ONNX form) is checked against PyTorch "
                        "in onnxruntime (0: written unverified)")
    g.add_argument("--keep-batchnorm", action="store_true",
                   help="write model.ppz with its BatchNorm layers as they are (trainable) instead of folded for "
                        "inference (into the layer before, or as a float16/float32 scale and shift after a layer "
                        "whose weights share a codebook), which is the default where the target still holds")
    g.add_argument("--quiet", action="store_true", help="no progress bars and no per-candidate lines")
    g.add_argument("--json", action="store_true", help="end the output with one JSON line summarising the result")
    add_threads(p)
    add_nproc(p)
    add_sync_bn(p)
    p.set_defaults(func=run)


def levels(args: argparse.Namespace) -> dict[str, tuple]:
    """``--levels`` and the per-pass flags, merged; a stage given twice is an error."""
    out: dict[str, tuple] = {}
    given = list(getattr(args, "levels", [])) + [(name, getattr(args, f"levels_alias_{name}")) for _, name, _ in _level_flags()
                                 if getattr(args, f"levels_alias_{name}", None)]
    for name, values in given:
        if name in out:
            raise ValueError(f"levels of {name} are given twice (--levels {name}=... and its own flag?)")
        out[name] = values
    return out


def run(args: argparse.Namespace) -> int:
    config = api.CompileConfig(
        api.Target(args.target_acc, args.max_drop), args.output, search=args.search,
        order=tuple(s.strip() for s in args.order.split(",") if s.strip()), explore_order=args.explore_order,
        levels=levels(args), finetune_epochs=args.finetune_epochs, slim_l1=args.slim_l1, l1_epochs=args.l1_epochs,
        budget_minutes=args.budget_minutes, val_from=args.val_from, val_limit=args.val_limit,
        screen_limit=args.screen_limit, test_limit=args.test_limit, train_limit=args.train_limit,
        recal_images=args.recal_images, margin=args.recover_margin,
        train=api.TrainConfig(lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                              sync_batchnorm=not args.no_sync_bn),
        data=api.DataSpec(args.data, args.data_root, args.download), resume=args.resume, force=args.force,
        quiet=args.quiet, onnx=args.onnx, onnx_verify=args.onnx_verify, fold_batchnorm=not args.keep_batchnorm,
        distill=args.distill, distill_temperature=args.distill_temperature, final_epochs=args.final_epochs,
        continue_lr=args.continue_lr, max_effort=args.max_effort, per_layer=args.per_layer, gradual_mask=args.gradual_mask,
        screen_steps=args.screen_steps, measure_from=args.measure_from, recovery=args.recovery_model)
    api.set_threads(args.threads)
    model = load(args)
    history = history_line(model)
    if history and not getattr(args, "quiet", False):
        print(history)
    result = api.compile_model(model, config)
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
