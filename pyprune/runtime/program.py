"""The runtime graph lowered to a native program: one call runs the whole model.

At batch 1 a compressed model's layers take tens of microseconds each, and running the
runtime's ``torch.fx`` graph adds a Python module call and an argument parse per node.
:func:`lower` turns that graph into a ``pyprune._C.Program`` (``csrc/cpu/program.cpp``):
a straight-line list of steps over numbered value slots, each a sparse kernel or an ATen
operator called through the dispatcher with its weights bound as constants.

Each node kind has its lowering in a registry (:data:`MODULE_LOWERINGS` by module type,
:data:`FUNCTION_LOWERINGS` by function, :data:`METHOD_LOWERINGS` by method name); a node
without one, or one whose arguments a lowering does not handle, leaves the model on the
``torch.fx`` graph, with the reason in the plan. The lanes layout's modules have no
lowering: the program serves batches below the batched kernels' threshold, where the
per-node cost matters most.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.ao.nn.intrinsic import ConvReLU2d, LinearReLU

from .. import _native
from ..ir import output_shape
from ..ir.modules import ChannelAffine
from .modules import SparseConv2d, SparseLinear


class NotLowerable(Exception):
    """A node the program cannot run; the message says which and why."""


Arg = tuple[str, Any]  # ("slot", i), ("slots", [i, ...]) or ("const", value)


@dataclass(frozen=True)
class _Slot:
    """A value a step already computed, as an argument of the next one (no node names it)."""

    slot: int


@dataclass
class _Step:
    kind: str  # "op", "conv" or "linear"
    out: int
    reads: list[int]
    spec: dict[str, Any]


@dataclass
class ProgramBuilder:
    """Steps over slots, built node by node; :meth:`finish` makes the native program."""

    gm: fx.GraphModule
    slots: dict[fx.Node, int] = field(default_factory=dict)
    constants: dict[fx.Node, Any] = field(default_factory=dict)
    steps: list[_Step] = field(default_factory=list)
    count: int = 0

    def new_slot(self) -> int:
        self.count += 1
        return self.count - 1

    def arg(self, value: Any) -> Arg:
        """One argument: a node's slot (or its constant), a list of nodes, or a constant."""
        if isinstance(value, _Slot):
            return "slot", value.slot
        if isinstance(value, fx.Node):
            if value in self.constants:
                return "const", self.constants[value]
            if value not in self.slots:
                raise NotLowerable(f"{value.name} has no value the program holds")
            return "slot", self.slots[value]
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, fx.Node) for v in value):
            return "slots", [self.arg(v)[1] for v in value]
        if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
            return "const", value
        if isinstance(value, (list, tuple)) and all(type(v) is int for v in value):
            return "const", list(value)
        raise NotLowerable(f"argument {value!r} is neither a value nor a constant the program takes")

    def op(self, name: str, args: list[Any], overload: str = "") -> int:
        """A step calling ``aten::name.overload`` on ``args`` (nodes or constants);
        returns the slot of its result."""
        lowered = [self.arg(a) for a in args]
        out = self.new_slot()
        reads = [i for kind, v in lowered if kind != "const" for i in (v if kind == "slots" else [v])]
        self.steps.append(_Step("op", out, reads, {"name": f"aten::{name}", "overload": overload, "args": lowered}))
        return out

    def sparse(self, kind: str, x: fx.Node, spec: dict[str, Any], residual: fx.Node | None = None) -> int:
        """A sparse convolution (``kind="conv"``) or linear step on ``x``."""
        inp = self.arg(x)
        if inp[0] != "slot":
            raise NotLowerable(f"sparse {kind} of a constant")
        reads = [inp[1]]
        if kind == "conv":
            res = self.arg(residual) if residual is not None else ("slot", -1)
            if res[0] != "slot":
                raise NotLowerable("a constant residual")
            spec = dict(spec, residual=res[1])
            reads += [res[1]] if res[1] >= 0 else []
        out = self.new_slot()
        self.steps.append(_Step(kind, out, reads, dict(spec, input=inp[1])))
        return out

    def finish(self, input_slot: int, output_slot: int) -> Any:
        """The native program: each step releases the slots no later step reads."""
        last: dict[int, int] = {}
        for i, step in enumerate(self.steps):
            for s in step.reads:
                last[s] = i
        release: list[list[int]] = [[] for _ in self.steps]
        for s, i in last.items():
            if s != output_slot:
                release[i].append(s)
        for i, step in enumerate(self.steps):  # results nothing reads
            if step.out not in last and step.out != output_slot:
                release[i].append(step.out)
        program = _native.cpu().Program(self.count, input_slot)
        for step, free in zip(self.steps, release):
            if step.kind == "op":
                program.add_op(step.spec["name"], step.spec["overload"], step.spec["args"], step.out, free)
            elif step.kind == "conv":
                program.add_sparse_conv(**step.spec, out=step.out, release=free)
            else:
                program.add_sparse_linear(**step.spec, out=step.out, release=free)
        program.set_output(output_slot)
        return program


