"""Export, verify, then write: a file lands at its path only once onnxruntime
has reproduced the PyTorch model on it (or when no verification was asked)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import ArrayDataset
from ..files import atomic_write
from .onnx_export import DEFAULT_OPSET, export_onnx
from .verify import DEFAULT_ATOL, Verification, VerificationError, verify_onnx


@dataclass
class OnnxReport:
    path: Path
    form: str
    bytes: int
    export: dict[str, Any]
    verification: Verification | None

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "form": self.form, "bytes": self.bytes, **self.export,
                "verified": self.verification is not None and self.verification.passed,
                "verification": self.verification.to_dict() if self.verification else None}

    def summary(self) -> str:
        text = f"wrote {self.path} ({self.form} form, opset {self.export['opset']}, {self.bytes:,} bytes"
        if self.export["codebook_tensors"]:
            text += f"; {self.export['codebook_tensors']} weights as codes + codebook"
        text += ")" + ("; not verified" if self.verification is None else "\n" + self.verification.summary())
        floats = self.export.get("float_weights") or []
        if floats:
            shown = "; ".join(f"{w['name']} {'x'.join(map(str, w['shape']))}: {w['reason']}" for w in floats[:3])
            more = f"; and {len(floats) - 3} more" if len(floats) > 3 else ""
            text += (f"\n{len(floats)} weights stayed float32 ({sum(w['bytes'] for w in floats):,} bytes): "
                     f"{shown}{more}")
        return text


def verification_inputs(dataset: ArrayDataset, n: int, mean: Sequence[float],
                        std: Sequence[float]) -> tuple[torch.Tensor, str]:
    """The first ``n`` images of ``dataset``, normalised as the model expects, and a
    description of them for the report."""
    n = min(n, len(dataset))
    inputs, _ = next(iter(dataset.subset(slice(0, n)).batches(n, mean, std)))
    return inputs, f"{dataset.name}[:{n}]"


def unverified_path(path: Path) -> Path:
    return path.with_name(f"{path.stem}.unverified{path.suffix or '.onnx'}")


def write_onnx(module: nn.Module, path: str | os.PathLike, form: str, input_shape: Sequence[int], *,
               inputs: torch.Tensor | None = None, data: str | None = None, atol: float = DEFAULT_ATOL,
               opset: int = DEFAULT_OPSET, meta: Mapping[str, Any] | None = None,
               sparse_initializers: bool = False, force: bool = False) -> OnnxReport:
    """Export ``module`` in ``form``, verify it on ``inputs`` (none: no verification)
    and write it to ``path``.

    Raises ``FileExistsError`` before any work when ``path`` exists and not
    ``force``; :class:`~.onnx_export.OnnxExportError` when the model cannot be
    exported; :class:`~.verify.VerificationError` when onnxruntime disagrees with
    PyTorch, after keeping the file as ``NAME.unverified.onnx`` for inspection."""
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; pass --force to overwrite it")
    exported = export_onnx(module, input_shape, form, opset=opset, meta=meta,
                           sparse_initializers=sparse_initializers)
    blob = exported.serialized()
    verification = None
    if inputs is not None:
        verification = verify_onnx(blob, module, inputs, atol, data=data)
        if not verification.passed:
            kept = atomic_write(unverified_path(path), lambda f: f.write(blob), force=True)
            raise VerificationError(verification, kept=str(kept))
    atomic_write(path, lambda f: f.write(blob), force=force)
    return OnnxReport(path, form, len(blob), exported.to_dict(), verification)
