"""Raising a ``torch.export`` program into the graph IR.

torch.export records ATen ops (``aten.conv2d``, ``aten.batch_norm``, ...) and passes
every weight in as a graph input. The passes, the file formats and the accounting work
on the IR that symbolic tracing gives: ``Conv2d``/``BatchNorm2d``/``Linear`` modules at
their qualified names, torch functions and tensor methods. :func:`raise_exported`
rebuilds that IR with one handler per ATen op (:data:`RAISERS`):

* an op that takes a parameter (conv, batch norm, linear, layer norm) becomes a call
  of a module at the parameter's qualified name (``layer1.0.conv1.weight`` gives
  module ``layer1.0.conv1``), holding the exported tensors;
* an op that a one-op ``torch.nn`` module emitted (``nn.ReLU``, ``nn.MaxPool2d``, ...,
  known from the node's module stack) becomes a call of that module at its path
  (:data:`ONE_OP_MODULES`);
* anything else becomes the torch function or tensor method tracing would record.

So a model exported from the zoo raises to the graph that ``--arch`` traces, node for
node and name for name. An op with no handler is refused with its name and the module
it came from, all of them at once; the raised graph is checked against the program on
one random input before it is returned.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils import _pytree as pytree

if TYPE_CHECKING:
    from torch.export import ExportedProgram

__all__ = ["ExportRaiseError", "ONE_OP_MODULES", "RAISERS", "raise_exported", "input_shape_of"]

aten = torch.ops.aten

# the ``end`` torch.export records for an open slice (x[:, ::2])
_OPEN_END = 2 ** 63 - 1


class ExportRaiseError(ValueError):
    """The program holds something the graph IR cannot express; the message names it."""


Raiser = Callable[["_Builder", fx.Node], Any]


@dataclass
class _Builder:
    """The IR under construction: ``graph`` over modules in ``root``; ``env`` maps each
    program node to its value in the new graph (a node, a constant, or a tuple of them)."""

    ep: ExportedProgram
    graph: fx.Graph = field(default_factory=fx.Graph)
    root: nn.Module = field(default_factory=nn.Module)
    env: dict[fx.Node, Any] = field(default_factory=dict)
    state: dict[str, tuple[str, torch.Tensor, bool]] = field(default_factory=dict)  # arg -> (fqn, tensor, is_param)
    attrs: dict[str, fx.Node] = field(default_factory=dict)

    # -- program inputs -------------------------------------------------------
    def fqn(self, node: Any) -> str | None:
        """The qualified name of the parameter or buffer ``node`` stands for."""
        entry = self.state.get(node.name) if isinstance(node, fx.Node) else None
        return entry[0] if entry else None

    def tensor(self, node: Any) -> torch.Tensor | None:
        entry = self.state.get(node.name) if isinstance(node, fx.Node) else None
        return entry[1] if entry else None

    def value(self, arg: Any) -> Any:
        """``arg`` (of a program node) in the new graph; a weight not owned by a module
        is read with ``get_attr``, as tracing reads a free parameter."""
        def one(n: fx.Node) -> Any:
            if n in self.env:
                held = self.env[n]
                if isinstance(held, _TransposedWeight):  # read by something other than a Linear
                    held = self.env[n] = held.materialize(self)
                return held
            if n.name in self.state:
                return self.get_attr(n)
            raise ExportRaiseError(f"node {n.name} is used before it is defined")
        return fx.node.map_aggregate(arg, lambda a: one(a) if isinstance(a, fx.Node) else a)

    def get_attr(self, n: fx.Node) -> fx.Node:
        fqn, t, is_param = self.state[n.name]
        if fqn not in self.attrs:
            parent, _, leaf = fqn.rpartition(".")
            owner = self._container(parent)
            if is_param:
                owner.register_parameter(leaf, nn.Parameter(t.detach().contiguous(), requires_grad=t.requires_grad))
            else:
                owner.register_buffer(leaf, t.detach().contiguous())
            self.attrs[fqn] = self.graph.get_attr(fqn)
        return self.attrs[fqn]

    # -- modules ------------------------------------------------------------
    def _container(self, path: str) -> nn.Module:
        owner = self.root
        for part in filter(None, path.split(".")):
            if not hasattr(owner, part):
                owner.add_module(part, nn.Module())
            owner = getattr(owner, part)
            if not isinstance(owner, nn.Module):
                raise ExportRaiseError(f"{path!r} names both a tensor and a module")
        return owner

    def add_module(self, path: str, module: nn.Module) -> bool:
        """Put ``module`` at ``path``; False if another, different module is there."""
        try:
            existing = self.root.get_submodule(path)
        except AttributeError:
            existing = None
        if existing is not None:
            return type(existing) is type(module) and repr(existing) == repr(module) and \
                all(torch.equal(a, b) for a, b in zip(existing.state_dict().values(), module.state_dict().values()))
        parent, _, leaf = path.rpartition(".")
        self._container(parent).add_module(leaf, module)
        return True

    def call_module(self, path: str, module: nn.Module, *args: Any) -> fx.Node | None:
        if not self.add_module(path, module):
            return None
        return self.graph.call_module(path, tuple(self.value(a) for a in args))

    def call_function(self, fn: Callable[..., Any], args: tuple, kwargs: dict | None = None) -> fx.Node:
        return self.graph.call_function(fn, self.value(args), self.value(kwargs or {}))

    def call_method(self, name: str, args: tuple, kwargs: dict | None = None) -> fx.Node:
        return self.graph.call_method(name, self.value(args), self.value(kwargs or {}))


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``index`` (or keyword ``name``) of an ATen call, as the schema defaults it."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _tuple(value: Any) -> Any:
    """A size list as the tuple modules and tracing hold; a list of tensors stays a list."""
    return tuple(value) if isinstance(value, list) and not any(isinstance(v, fx.Node) for v in value) else value


def _shape(node: Any) -> tuple | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _owner(b: _Builder, weight: fx.Node, *others: Any) -> str:
    """The module path a parameterised op lives at: its weight's qualified name less
    ``.weight``; the other tensors must sit beside it (``.bias``, ``.running_mean``...)."""
    fqn = b.fqn(weight)
    if fqn is None or not fqn.endswith(".weight") and fqn != "weight":
        raise ExportRaiseError(f"its weight {weight.name if isinstance(weight, fx.Node) else weight!r} is not a "
                               "module's .weight parameter (a functional call on a free tensor)")
    path = fqn[:-len("weight")].rstrip(".")
    for other, suffix in others:
        if other is not None and b.fqn(other) != (f"{path}.{suffix}" if path else suffix):
            raise ExportRaiseError(f"its {suffix} is {b.fqn(other)!r}, not beside {fqn!r}")
    if not path:
        raise ExportRaiseError("its weight belongs to the top-level module")
    return path


def _fill(module: nn.Module, tensors: dict[str, torch.Tensor | None]) -> nn.Module:
    for name, t in tensors.items():
        if t is not None:
            getattr(module, name).data = t.detach().contiguous().clone()
    return module


# -- parameterised ops: modules at their weight's name ------------------------

def _conv2d(b: _Builder, node: fx.Node) -> fx.Node:
    x, w, bias = node.args[0], node.args[1], _arg(node, 2, "bias")
    weight = b.tensor(w)
    path = _owner(b, w, (bias, "bias"))
    stride, padding = _tuple(_arg(node, 3, "stride", 1)), _tuple(_arg(node, 4, "padding", 0))
    if node.target is aten.convolution.default:  # core ATen: (..., dilation, transposed, output_padding, groups)
        if node.args[6] or weight is None or weight.dim() != 4:
            raise ExportRaiseError("only 2-d, non-transposed convolutions are read")
        dilation, groups = _tuple(node.args[5]), node.args[8]
    else:
        dilation, groups = _tuple(_arg(node, 5, "dilation", 1)), _arg(node, 6, "groups", 1)
    out_c, in_per_group, *kernel = weight.shape
    conv = nn.Conv2d(in_per_group * groups, out_c, tuple(kernel), stride=stride, padding=padding,
                     dilation=dilation, groups=groups, bias=bias is not None)
    _fill(conv, {"weight": weight, "bias": b.tensor(bias)})
    return _module_or_refuse(b, node, path, conv, x)


def _batch_norm(b: _Builder, node: fx.Node) -> Any:
    no_training = node.target is aten._native_batch_norm_legit_no_training.default
    x, w, bias, mean, var = node.args[:5]
    training = False if no_training else _arg(node, 5, "training", False)
    momentum = _arg(node, 5, "momentum", 0.1) if no_training else _arg(node, 6, "momentum", 0.1)
    eps = _arg(node, 6, "eps", 1e-5) if no_training else _arg(node, 7, "eps", 1e-5)
    if training:
        raise ExportRaiseError("a BatchNorm runs in training mode: export the model after model.eval()")
    if w is None:
        raise ExportRaiseError("a BatchNorm without affine weights")
    path = _owner(b, w, (bias, "bias"), (mean, "running_mean"), (var, "running_var"))
    rank = len(_shape(x) or (0, 0, 0, 0))
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d}.get(rank)
    if cls is None:
        raise ExportRaiseError(f"a BatchNorm over a {rank}-d input")
    weight = b.tensor(w)
    bn = cls(weight.numel(), eps=eps, momentum=momentum, affine=True, track_running_stats=mean is not None)
    tracked = b.ep.state_dict.get(f"{path}.num_batches_tracked")
    _fill(bn, {"weight": weight, "bias": b.tensor(bias), "running_mean": b.tensor(mean),
               "running_var": b.tensor(var), "num_batches_tracked": tracked})
    out = _module_or_refuse(b, node, path, bn, x)
    return (out, None, None) if no_training else out


def _linear(b: _Builder, node: fx.Node) -> fx.Node:
    x, w, bias = node.args[0], node.args[1], _arg(node, 2, "bias")
    weight = b.tensor(w)
    path = _owner(b, w, (bias, "bias"))
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    _fill(lin, {"weight": weight, "bias": b.tensor(bias)})
    return _module_or_refuse(b, node, path, lin, x)


@dataclass
class _TransposedWeight:
    """A 2-d weight read transposed (core ATen writes ``nn.Linear`` as
    ``addmm(bias, x, permute(weight))``): held back until a matrix product reads it,
    and made a plain permute for any other reader."""

    weight: fx.Node
    node: fx.Node

    def materialize(self, b: _Builder) -> fx.Node:
        return b.call_method("permute", (self.weight, 1, 0))


def _permute(b: _Builder, node: fx.Node) -> Any:
    source = node.args[0]
    dims = list(node.args[1]) if node.target is aten.permute.default else [1, 0]
    if b.fqn(source) is not None and dims == [1, 0] and node.users and \
            all(u.target in (aten.addmm.default, aten.mm.default) for u in node.users):
        return _TransposedWeight(source, node)
    return b.call_method("permute", (source, *dims))


def _matmul(b: _Builder, node: fx.Node) -> fx.Node:
    """``addmm(bias, x, weight.T)`` and ``mm(x, weight.T)``: an ``nn.Linear``."""
    bias, x, wt = (node.args[0], node.args[1], node.args[2]) if node.target is aten.addmm.default else \
        (None, node.args[0], node.args[1])
    held = b.env.get(wt) if isinstance(wt, fx.Node) else None
    if not isinstance(held, _TransposedWeight) or _arg(node, 3, "beta", 1) != 1 or _arg(node, 4, "alpha", 1) != 1:
        raise ExportRaiseError("a matrix product that is not a Linear layer (weight.T, no scaling)")
    weight = b.tensor(held.weight)
    path = _owner(b, held.weight, (bias, "bias"))
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    _fill(lin, {"weight": weight, "bias": b.tensor(bias)})
    return _module_or_refuse(b, node, path, lin, x)


def _layer_norm(b: _Builder, node: fx.Node) -> fx.Node:
    x, shape = node.args[0], tuple(node.args[1])
    w, bias, eps = _arg(node, 2, "weight"), _arg(node, 3, "bias"), _arg(node, 4, "eps", 1e-5)
    if w is None:
        return b.call_function(F.layer_norm, (x, shape), {"eps": eps})
    path = _owner(b, w, (bias, "bias"))
    ln = nn.LayerNorm(shape, eps=eps, elementwise_affine=True, bias=bias is not None)
    _fill(ln, {"weight": b.tensor(w), "bias": b.tensor(bias)})
    return _module_or_refuse(b, node, path, ln, x)


def _module_or_refuse(b: _Builder, node: fx.Node, path: str, module: nn.Module, x: Any) -> fx.Node:
    out = b.call_module(path, module, x)
    if out is None:
        raise ExportRaiseError(f"module {path!r} is called twice with different settings")
    return out


# -- one-op torch.nn modules, known from the module stack ---------------------

def _square(size: Any) -> Any:
    # nn.MaxPool2d(2) and (2, 2) record the same op, and tracing keeps what the module
    # was built with, which the program does not say: the common spelling wins.
    size = _tuple(size)
    return size[0] if isinstance(size, tuple) and size and len(set(size)) == 1 else size


def _pool_args(node: fx.Node, ceil_index: int) -> dict[str, Any]:
    kernel = _square(node.args[1])
    stride = _square(_arg(node, 2, "stride", [])) or kernel
    return {"kernel_size": kernel, "stride": stride, "padding": _square(_arg(node, 3, "padding", 0)),
            "ceil_mode": _arg(node, ceil_index, "ceil_mode", False)}


def _max_pool(node: fx.Node) -> nn.Module:
    return nn.MaxPool2d(dilation=_square(_arg(node, 4, "dilation", 1)), **_pool_args(node, 5))


def _avg_pool(node: fx.Node) -> nn.Module | None:
    if _arg(node, 6, "divisor_override") is not None:
        return None
    return nn.AvgPool2d(count_include_pad=_arg(node, 5, "count_include_pad", True), **_pool_args(node, 4))


ONE_OP_MODULES: dict[str, dict[Any, Callable[[fx.Node], nn.Module | None]]] = {
    "ReLU": {aten.relu.default: lambda n: nn.ReLU(), aten.relu_.default: lambda n: nn.ReLU(inplace=True)},
    "ReLU6": {aten.hardtanh.default: lambda n: nn.ReLU6() if tuple(n.args[1:3]) == (0.0, 6.0) else None,
              aten.hardtanh_.default: lambda n: nn.ReLU6(inplace=True) if tuple(n.args[1:3]) == (0.0, 6.0)
              else None},
    "SiLU": {aten.silu.default: lambda n: nn.SiLU(), aten.silu_.default: lambda n: nn.SiLU(inplace=True)},
    "Hardswish": {aten.hardswish.default: lambda n: nn.Hardswish(),
                  aten.hardswish_.default: lambda n: nn.Hardswish(inplace=True)},
    "Hardsigmoid": {aten.hardsigmoid.default: lambda n: nn.Hardsigmoid(),
                    aten.hardsigmoid_.default: lambda n: nn.Hardsigmoid(inplace=True)},
    "Sigmoid": {aten.sigmoid.default: lambda n: nn.Sigmoid()},
    "Tanh": {aten.tanh.default: lambda n: nn.Tanh()},
    "GELU": {aten.gelu.default: lambda n: nn.GELU(approximate=n.kwargs.get("approximate", "none"))},
    "Dropout": {aten.dropout.default: lambda n: nn.Dropout(n.args[1]),
                aten.dropout_.default: lambda n: nn.Dropout(n.args[1], inplace=True)},
    "MaxPool2d": {aten.max_pool2d.default: _max_pool},
    "AvgPool2d": {aten.avg_pool2d.default: _avg_pool},
    "AdaptiveAvgPool2d": {aten.adaptive_avg_pool2d.default: lambda n: nn.AdaptiveAvgPool2d(_square(n.args[1]))},
    "Flatten": {aten.flatten.using_ints: lambda n: nn.Flatten(_arg(n, 1, "start_dim", 0), _arg(n, 2, "end_dim", -1))},
}
"""``torch.nn`` modules that emit exactly one ATen op, by class name: for each op they
may emit, how to rebuild the module from that op's arguments (None: it cannot be)."""


