"""Export to ONNX, dense or compact (codes + codebook), verified in onnxruntime."""

from .compact import CompactTensor, codebook_encoding, encode_codebooks, pack_nibbles, sparsify_initializers, stored_codes
from .onnx_export import (DEFAULT_OPSET, FORMS, MIN_OPSET, OnnxExport, OnnxExportError, check_export_settings,
                          export_onnx, export_onnx_forms)
from .verify import DEFAULT_ATOL, DEFAULT_IMAGES, Verification, VerificationError, session, verify_onnx
from .write import OnnxReport, unverified_path, verification_inputs, write_onnx

__all__ = ["CompactTensor", "DEFAULT_ATOL", "DEFAULT_IMAGES", "DEFAULT_OPSET", "FORMS", "MIN_OPSET", "OnnxExport",
           "OnnxExportError", "OnnxReport", "Verification", "VerificationError", "check_export_settings",
           "codebook_encoding", "encode_codebooks", "export_onnx", "export_onnx_forms", "session",
           "pack_nibbles", "sparsify_initializers", "stored_codes", "unverified_path", "verification_inputs", "verify_onnx", "write_onnx"]
