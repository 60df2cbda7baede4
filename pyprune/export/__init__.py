"""Export to ONNX, dense or compact (codes + codebook), verified in onnxruntime.

The settings, errors and the verification record load at once (:mod:`.settings`);
the exporter and the verifier, which need onnx, onnx_ir and onnxruntime (about a
second to import), load when one of their names is first used, so that commands that
never export do not pay for them."""

from __future__ import annotations

import importlib
from typing import Any

from .settings import (DEFAULT_ATOL, DEFAULT_IMAGES, DEFAULT_OPSET, FORMS, MIN_OPSET, OnnxExportError, Verification,
                       VerificationError)

_LAZY = {
    "compact": ("CompactTensor", "FloatWeight", "codebook_encoding", "encode_codebooks", "float_weights",
                "pack_nibbles", "sparsify_initializers", "stored_codes"),
    "onnx_export": ("OnnxExport", "check_export_settings", "export_onnx", "export_onnx_forms"),
    "verify": ("session", "verify_onnx"),
    "write": ("OnnxReport", "unverified_path", "verification_inputs", "write_onnx"),
}
_HOME = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


__all__ = ["DEFAULT_ATOL", "DEFAULT_IMAGES", "DEFAULT_OPSET", "FORMS", "MIN_OPSET", "OnnxExportError", "Verification",
           "VerificationError", *_HOME]