def _lift_leaf(b: _Builder, node: fx.Node) -> fx.Node | None:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    path, type_name = list(stack.values())[-1]
    type_name = type_name if isinstance(type_name, str) else f"{type_name.__module__}.{type_name.__qualname__}"
    module_name, _, cls = type_name.rpartition(".")
    if not module_name.startswith("torch.nn.modules") or not path:
        return None
    build = ONE_OP_MODULES.get(cls, {}).get(node.target)
    module = build(node) if build else None
    out = b.call_module(path, module, node.args[0]) if module is not None else None
    if out is not None and node.target.overloadpacket.__name__.endswith("_"):  # in place: later readers see the result
        b.env[node.args[0]] = out
    return out


# -- functions and methods ----------------------------------------------------

def _function(fn: Callable[..., Any], arity: int | None = None,
              kwargs: Iterable[tuple[int, str, Any]] = (), **fixed: Any) -> Raiser:
    """The op as ``fn(*args[:arity], **fixed)``, with argument ``index`` passed as
    keyword ``name`` when it differs from ``default``."""
    def raise_(b: _Builder, node: fx.Node) -> fx.Node:
        args = tuple(_tuple(a) for a in (node.args if arity is None else node.args[:arity]))
        kw = {name: _arg(node, i, name, d) for i, name, d in kwargs if _arg(node, i, name, d) != d}
        return b.call_function(fn, args, {**kw, **fixed})
    return raise_


