"""ONNX export of a compiled ResNet-56: file sizes of every form, agreement with
PyTorch, and onnxruntime latency of the dense and compact forms.

Sizes: the uncompressed pretrained ResNet-56 and the compiled model as fp32 ``.pt``
state dicts (``torch.save``), the dense and compact ONNX files (and the compact one
with sparse initializers), and the ``.ppz``; each also zlib-compressed (level 9),
for what a generic compressor adds.

Agreement: each ONNX form in onnxruntime (CPU) against PyTorch on the same weights,
on the first ``--verify`` val images (the check ``export-onnx`` runs) and on the
whole test split (top-1 accuracy and identical predictions).

Latency: onnxruntime sessions (default graph optimizations, ``--threads`` intra-op
threads) of both forms and PyTorch eager on the compiled and the original model,
at batch 1 and 64 on one random input. The two sessions take turns within each
repeat (interleaved medians), so load from other processes hits them alike, and so
do the two PyTorch models; the groups are timed one after the other. Sessions run
with thread spinning off and apart from PyTorch, because otherwise each contender
runs against the busy-waiting threads of the one before (the compact form then
looked 2.8x slower than the dense one at batch 1, with identical optimized graphs).
The
time to open each session (where the compact form's Gather nodes are folded) is
reported too.

    python bench/onnx_export.py [--ppz runs/resnet56-final/model.ppz] [--threads 2]

Without the .ppz it uses the stand-in of bench/end_to_end.py and says so.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from _measure import interleaved_medians, table
from end_to_end import DEFAULT_PPZ, compiled_or_stand_in
from pyprune.api import load_model
from pyprune.data import Normalize, load_dataset
from pyprune.export import export_onnx, export_onnx_forms, session, verification_inputs, verify_onnx


def pt_bytes(module: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return buffer.getvalue()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ppz", type=Path, default=DEFAULT_PPZ, help="compiled ResNet-56 (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--verify", type=int, default=256, help="val images for the export-onnx check")
    p.add_argument("--test-limit", type=int, default=None, help="test images for accuracy (default: all)")
    p.add_argument("--repeats", type=int, default=0, help="timed runs (default: 50 at batch 1, 10 at 64)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:  # the stand-in, when there is one, lives here
        path, note = compiled_or_stand_in(args.ppz, Path(tmp))
        ppz = path.read_bytes()
        compiled = load_model(str(path))
    print(note)
    print(f"torch {torch.__version__}, {args.threads} threads")
    original = load_model(arch="resnet56", pretrained=True)
    original.module.eval()
    module = compiled.module.eval()

    start = time.perf_counter()
    forms = export_onnx_forms(module, compiled.input_shape)
    export_seconds = time.perf_counter() - start
    dense, compact = forms["dense"].serialized(), forms["compact"].serialized()
    with_sparse = export_onnx(module, compiled.input_shape, "compact", sparse_initializers=True)
    sparse = with_sparse.serialized()
    print(f"both forms exported from one torch.export in {export_seconds:.1f}s; compact: "
          f"{len(forms['compact'].compact)} weights as codes + codebook; with sparse initializers: "
          f"{with_sparse.to_dict()['sparse_initializers']} codes tensors sparse")

    files = {"original ResNet-56, fp32 .pt (state dict)": pt_bytes(original.module),
             "compiled, fp32 .pt (state dict, decoded)": pt_bytes(module),
             "compiled, dense ONNX": dense, "compiled, compact ONNX": compact,
             "compiled, compact ONNX + sparse initializers": sparse, "compiled, .ppz": ppz}
    base = len(files["original ResNet-56, fp32 .pt (state dict)"])
    rows = [(name, f"{len(b):,}", f"{base / len(b):.2f}x", f"{len(zlib.compress(b, 9)):,}")
            for name, b in files.items()]
    print("\n" + table(("file", "bytes", "smaller than the original .pt", "zlib -9 bytes"), rows))

    val = load_dataset("cifar10", "val", limit=args.verify)
    x_val, described = verification_inputs(val, args.verify, compiled.mean, compiled.std)
    test = load_dataset("cifar10", "test", limit=args.test_limit)
    x_test = Normalize(compiled.mean, compiled.std)(test.images)
    labels = test.labels.numpy()
    with torch.inference_mode():
        torch_pred = np.concatenate([module(x_test[i:i + 500]).argmax(1).numpy() for i in range(0, len(test), 500)])
    rows = []
    sessions = {}
    for name, blob in (("dense", dense), ("compact", compact), ("compact + sparse initializers", sparse)):
        check = verify_onnx(blob, module, x_val, data=described)
        opened = time.perf_counter()
        sess = sessions[name] = session(blob, threads=args.threads, spinning=False)
        open_ms = (time.perf_counter() - opened) * 1e3
        pred = np.concatenate([sess.run(None, {"input": x_test[i:i + 500].numpy()})[0].argmax(1)
                               for i in range(0, len(test), 500)])
        rows.append((name, described, f"{check.max_abs_diff:.2g}", f"{check.top1_mismatches}",
                     "passed" if check.passed else "FAILED", f"{(pred == labels).mean():.4f}",
                     f"{(pred == torch_pred).sum()}/{len(test)}", f"{open_ms:.0f}"))
    print(f"\nPyTorch top-1 on cifar10/test ({len(test)} images): {(torch_pred == labels).mean():.4f}")
    print(table(("ONNX form", "verified on", "max abs logit diff", "top-1 differs", "check",
                 f"ORT test top-1 ({len(test)})", "same prediction as PyTorch", "session open ms"), rows))

    rows = []
    for batch in (1, 64):
        x = torch.randn(batch, *compiled.input_shape)
        feed = {"input": x.numpy()}
        # Two groups, timed one after the other: PyTorch's OpenMP threads busy-wait after
        # each call too, and would slow whichever session ran next.
        groups = [{"PyTorch eager, original ResNet-56": lambda: original.module(x),
                   "PyTorch eager, compiled (as loaded)": lambda: module(x)},
                  {"onnxruntime, dense ONNX": lambda: sessions["dense"].run(None, feed),
                   "onnxruntime, compact ONNX": lambda: sessions["compact"].run(None, feed)}]
        repeats = args.repeats or (50 if batch == 1 else 10)
        timed = {}
        with torch.inference_mode():
            for group in groups:
                timed.update(zip(group, interleaved_medians(list(group.values()), repeats=repeats, warmup=3)))
        reference = timed["onnxruntime, dense ONNX"]
        for name, s in timed.items():
            rows.append((name, str(batch), f"{s * 1e3:.2f}", f"{batch / s:,.0f}", f"{reference / s:.2f}x"))
    print("\n" + table(("runs", "batch", "ms/batch (median)", "images/s", "speed vs dense ONNX"), rows))


if __name__ == "__main__":
    main()
