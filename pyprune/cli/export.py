"""``pyprune export-onnx``: ONNX, dense or compact, verified in onnxruntime."""

from __future__ import annotations

import argparse
import json

from .. import api
from .args import MODEL_EPILOG, SPLITS, Formatter, add_data_source, add_model_args, add_threads, load

EPILOG = """
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


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-onnx", formatter_class=Formatter, epilog=MODEL_EPILOG + EPILOG,
                       help="export to ONNX (dense or compact form), verified in onnxruntime",
                       description="Export a model (a .ppz or anything eval takes) to ONNX, check it with "
                                   "onnx.checker, and verify it in onnxruntime against PyTorch on N images "
                                   "before writing it.")
    add_model_args(p)
    g = p.add_argument_group("export")
    g.add_argument("-o", "--output", required=True, metavar="FILE.onnx", help="where to write the ONNX file")
    g.add_argument("--form", choices=api.FORMS, default="compact",
                   help="compact: quantized weights as codes + codebook; dense: float32 weights (see below)")
    g.add_argument("--opset", type=int, default=api.DEFAULT_OPSET, help=f"ONNX opset (>= {api.MIN_OPSET})")
    g.add_argument("--sparse-initializers", action="store_true",
                   help="compact form: store a codes tensor as an ONNX sparse initializer where that is smaller "
                        "(below ~11%% density). onnxruntime accepts them; onnx.checker's full check does not "
                        "(ONNX types them as sparse tensors), so only its structural check runs")
    g.add_argument("--force", action="store_true", help="overwrite FILE.onnx if it exists")
    g.add_argument("--json", action="store_true", help="end the output with one JSON line of the result")
    g = p.add_argument_group("verification")
    g.add_argument("--verify", type=int, default=api.DEFAULT_IMAGES, metavar="N",
                   help="images to compare onnxruntime with PyTorch on (0: write without verifying)")
    g.add_argument("--atol", type=float, default=api.DEFAULT_ATOL, help="largest allowed |logit difference|")
    add_data_source(g)
    g.add_argument("--split", default="val", choices=SPLITS, help="split whose first N images are compared")
    add_threads(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    api.set_threads(args.threads)
    model = load(args)
    report = api.export_onnx(model, args.output, args.form, args.verify,
                             api.DataSpec(args.data, args.data_root, args.download), args.split, args.atol,
                             args.opset, args.sparse_initializers, args.force)
    print(report.summary())
    if args.json:
        print(json.dumps(report.to_dict()))
    return 0