def _identity(b: _Builder, node: fx.Node) -> Any:
    return b.value(node.args[0])


def _dropout(b: _Builder, node: fx.Node) -> Any:
    if _arg(node, 2, "train", False):
        raise ExportRaiseError("a dropout runs in training mode: export the model after model.eval()")
    return b.value(node.args[0])


def _binary(op: Callable[..., Any], torch_op: Callable[..., Any]) -> Raiser:
    def raise_(b: _Builder, node: fx.Node) -> fx.Node:
        alpha = node.kwargs.get("alpha", 1)
        if alpha != 1:
            return b.call_function(torch_op, tuple(node.args[:2]), {"alpha": alpha})
        return b.call_function(op, tuple(node.args[:2]))
    return raise_


def _in_place(raiser: Raiser) -> Raiser:
    """An in-place op raised as its out-of-place form; later readers of the mutated
    input read the result instead, which is what they saw in the program."""
    def raise_(b: _Builder, node: fx.Node) -> Any:
        out = raiser(b, node)
        if isinstance(node.args[0], fx.Node):
            b.env[node.args[0]] = out
        return out
    return raise_


def _slice(b: _Builder, node: fx.Node) -> fx.Node:
    x, dim = node.args[0], _arg(node, 1, "dim", 0)
    start, end, step = _arg(node, 2, "start"), _arg(node, 3, "end"), _arg(node, 4, "step", 1)
    rank = len(_shape(x) or ())
    dim = dim % rank if rank else dim
    one = slice(None if start in (None, 0) else start, None if end in (None, _OPEN_END) else end,
                None if step == 1 else step)
    src = b.value(x)
    # x[:, :, ::2, ::2] is one getitem when traced and a slice per dim when exported
    if isinstance(src, fx.Node) and src.op == "call_function" and src.target is operator.getitem and \
            len(x.users) == 1 and isinstance(src.args[1], tuple) and len(src.args[1]) <= dim and \
            all(isinstance(s, slice) for s in src.args[1]):
        index = src.args[1] + (slice(None),) * (dim - len(src.args[1])) + (one,)
        src.args = (src.args[0], index)
        return src
    return b.graph.call_function(operator.getitem, (src, (slice(None),) * dim + (one,)))


