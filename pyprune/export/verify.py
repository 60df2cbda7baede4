"""Check an exported ONNX model against the PyTorch model it came from, in
onnxruntime on the CPU: the same images through both, logits compared."""

from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from ..ir import in_mode
from .onnx_export import INPUT_NAME
from .settings import DEFAULT_ATOL, DEFAULT_IMAGES, Verification, VerificationError

_SHOWN = 10  # mismatching images named in a message


def session(model: bytes | str, threads: int | None = None, spinning: bool = True) -> ort.InferenceSession:
    """An onnxruntime CPU session with the default (full) graph optimizations.

    ``spinning=False`` stops the session's idle threads from busy-waiting after
    each run: a benchmark that alternates between sessions (or with PyTorch) needs
    it, or each contender runs against the previous one's spinning threads."""
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


@torch.inference_mode()
def verify_onnx(model: bytes | str, module: nn.Module, inputs: torch.Tensor, atol: float = DEFAULT_ATOL,
                batch_size: int = 64, data: str | None = None) -> Verification:
    """Run ``inputs`` (float32, already normalised, batch first) through the ONNX
    ``model`` (serialized bytes or a path) and through ``module`` in eval mode, and
    compare. Batches of ``batch_size`` exercise the dynamic batch axis."""
    if inputs.shape[0] == 0:
        raise ValueError("verification needs at least one image")
    if not atol >= 0:
        raise ValueError(f"atol must be >= 0, got {atol}")
    start = time.perf_counter()
    sess = session(model)
    ours, theirs = [], []
    with in_mode(module, training=False):
        for i in range(0, inputs.shape[0], batch_size):
            x = inputs[i:i + batch_size].contiguous()
            theirs.append(module(x).float().numpy())
            ours.append(sess.run(None, {INPUT_NAME: x.numpy()})[0])
    onnx_logits, torch_logits = np.concatenate(ours), np.concatenate(theirs)
    if onnx_logits.shape != torch_logits.shape:
        raise ValueError(f"onnxruntime gave logits of shape {onnx_logits.shape}, PyTorch {torch_logits.shape}")
    diff = np.abs(onnx_logits.astype(np.float64) - torch_logits.astype(np.float64))
    diff = diff.reshape(diff.shape[0], -1)
    # NaN anywhere counts as an infinite difference, not as "no difference"
    per_image = np.where(np.isnan(diff), np.inf, diff).max(axis=1)
    top1 = onnx_logits.reshape(len(per_image), -1).argmax(1) != torch_logits.reshape(len(per_image), -1).argmax(1)
    bad = np.flatnonzero(top1 | (per_image > atol))
    return Verification(n=len(per_image), atol=float(atol), max_abs_diff=float(per_image.max()),
                        top1_mismatches=int(top1.sum()), over_atol_images=int((per_image > atol).sum()),
                        mismatched_images=bad[:_SHOWN].tolist(), onnxruntime=ort.__version__,
                        seconds=time.perf_counter() - start, data=data)
