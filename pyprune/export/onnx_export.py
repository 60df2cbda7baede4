"""Export a model to ONNX in one of two forms, checked by ``onnx.checker``.

Both forms start from one ``torch.onnx.export(..., dynamo=True, optimize=False)``
of the model in eval mode, with a dynamic batch axis (input ``input``, output
``logits``) at opset 18 unless asked otherwise (17 at least), then run
onnxscript's optimizer (constant folding, BatchNorm folded into the conv before
it, dead code removed):

- ``dense``: every weight a float32 initializer.
- ``compact``: before the optimizer runs, the weights of Conv/Gemm layers become
  codes + codebook rebuilt by Gather (:mod:`.compact`); the optimizer is told to
  leave those nodes alone, and the BatchNorm after such a conv then stays a
  BatchNormalization node, because folding it would scale every output channel's
  values differently and undo the codebook.

With ``sparse_initializers`` the codes tensors that are smaller as ONNX sparse
initializers become sparse initializers. onnxruntime accepts that, but ONNX types
a sparse initializer as a sparse tensor, which Cast does not take, so the full
checker (with shape inference) rejects such a file and only the structural check
runs on it. Off by default for that reason.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import onnx
import onnx_ir as ir
import torch
from onnxscript.optimizer import optimize_ir
from torch import nn

from ..ir import in_mode
from ..version import __version__
from .settings import DEFAULT_OPSET, FORMS, MIN_OPSET, OnnxExportError
from .compact import REBUILDS_WEIGHT, CompactTensor, FloatWeight, encode_codebooks, float_weights, sparsify_initializers

INPUT_NAME, OUTPUT_NAME = "input", "logits"
# Example batch of 2: torch.export specialises a dimension whose example size is 0 or 1.
_EXAMPLE_BATCH = 2


@dataclass
class OnnxExport:
    """An exported model: its ``ModelProto`` and, for the compact form, what was coded."""

    proto: onnx.ModelProto
    form: str
    opset: int
    compact: list[CompactTensor] = field(default_factory=list)
    floats: list[FloatWeight] = field(default_factory=list)  # compact form: what it left float32, and why

    def serialized(self) -> bytes:
        return self.proto.SerializeToString()

    def to_dict(self) -> dict[str, Any]:
        sparse = [t for t in self.compact if t.sparse]
        return {"form": self.form, "opset": self.opset, "bytes": self.proto.ByteSize(),
                "codebook_tensors": len(self.compact), "sparse_initializers": len(sparse),
                "weights_fp32_bytes": sum(t.fp32_bytes for t in self.compact),
                "weights_bytes": sum(t.sparse_bytes if t.sparse else t.bytes for t in self.compact),
                "float_weights": [w.to_dict() for w in self.floats]}


_NO_FUNCTION = re.compile(r"No ONNX function found for <OpOverload\(op='([^']+)', overload='([^']+)'\)>")
_NODE = re.compile(r"Error when translating node (%\S+)")


def _explain(exc: BaseException, opset: int) -> str:
    """One message for the user out of the exporter's chained exceptions: the
    operator with no ONNX mapping when that is the cause, else the innermost error."""
    chain, seen = [], set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    text = "\n".join(str(c) for c in chain)
    op = _NO_FUNCTION.search(text)
    if op:
        name = op.group(1) if op.group(2) == "default" else f"{op.group(1)}.{op.group(2)}"
        node = _NODE.search(text)
        where = f" (graph node {node.group(1)})" if node else ""
        return (f"operator {name}{where} has no ONNX mapping at opset {opset}: replace it in the model, or "
                f"register an ONNX translation for it (torch.onnx.export's custom_translation_table)")
    inner = chain[-1]
    first = str(inner).strip().splitlines()[0] if str(inner).strip() else type(inner).__name__
    return f"torch.onnx.export failed: {type(inner).__name__}: {first}"


def _export_program(module: nn.Module, input_shape: Sequence[int], opset: int) -> ir.Model:
    example = torch.randn(_EXAMPLE_BATCH, *input_shape)
    batch = torch.export.Dim("batch", min=1)
    with in_mode(module, training=False):
        try:
            program = torch.onnx.export(module, (example,), None, dynamo=True, optimize=False, opset_version=opset,
                                        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                        dynamic_shapes=({0: batch},), verbose=False)
        except Exception as exc:  # the exporter raises many types; all end here with one message
            raise OnnxExportError(_explain(exc, opset)) from exc
    return program.model


def check_export_settings(form: str, opset: int) -> None:
    """Raise ``ValueError`` for a form or opset :func:`export_onnx` would refuse."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f"opset must be an integer >= {MIN_OPSET}, got {opset!r}")