def _reshape(b: _Builder, node: fx.Node) -> fx.Node:
    x = node.args[0]
    into, source = _shape(node), _shape(x)
    if into and source and all(isinstance(d, int) for d in into[1:]) and str(into[0]) == str(source[0]):
        # the batch size is the example's; -1 keeps the graph good for any batch
        return b.call_method("reshape", (x, -1, *into[1:]))
    return b.call_method("reshape", (x, *_tuple(node.args[1])))


def _getitem(b: _Builder, node: fx.Node) -> Any:
    src, index = b.value(node.args[0]), node.args[1]
    if isinstance(src, tuple):
        if src[index] is None and node.users:  # batch norm's saved statistics: exported, never read
            raise ExportRaiseError(f"output {index} of {node.args[0].name} is used")
        return src[index]
    return b.graph.call_function(operator.getitem, (src, index))


def _max_pool_with_indices(b: _Builder, node: fx.Node) -> tuple:
    kw = _pool_args(node, 5)
    return (b.call_function(F.max_pool2d, (node.args[0],), {**kw, "dilation": _tuple(_arg(node, 4, "dilation", 1))}),
            None)


def _mean(b: _Builder, node: fx.Node) -> fx.Node:
    keepdim = _arg(node, 2, "keepdim", False)
    return b.call_method("mean", (node.args[0], list(node.args[1])), {"keepdim": True} if keepdim else {})


