"""The compact ONNX form: weights as code indices into a small fp32 codebook.

A quantized layer's weight holds at most ``2**bits`` distinct non-zero values
plus zero, so it is stored as ``codes`` (uint8, or uint16 past 256 values, in
the weight's own shape) and a ``codebook`` (float32), and rebuilt in the graph
by ``Cast(codes -> int32) -> Gather(codebook, ., axis=0)`` in front of the Conv
or Gemm. Zero, where present, is always code 0, so a codes tensor is sparse
exactly where the weight is, which is what :func:`sparsify_initializers` uses.

onnxruntime folds the rebuilt weights back into constants when it opens the
session (graph optimization level "basic" and up), so the compact form runs
like the dense one; only the file is smaller.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

# Operators whose input 1 is a weight the codebook may carry.
WEIGHT_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
REBUILDS_WEIGHT = "pyprune.rebuilds_weight"  # node meta key of the Cast and Gather this module adds
_SPARSE_INDEX_BYTES = 8  # onnx.checker accepts only int64 indices in a SparseTensorProto


@dataclass
class CompactTensor:
    """How one weight was stored in the compact form."""

    name: str
    shape: tuple[int, ...]
    codebook_size: int
    code_dtype: str
    fp32_bytes: int
    bytes: int  # codes + codebook, dense
    sparse: bool = False  # codes moved to a sparse initializer by sparsify_initializers
    sparse_bytes: int | None = None

    def to_dict(self) -> dict:
        return {**asdict(self), "shape": list(self.shape)}


def codebook_encoding(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``(codebook, codes)`` with ``codebook[codes] == weight`` exactly, zero as code 0,
    or ``None`` when codes and codebook together would not be smaller than fp32."""
    values, inverse = np.unique(weight, return_inverse=True)
    if values.size > 1 << 16:
        return None
    code_dtype = np.uint8 if values.size <= 1 << 8 else np.uint16
    if weight.size * np.dtype(code_dtype).itemsize + values.size * 4 >= weight.size * 4:
        return None
    # Put 0.0 first so that the zeros of the weight are the zeros of the codes.
    order = np.argsort(values != 0, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    codes = rank[inverse.reshape(weight.shape)].astype(code_dtype)
    return values[order].astype(np.float32), codes


def _should_encode(value: ir.Value) -> bool:
    return (value.is_initializer() and not value.is_graph_input() and value.const_value is not None
            and value.dtype == ir.DataType.FLOAT)


def encode_codebooks(model: ir.Model) -> list[CompactTensor]:
    """Replace, in place, every float32 weight initializer of a Conv/ConvTranspose/
    Gemm/MatMul (input 1) whose codebook form is smaller by codes + codebook +
    Cast + Gather. Returns what was stored, in graph order."""
    graph = model.graph
    done: list[CompactTensor] = []
    for node in list(graph):
        if node.op_type not in WEIGHT_OPS or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        weight = node.inputs[1]
        if weight is None or not _should_encode(weight):
            continue
        array = weight.const_value.numpy()
        encoded = codebook_encoding(array)
        if encoded is None:
            continue
        codebook, codes = encoded
        name = weight.name
        codebook_value = ir.Value(name=f"{name}.codebook", const_value=ir.tensor(codebook, name=f"{name}.codebook"))
        codes_value = ir.Value(name=f"{name}.codes", const_value=ir.tensor(codes, name=f"{name}.codes"))
        for v in (codebook_value, codes_value):
            v.type, v.shape = ir.TensorType(v.const_value.dtype), v.const_value.shape
            graph.register_initializer(v)
        cast = ir.node("Cast", [codes_value], {"to": ir.DataType.INT32}, name=f"{name}.cast")
        cast.outputs[0].name = f"{name}.indices"
        gather = ir.node("Gather", [codebook_value, cast.outputs[0]], {"axis": 0}, name=f"{name}.gather")
        rebuilt = gather.outputs[0]
        rebuilt.type, rebuilt.shape = weight.type, weight.shape
        # Rebuild in front of the weight's first reader in graph order, which need not be this node.
        readers = {id(use.node) for use in weight.uses()}
        first = next(n for n in graph if id(n) in readers)
        weight.replace_all_uses_with(rebuilt)
        graph.initializers.pop(name)
        rebuilt.name = name  # the rebuilt weight keeps the weight's name in the graph
        cast.meta[REBUILDS_WEIGHT] = gather.meta[REBUILDS_WEIGHT] = True
        graph.insert_before(first, [cast, gather])
        done.append(CompactTensor(name, tuple(array.shape), int(codebook.size), str(codes.dtype),
                                  array.size * 4, codes.nbytes + codebook.nbytes))
    return done


def sparsify_initializers(proto: onnx.ModelProto, tensors: list[CompactTensor]) -> None:
    """Move each codes tensor into ``graph.sparse_initializer`` (linear int64
    indices, values of the non-zero codes) where that is smaller than dense codes.

    onnxruntime (1.32, CPU) accepts sparse initializers and densifies them at load,
    with int16, int32 or int64 indices; onnx.checker allows int64 only, so the
    index costs 8 bytes per non-zero and this pays off only below ~11% density for
    uint8 codes."""
    by_name = {t.name + ".codes": t for t in tensors}
    keep = []
    for init in proto.graph.initializer:
        t = by_name.get(init.name)
        if t is None:
            keep.append(init)
            continue
        codes = numpy_helper.to_array(init).reshape(-1)
        nonzero = np.flatnonzero(codes)
        sparse_bytes = nonzero.size * (codes.itemsize + _SPARSE_INDEX_BYTES)
        if sparse_bytes >= codes.nbytes:
            keep.append(init)
            continue
        values = numpy_helper.from_array(codes[nonzero], init.name)
        indices = numpy_helper.from_array(nonzero.astype(np.int64), f"{init.name}.indices")
        proto.graph.sparse_initializer.append(onnx.helper.make_sparse_tensor(values, indices, list(init.dims)))
        t.sparse, t.sparse_bytes = True, sparse_bytes + (t.bytes - codes.nbytes)
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)