Lowering = Callable[[ProgramBuilder, fx.Node, Any], int]


def _weights(layer: SparseConv2d | SparseLinear) -> dict[str, Any]:
    rowptr, colidx, values = layer.csr.kernel_args()
    extra = layer.csr.kernel_kwargs()
    return {"rowptr": rowptr, "colidx": colidx, "values": values, "bias": layer.bias,
            "gap_bits": extra.get("gap_bits", 0), "row_scale": extra.get("row_scale")}


def _sparse_conv(b: ProgramBuilder, node: fx.Node, m: SparseConv2d) -> int:
    residual = node.args[1] if len(node.args) > 1 else node.kwargs.get("residual")
    relu = m.relu or (residual is not None and m.relu_after_residual)
    spec = dict(_weights(m), kernel_size=tuple(m.csr.kernel_size), stride=m.stride, padding=m.padding,
                dilation=m.dilation, relu=relu)
    return b.sparse("conv", node.args[0], spec, residual)


def _sparse_linear(b: ProgramBuilder, node: fx.Node, m: SparseLinear) -> int:
    return b.sparse("linear", node.args[0], dict(_weights(m), relu=m.relu))


def _conv_of(b: ProgramBuilder, x: Any, conv: nn.Conv2d) -> int:
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise NotLowerable(f"convolution padding {conv.padding!r} mode {conv.padding_mode}")
    return b.op("conv2d", [x, conv.weight.detach(), None if conv.bias is None else conv.bias.detach(),
                           list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups])


def _linear_of(b: ProgramBuilder, x: Any, linear: nn.Linear) -> int:
    return b.op("linear", [x, linear.weight.detach(), None if linear.bias is None else linear.bias.detach()])


def _relu_after(b: ProgramBuilder, slot: int) -> int:
    return b.op("relu_", [_Slot(slot)])


def _channel_affine(b: ProgramBuilder, node: fx.Node, m: ChannelAffine) -> int:
    shape = output_shape(node.args[0])
    if shape is None:
        raise NotLowerable(f"{node.name}: no input shape")
    view = (1, -1) + (1,) * (len(shape) - 2)
    scale, shift = m.scale.detach().float().reshape(view), m.shift.detach().float().reshape(view)
    return b.op("addcmul", [shift, node.args[0], scale])


def _max_pool(b: ProgramBuilder, node: fx.Node, m: nn.MaxPool2d) -> int:
    if m.return_indices:
        raise NotLowerable(f"{node.name}: max pooling that returns indices")
    stride = m.stride if m.stride is not None else m.kernel_size
    return b.op("max_pool2d", [node.args[0], _pair(m.kernel_size), _pair(stride), _pair(m.padding),
                               _pair(m.dilation), m.ceil_mode])


def _alias(b: ProgramBuilder, value: Any) -> int:
    """The slot of ``value`` itself, for a node that passes its input on unchanged."""
    kind, slot = b.arg(value)
    if kind != "slot":
        raise NotLowerable(f"{value} is not a value the program computes")
    return slot


def _pair(v: Any) -> list[int]:
    return list(v) if isinstance(v, (tuple, list)) else [v, v]


MODULE_LOWERINGS: dict[type[nn.Module], Lowering] = {
    SparseConv2d: _sparse_conv,
    SparseLinear: _sparse_linear,
    nn.Conv2d: lambda b, n, m: _conv_of(b, n.args[0], m),
    nn.Linear: lambda b, n, m: _linear_of(b, n.args[0], m),
    ConvReLU2d: lambda b, n, m: _relu_after(b, _conv_of(b, n.args[0], m[0])),
    LinearReLU: lambda b, n, m: _relu_after(b, _linear_of(b, n.args[0], m[0])),
    # An in-place ReLU stays in place: later readers of its input see what eager mode shows them.
    nn.ReLU: lambda b, n, m: b.op("relu_" if m.inplace else "relu", [n.args[0]]),
    ChannelAffine: _channel_affine,
    nn.AdaptiveAvgPool2d: lambda b, n, m: b.op("adaptive_avg_pool2d", [n.args[0], _pair(m.output_size)]),
    nn.AvgPool2d: lambda b, n, m: b.op("avg_pool2d", [n.args[0], _pair(m.kernel_size),
                                                       _pair(m.stride if m.stride is not None else m.kernel_size),
                                                       _pair(m.padding), m.ceil_mode, m.count_include_pad,
                                                       m.divisor_override]),
    nn.MaxPool2d: _max_pool,
    nn.Flatten: lambda b, n, m: b.op("flatten", [n.args[0], m.start_dim, m.end_dim], "using_ints"),
    nn.Identity: lambda b, n, m: _alias(b, n.args[0]),
    nn.Dropout: lambda b, n, m: _alias(b, n.args[0]),  # the runtime is in eval mode
}