def _pad(b: _Builder, node: fx.Node) -> fx.Node:
    return b.call_function(F.pad, (node.args[0], _tuple(node.args[1])),
                           {"mode": _arg(node, 2, "mode", "constant"), "value": _arg(node, 3, "value")})


def _constant_pad(b: _Builder, node: fx.Node) -> fx.Node:
    value = _arg(node, 2, "value", 0)
    return b.call_function(F.pad, (node.args[0], _tuple(node.args[1])),
                           {"mode": "constant", "value": None if value == 0 else value})


def _hardtanh(b: _Builder, node: fx.Node) -> fx.Node:
    low, high = _arg(node, 1, "min_val", -1.0), _arg(node, 2, "max_val", 1.0)
    kw = {"inplace": True} if node.target is aten.hardtanh_.default else {}
    if (low, high) == (0.0, 6.0):
        return b.call_function(F.relu6, (node.args[0],), kw)
    return b.call_function(F.hardtanh, (node.args[0], low, high), kw)


def _softmax(b: _Builder, node: fx.Node) -> fx.Node:
    return b.call_function(torch.softmax, (node.args[0], node.args[1]))


def _sym_size(b: _Builder, node: fx.Node) -> fx.Node:
    return b.call_method("size", (node.args[0], node.args[1]))


