"""The compact ONNX form: weights as code indices into a small fp32 codebook.

A quantized layer's weight holds at most ``2**bits`` distinct non-zero values
plus zero, so it is stored as ``codes`` (uint8, or uint16 past 256 values, in
the weight's own shape) and a ``codebook`` (float32), and rebuilt in the graph
by ``Cast(codes -> int32) -> Gather(codebook, ., axis=0)`` in front of the Conv
or Gemm. Zero, where present, is always code 0, so a codes tensor is sparse
exactly where the weight is, which is what :func:`sparsify_initializers` uses.

Where the codebook has at most 16 entries (3-bit quantization plus zero, say), two
codes share a byte: ``packed`` (uint8, half as many elements, low nibble first) is
unpacked in the graph by ``BitwiseAnd(packed, 15)`` and ``BitShift(packed, 4)``,
interleaved (``Unsqueeze``, ``Concat``, ``Reshape``, ``Slice`` when the count is
odd) and reshaped to the weight's shape, before the same Cast and Gather. These are
opset-18 operators on constants, so onnxruntime folds them when it opens the
session like the rest. (ONNX's own UINT4 type needs opset 21, above the export's
default.)

onnxruntime folds the rebuilt weights back into constants when it opens the
session (graph optimization level "basic" and up), so the compact form runs
like the dense one; only the file is smaller.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Two codes (each < 16) per byte, the first in the low nibble; odd counts end with 0."""
    flat = codes.reshape(-1).astype(np.uint8)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)


def stored_codes(initializers: Mapping[str, np.ndarray], name: str, shape: Sequence[int]) -> np.ndarray | None:
    """The codes of coded weight ``name`` as a compact file stores them (one per byte,
    or two per byte), in the weight's shape; None when the weight is not coded."""
    if f"{name}.codes" in initializers:
        return initializers[f"{name}.codes"]
    if f"{name}.packed" not in initializers:
        return None
    packed = initializers[f"{name}.packed"]
    n = int(np.prod(shape))
    return np.stack([packed & 15, packed >> 4], 1).reshape(-1)[:n].reshape(shape).astype(np.uint8)