def _strip_debug_info(proto: onnx.ModelProto) -> None:
    """Drop what a deployment never reads: the exporter's per-node provenance (FX
    node, stack trace, module path: a quarter of a compact ResNet-56's bytes) and
    intermediate value_info (shape inference recomputes it)."""
    for node in proto.graph.node:
        del node.metadata_props[:]
    del proto.graph.value_info[:]


def export_onnx(module: nn.Module, input_shape: Sequence[int], form: str = "dense", *,
                opset: int = DEFAULT_OPSET, meta: Mapping[str, Any] | None = None,
                sparse_initializers: bool = False) -> OnnxExport:
    """Export ``module`` (taking one float32 batch of ``input_shape`` images) to ONNX.

    ``meta`` goes into the model's ``metadata_props`` as JSON strings under
    ``pyprune.<key>`` (the CLI stores arch, mean, std and input_shape, so that a
    deployment knows how to normalise). Raises :class:`OnnxExportError` for a model
    the exporter cannot take, and ``ValueError`` for a bad ``form`` or ``opset``."""
    return export_onnx_forms(module, input_shape, (form,), opset=opset, meta=meta,
                             sparse_initializers=sparse_initializers)[form]


def export_onnx_forms(module: nn.Module, input_shape: Sequence[int], forms: Sequence[str] = FORMS, *,
                      opset: int = DEFAULT_OPSET, meta: Mapping[str, Any] | None = None,
                      sparse_initializers: bool = False) -> dict[str, OnnxExport]:
    """:func:`export_onnx` for several forms at the cost of one ``torch.export``
    (which is most of the time: 4 of 4.5 s for ResNet-56)."""
    for form in forms:
        check_export_settings(form, opset)
    exported = _export_program(module, input_shape, opset)
    # Every form starts from a fresh copy of the same serialized export, so a form's
    # file is the same bytes whichever call produced it (node names come from a
    # counter that deserialization restarts).
    serialized = ir.serde.serialize_model(exported)
    return {form: _finish(ir.serde.deserialize_model(serialized), form, opset, meta, sparse_initializers)
            for form in forms}


def _finish(model: ir.Model, form: str, opset: int, meta: Mapping[str, Any] | None,
            sparse_initializers: bool) -> OnnxExport:
    """Optimize the raw export into ``form``, add the metadata, check it."""
    # sparse initializers hold one code per byte; otherwise small codebooks pack two per byte
    compact = encode_codebooks(model, nibbles=not sparse_initializers) if form == "compact" else []
    floats = float_weights(model, compact) if form == "compact" else []
    # folding the rebuilt weights back into constants would undo the compact form
    optimize_ir(model, should_fold=lambda node: False if node.meta.get(REBUILDS_WEIGHT) else None)
    props = {"pyprune.version": __version__, "pyprune.form": form}
    props.update({f"pyprune.{k}": json.dumps(v) for k, v in (meta or {}).items()})
    model.metadata_props.update(props)
    proto = ir.serde.serialize_model(model)
    _strip_debug_info(proto)
    if compact and sparse_initializers:
        sparsify_initializers(proto, compact)
    try:
        onnx.checker.check_model(proto, full_check=not proto.graph.sparse_initializer)
    except onnx.checker.ValidationError as exc:
        raise OnnxExportError(f"the exported {form} model fails onnx.checker: {exc}") from exc
    return OnnxExport(proto, form, opset, compact, floats)