def _dropped(b: _Builder, node: fx.Node) -> None:
    return None


def _with_in_place(op: Any, fn: Callable[..., Any]) -> list[tuple[Any, Raiser]]:
    """An activation (``aten.relu``) and its in-place form (``aten.relu_``), as ``fn``
    and ``fn(..., inplace=True)``."""
    in_place = getattr(aten, f"{op.__name__}_")
    return [(op.default, _function(fn)), (in_place.default, _in_place(_function(fn, inplace=True)))]


_PAIRS: list[tuple[Any, Raiser]] = [
    (aten.conv2d.default, _conv2d),
    (aten.batch_norm.default, _batch_norm),
    (aten._native_batch_norm_legit_no_training.default, _batch_norm),
    (aten.linear.default, _linear),
    (aten.layer_norm.default, _layer_norm),
    *_with_in_place(aten.relu, F.relu),
    *_with_in_place(aten.silu, F.silu),
    *_with_in_place(aten.hardswish, F.hardswish),
    *_with_in_place(aten.hardsigmoid, F.hardsigmoid),
    (aten.hardtanh.default, _hardtanh),
    (aten.hardtanh_.default, _in_place(_hardtanh)),
    (aten.sigmoid.default, _function(torch.sigmoid)),
    (aten.tanh.default, _function(torch.tanh)),
    (aten.gelu.default, _function(F.gelu, 1, [(1, "approximate", "none")])),
    (aten.leaky_relu.default, _function(F.leaky_relu, 2)),
    (aten.softmax.int, _softmax),
    (aten._softmax.default, _softmax),
    (aten.add.Tensor, _binary(operator.add, torch.add)),
    (aten.add_.Tensor, _in_place(_binary(operator.add, torch.add))),
    (aten.sub.Tensor, _binary(operator.sub, torch.sub)),
    (aten.mul.Tensor, _binary(operator.mul, torch.mul)),
    (aten.mul_.Tensor, _in_place(_binary(operator.mul, torch.mul))),
    (aten.div.Tensor, _binary(operator.truediv, torch.div)),
    (aten.cat.default, _function(torch.cat)),
    (aten.flatten.using_ints, _function(torch.flatten)),
    (aten.view.default, _reshape),
    (aten.reshape.default, _reshape),
    (aten._unsafe_view.default, _reshape),
    (aten.permute.default, _permute),
    (aten.t.default, _permute),
    (aten.addmm.default, _matmul),
    (aten.mm.default, _matmul),
    (aten.convolution.default, _conv2d),
    (aten.transpose.int, _function(torch.transpose)),
    (aten.chunk.default, _function(torch.chunk)),
    (aten.mean.dim, _mean),
    (aten.adaptive_avg_pool2d.default, _function(F.adaptive_avg_pool2d)),
    (aten.max_pool2d.default, _function(F.max_pool2d)),
    (aten.max_pool2d_with_indices.default, _max_pool_with_indices),
    (aten.avg_pool2d.default, _function(F.avg_pool2d)),
    (aten.slice.Tensor, _slice),
    (aten.pad.default, _pad),
    (aten.constant_pad_nd.default, _constant_pad),
    (aten.dropout.default, _dropout),
    (aten.dropout_.default, _dropout),
    (aten.contiguous.default, _identity),
    (aten.clone.default, _identity),
    (aten.alias.default, _identity),
    (aten.detach.default, _identity),
    (aten.sym_size.int, _sym_size),
    (aten._assert_tensor_metadata.default, _dropped),
    (aten._assert_scalar.default, _dropped),
    (operator.getitem, _getitem),
]
RAISERS: dict[Any, Raiser] = dict(_PAIRS)
"""Each ATen op pyprune reads, and how it becomes IR."""