def _constant(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.type, value.shape = ir.TensorType(value.const_value.dtype), value.const_value.shape
    graph.register_initializer(value)
    return value


def _unpack_nodes(graph: ir.Graph, name: str, codes: np.ndarray) -> tuple[list[ir.Node], ir.Value]:
    """Nodes that rebuild ``codes`` (values < 16) from a packed initializer, and their output."""
    n = codes.size
    packed = _constant(graph, f"{name}.packed", pack_nibbles(codes))
    nodes = [ir.node("BitwiseAnd", [packed, _constant(graph, f"{name}.mask", np.array(15, np.uint8))],
                     name=f"{name}.low"),
             ir.node("BitShift", [packed, _constant(graph, f"{name}.shift", np.array(4, np.uint8))],
                     {"direction": "RIGHT"}, name=f"{name}.high")]
    axis = _constant(graph, f"{name}.axis", np.array([1], np.int64))
    nodes += [ir.node("Unsqueeze", [nodes[0].outputs[0], axis], name=f"{name}.low2"),
              ir.node("Unsqueeze", [nodes[1].outputs[0], axis], name=f"{name}.high2")]
    nodes.append(ir.node("Concat", [nodes[2].outputs[0], nodes[3].outputs[0]], {"axis": 1}, name=f"{name}.pairs"))
    nodes.append(ir.node("Reshape", [nodes[-1].outputs[0], _constant(graph, f"{name}.flat", np.array([-1], np.int64))],
                         name=f"{name}.interleave"))
    if n % 2:
        nodes.append(ir.node("Slice", [nodes[-1].outputs[0], _constant(graph, f"{name}.start", np.array([0], np.int64)),
                                       _constant(graph, f"{name}.end", np.array([n], np.int64))], name=f"{name}.trim"))
    nodes.append(ir.node("Reshape", [nodes[-1].outputs[0],
                                     _constant(graph, f"{name}.shape", np.array(codes.shape, np.int64))],
                         name=f"{name}.unpack"))
    for node_, suffix in zip(nodes, ("lo", "hi", "lo2", "hi2", "pairs", "interleaved", "trimmed", "codes")):
        node_.outputs[0].name = f"{name}.{suffix}"
    nodes[-1].outputs[0].name = f"{name}.codes"
    return nodes, nodes[-1].outputs[0]


def _should_encode(value: ir.Value) -> bool:
    return (value.is_initializer() and not value.is_graph_input() and value.const_value is not None
            and value.dtype == ir.DataType.FLOAT)


def _reads_weight(node: ir.Node, value: ir.Value) -> bool:
    return node.op_type in WEIGHT_OPS and node.domain in ("", "ai.onnx") and len(node.inputs) > 1 and \
        node.inputs[1] is value


def _weight_of(node: ir.Node) -> ir.Value | None:
    """The initializer that ``node`` reads as a layer weight: its input 1 if it is a
    Conv/Gemm/MatMul, or the input of a Transpose whose output one reads (how a
    ``Linear`` exports as MatMul), else None."""
    if node.op_type == "Transpose" and node.domain in ("", "ai.onnx") and node.inputs and node.inputs[0] is not None \
            and any(_reads_weight(use.node, node.outputs[0]) for use in node.outputs[0].uses()):
        return node.inputs[0]
    return node.inputs[1] if _reads_weight(node, node.inputs[1] if len(node.inputs) > 1 else None) else None


@dataclass
class FloatWeight:
    """A float32 tensor the compact form left as it was, and why."""

    name: str
    shape: tuple[int, ...]
    bytes: int
    reason: str

    def to_dict(self) -> dict:
        return {**asdict(self), "shape": list(self.shape)}


# Float tensors smaller than this (biases, norm scales) are not listed as left float.
FLOAT_REPORT_MIN_BYTES = 4096


def float_weights(model: ir.Model, coded: Sequence[CompactTensor]) -> list[FloatWeight]:
    """The float32 weights (2-d and up, at least :data:`FLOAT_REPORT_MIN_BYTES`) that
    the compact form did not code, largest first, each with the reason."""
    readers = {}
    for node in model.graph:
        weight = _weight_of(node)
        if weight is not None:
            readers[weight.name] = node.op_type
    done = {t.name for t in coded}
    out = []
    for name, value in model.graph.initializers.items():
        if name in done or value.const_value is None or value.dtype != ir.DataType.FLOAT:
            continue
        array = value.const_value.numpy()
        if array.nbytes < FLOAT_REPORT_MIN_BYTES or array.ndim < 2:  # biases and norm scales are not coded
            continue
        if name not in readers:
            reason = "not a Conv, Gemm or MatMul weight"
        else:
            distinct = np.unique(array).size
            reason = f"{distinct:,} distinct values: codes and codebook would not be smaller (not quantized?)"
        out.append(FloatWeight(name, tuple(array.shape), array.nbytes, reason))
    return sorted(out, key=lambda w: -w.bytes)


def encode_codebooks(model: ir.Model, nibbles: bool = True) -> list[CompactTensor]:
    """Replace, in place, every float32 weight initializer of a Conv/ConvTranspose/
    Gemm/MatMul (input 1, directly or through a Transpose) whose codebook form is
    smaller by codes + codebook + Cast + Gather; with ``nibbles``, codes of codebooks
    of at most 16 entries two per byte. Returns what was stored, in graph order."""
    graph = model.graph
    done: list[CompactTensor] = []
    for node in list(graph):
        weight = _weight_of(node)
        if weight is None or not _should_encode(weight):
            continue
        array = weight.const_value.numpy()
        encoded = codebook_encoding(array)
        if encoded is None:
            continue
        codebook, codes = encoded
        name = weight.name
        codebook_value = _constant(graph, f"{name}.codebook", codebook)
        unpack: list[ir.Node] = []
        if nibbles and codebook.size <= 16 and codes.size >= 2:
            unpack, codes_value = _unpack_nodes(graph, name, codes)
            code_dtype, code_bytes = "uint4x2", (codes.size + 1) // 2
        else:
            codes_value = _constant(graph, f"{name}.codes", codes)
            code_dtype, code_bytes = str(codes.dtype), codes.nbytes
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
        for node_ in (*unpack, cast, gather):
            node_.meta[REBUILDS_WEIGHT] = True
        graph.insert_before(first, [*unpack, cast, gather])
        done.append(CompactTensor(name, tuple(array.shape), int(codebook.size), code_dtype,
                                  array.size * 4, code_bytes + codebook.nbytes))
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