def _add(b: ProgramBuilder, node: fx.Node) -> int:
    if len(node.args) != 2 or node.kwargs or not all(isinstance(a, fx.Node) for a in node.args):
        raise NotLowerable(f"{node.name}: only the sum of two values is lowered")
    # += stays in place, as for the ReLU
    return b.op("add_" if node.target is operator.iadd else "add", list(node.args), "Tensor")


def _flatten(b: ProgramBuilder, node: fx.Node) -> int:
    call = dict(zip(("input", "start_dim", "end_dim"), node.args), **node.kwargs)
    return b.op("flatten", [call["input"], call.get("start_dim", 0), call.get("end_dim", -1)], "using_ints")


def _pad(b: ProgramBuilder, node: fx.Node) -> int:
    call = dict(zip(("input", "pad", "mode", "value"), node.args), **node.kwargs)
    if call.get("mode", "constant") != "constant":
        raise NotLowerable(f"{node.name}: padding mode {call['mode']}")
    return b.op("constant_pad_nd", [call["input"], list(call["pad"]), call.get("value") or 0.0])


def _getitem(b: ProgramBuilder, node: fx.Node) -> int:
    x, index = node.args
    index = index if isinstance(index, tuple) else (index,)
    if not all(isinstance(i, slice) for i in index) or not isinstance(x, fx.Node) or output_shape(x) is None:
        raise NotLowerable(f"{node.name}: only slicing a tensor is lowered")
    value: Any = x
    for dim, s in enumerate(index):
        if s == slice(None):
            continue
        value = _Slot(b.op("slice", [value, dim, s.start, s.stop, 1 if s.step is None else s.step], "Tensor"))
    return value.slot if isinstance(value, _Slot) else _alias(b, x)


def _cat(b: ProgramBuilder, node: fx.Node) -> int:
    call = dict(zip(("tensors", "dim"), node.args), **node.kwargs)
    return b.op("cat", [list(call["tensors"]), call.get("dim", 0)])


def _relu_fn(b: ProgramBuilder, node: fx.Node) -> int:
    inplace = node.kwargs.get("inplace", node.args[1] if len(node.args) > 1 else False)
    if set(node.kwargs) - {"inplace"} or len(node.args) > 2 or not isinstance(inplace, bool):
        raise NotLowerable(f"{node.name}: relu with arguments")
    return b.op("relu_" if inplace else "relu", [node.args[0]])


FUNCTION_LOWERINGS: dict[Any, Callable[[ProgramBuilder, fx.Node], int]] = {
    operator.add: _add,
    torch.add: _add,
    operator.iadd: _add,
    torch.flatten: _flatten,
    F.pad: _pad,
    operator.getitem: _getitem,
    torch.cat: _cat,
    F.relu: _relu_fn,
    torch.relu: _relu_fn,
}

METHOD_LOWERINGS: dict[str, Callable[[ProgramBuilder, fx.Node], int]] = {
    "relu": _relu_fn,
    "add": _add,
    "flatten": _flatten,
}


def _lower_node(b: ProgramBuilder, node: fx.Node) -> int:
    if node.op == "call_module":
        module = b.gm.get_submodule(node.target)
        lowering = MODULE_LOWERINGS.get(type(module))
        if lowering is None:
            raise NotLowerable(f"{node.name}: no lowering for {type(module).__name__}")
        return lowering(b, node, module)
    table = FUNCTION_LOWERINGS if node.op == "call_function" else METHOD_LOWERINGS
    lowering = table.get(node.target)
    if lowering is None:
        raise NotLowerable(f"{node.name}: no lowering for {getattr(node.target, '__name__', node.target)}")
    return lowering(b, node)


def _attribute(gm: fx.GraphModule, target: str) -> Any:
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value.detach() if isinstance(value, torch.Tensor) else value


def lower(gm: fx.GraphModule) -> tuple[Any | None, str]:
    """``(program, "")`` for a graph every node of which has a lowering, else
    ``(None, why not)``. The program runs ``gm``'s forward on one float32 tensor."""
    try:
        native = _native.cpu()
    except ImportError as e:
        return None, f"no native extension ({e})"
    if not hasattr(native, "Program"):
        return None, "the native extension has no Program"
    b = ProgramBuilder(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        return None, f"{len(placeholders)} inputs (the program takes one)"
    input_slot = b.slots[placeholders[0]] = b.new_slot()
    try:
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "get_attr":
                b.constants[node] = _attribute(gm, node.target)
                continue
            if node.op == "output":
                result = node.args[0]
                if not isinstance(result, fx.Node):
                    raise NotLowerable("the output is not one tensor")
                kind, output_slot = b.arg(result)
                if kind != "slot":
                    raise NotLowerable("the output is a constant")
                return b.finish(input_slot, output_slot), ""
            b.slots[node] = _lower_node(b, node)
    except NotLowerable as e:
        return None, str(e)
    return None, "the graph has no output"


__all__ = ["FUNCTION_LOWERINGS", "METHOD_LOWERINGS", "MODULE_LOWERINGS", "NotLowerable", "ProgramBuilder", "lower"]