def _where(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "at the top level"
    path, type_name = list(stack.values())[-1]
    cls = type_name.rpartition(".")[2] if isinstance(type_name, str) else type_name.__name__
    return f"in module {path!r} ({cls})" if path else f"in the top-level module ({cls})"


def _check_supported(ep: ExportedProgram) -> None:
    missing: dict[str, list[str]] = {}
    for node in ep.graph.nodes:
        if node.op == "call_function" and node.target not in RAISERS:
            missing.setdefault(str(node.target), []).append(_where(node))
    if missing:
        lines = [f"  {op}: {len(w)}x, first {w[0]}" for op, w in sorted(missing.items())]
        raise ExportRaiseError("the program uses ops pyprune cannot read yet:\n" + "\n".join(lines))


def _collect_state(b: _Builder) -> list[fx.Node]:
    from torch.export.graph_signature import InputKind

    user: list[fx.Node] = []
    placeholders = [n for n in b.ep.graph.nodes if n.op == "placeholder"]
    for node, spec in zip(placeholders, b.ep.graph_signature.input_specs):
        if spec.kind == InputKind.USER_INPUT:
            user.append(node)
        elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            source = b.ep.state_dict if spec.target in b.ep.state_dict else b.ep.constants
            t = source.get(spec.target)
            if not isinstance(t, torch.Tensor):
                raise ExportRaiseError(f"input {spec.target!r} is not a tensor")
            b.state[node.name] = (spec.target, t, spec.kind == InputKind.PARAMETER)
        else:
            raise ExportRaiseError(f"the program takes a {spec.kind.name.lower()} input ({node.name})")
    if b.ep.graph_signature.buffers_to_mutate:
        raise ExportRaiseError("the program updates buffers (BatchNorm statistics in training mode): export the "
                               "model after model.eval()")
    return user


def _user_inputs(ep: ExportedProgram) -> list[fx.Node]:
    from torch.export.graph_signature import InputKind

    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"]
    return [n for n, spec in zip(placeholders, ep.graph_signature.input_specs) if spec.kind == InputKind.USER_INPUT]


def input_shape_of(ep: ExportedProgram) -> tuple[int, ...]:
    """The shape of the program's one input, less the batch dimension."""
    shapes = [_shape(n) for n in _user_inputs(ep)]
    if len(shapes) != 1 or shapes[0] is None:
        raise ExportRaiseError(f"the program takes {len(shapes)} inputs; pyprune compresses models of one image "
                               "batch")
    if len(shapes[0]) < 2 or not all(isinstance(d, int) for d in shapes[0][1:]):
        raise ExportRaiseError(f"the input shape {shapes[0]} is not a batch of fixed-size images")
    return tuple(int(d) for d in shapes[0][1:])


def _reorder_modules(root: nn.Module, calls: list[str], state: list[str]) -> None:
    """Submodules in the order the exported model registered them, so that state dicts
    and files list them as the model does. Parameters keep that order (``state``); a
    module with none goes after the sibling it follows in the order of calls (``calls``)."""
    call_rank = {fqn: i for i, fqn in enumerate(calls)}
    state_rank: dict[str, int] = {}
    for i, key in enumerate(state):
        parts = key.split(".")
        for depth in range(1, len(parts)):
            state_rank.setdefault(".".join(parts[:depth]), i)
    for path, module in list(root.named_modules()):
        names = sorted(module._modules, key=lambda n: call_rank.get(f"{path}.{n}" if path else n, len(call_rank)))
        full = {n: f"{path}.{n}" if path else n for n in names}
        order = sorted((n for n in names if full[n] in state_rank), key=lambda n: state_rank[full[n]])
        for i, n in enumerate(names):
            if full[n] not in state_rank:
                before = next((m for m in reversed(names[:i]) if m in order), None)
                order.insert(order.index(before) + 1 if before else 0, n)
        children = [(n, module._modules[n]) for n in order]
        module._modules.clear()
        module._modules.update(children)


def _root_class(ep: ExportedProgram) -> str:
    """The exported model's class name, as its nodes' module stacks record it."""
    for node in ep.graph.nodes:
        for path, type_name in (node.meta.get("nn_module_stack") or {}).values():
            if path == "":
                return (type_name if isinstance(type_name, str) else type_name.__qualname__).rpartition(".")[2]
    return "GraphModule"


def raise_exported(ep: ExportedProgram, class_name: str | None = None, check: bool = True) -> fx.GraphModule:
    """The graph IR of ``ep`` (see the module docstring); raises
    :class:`ExportRaiseError` naming what cannot be expressed. ``class_name``: the
    graph module's class name (default: the exported model's). ``check`` compares the
    result with the program on one random input."""
    _check_supported(ep)
    b = _Builder(ep)
    for node in _collect_state(b):
        b.env[node] = b.graph.placeholder(node.name)
    input_shape_of(ep)
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        try:
            lifted = _lift_leaf(b, node)
            b.env[node] = lifted if lifted is not None else RAISERS[node.target](b, node)
        except ExportRaiseError as exc:
            raise ExportRaiseError(f"{node.target} ({node.name}, {_where(node)}): {exc}") from None
    out_node = next(n for n in ep.graph.nodes if n.op == "output")
    outputs = [b.value(o) for o in out_node.args[0]]
    b.graph.output(pytree.tree_unflatten(outputs, ep.call_spec.out_spec))
    gm = fx.GraphModule(b.root, b.graph, class_name or _root_class(ep))
    _reorder_modules(gm, [entry.fqn for entry in ep.module_call_graph], list(ep.state_dict))
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    if check:
        _check_equal(ep, gm)
    return gm


def _check_equal(ep: ExportedProgram, gm: fx.GraphModule) -> None:
    shape = input_shape_of(ep)
    batch = _shape(_user_inputs(ep)[0])[0]
    batch = batch if isinstance(batch, int) else 2  # a dynamic batch dimension
    x = torch.randn((batch, *shape), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = ep.module()(x), gm.eval()(x)
    for a, c in zip(pytree.tree_leaves(want), pytree.tree_leaves(got)):
        if not isinstance(a, torch.Tensor) or a.shape != c.shape or \
                not torch.allclose(a, c, rtol=1e-4, atol=1e-5 * max(1.0, float(a.abs().max()))):
            raise ExportRaiseError("the raised graph does not compute what the program does (a pyprune bug: please "
                                   "report it with the file)")
