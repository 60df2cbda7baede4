"""The channel-handler registry behind :mod:`pyprune.analysis.channels`.

A handler knows three things about one kind of op:

* ``connect``: which of its input and output positions are tied, pinned, read by
  a channel-mixing computation, or scored by a BatchNorm;
* ``zeros``: which output channels are zero in the masked model, given which input
  channels are (forward zero propagation);
* ``rewrite``: how to change the op when channels are removed (new smaller
  modules, new pad amounts, new view sizes).

Handlers are looked up by module type (through the MRO), by function, or by method
name. An op with no handler is a barrier: its inputs and outputs are pinned, so no
channel is pruned across it.

This module holds only the registry, the barrier (:class:`ChannelHandler`) and the
handler of graph inputs, constants and outputs (:class:`Inert`). The handlers of
concrete ops live with the rest of each op's support in :mod:`pyprune.ops`, which
registers them when ``pyprune`` is imported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from torch import fx

from .context import Context, describe, tensor_args

KINDS = ("module", "function", "method")


class ChannelHandler:
    """Base: a barrier. Subclasses override what they know."""

    def connect(self, ctx: Context, node: fx.Node) -> None:
        inputs = tensor_args(ctx, node)
        if not inputs and not ctx.has(node):
            return  # arithmetic on sizes and other non-tensors: no channels involved
        why = f"barrier {describe(ctx.gm, node)}"
        ctx.barriers.append(describe(ctx.gm, node))
        for a in inputs:
            ctx.pin(a, why)
            ctx.read(a, why)
        ctx.pin(node, why)

    def zeros(self, ctx: Context, node: fx.Node) -> np.ndarray:
        return ctx.not_zero(node)

    # ``rw`` is a pyprune.ops.rewrite.Rewriter; that layer sits above this one, so
    # it is not imported here, not even for type checking.
    def rewrite(self, rw: Any, node: fx.Node) -> None:
        pass


class Inert(ChannelHandler):
    """Graph inputs, constants and outputs: pinned, but not barriers worth a warning."""

    def connect(self, ctx: Context, node: fx.Node) -> None:
        why = {"placeholder": "graph input", "get_attr": "constant tensor", "output": "graph output"}[node.op]
        ctx.pin(node, why)
        for a in tensor_args(ctx, node):
            ctx.pin(a, why)
            ctx.read(a, why)


CHANNEL_HANDLERS: dict[str, dict[Any, ChannelHandler]] = {kind: {} for kind in KINDS}


def register_module(handler: ChannelHandler, *types: type) -> None:
    for t in types:
        CHANNEL_HANDLERS["module"][t] = handler


def register_function(handler: ChannelHandler, *functions: Callable) -> None:
    for f in functions:
        CHANNEL_HANDLERS["function"][f] = handler


def register_method(handler: ChannelHandler, *names: str) -> None:
    for n in names:
        CHANNEL_HANDLERS["method"][n] = handler


def unregister(kind: str, *targets: Any) -> None:
    """Forget the handlers of ``targets`` (module types, functions or method names,
    as ``kind`` says); an unregistered target is ignored."""
    table = CHANNEL_HANDLERS[kind]
    for t in targets:
        table.pop(t, None)


_BARRIER = ChannelHandler()
_INERT = Inert()


def module_handler(module_type: type) -> ChannelHandler | None:
    """The handler registered for ``module_type`` or its nearest base class, if any."""
    for klass in module_type.__mro__:
        if klass in CHANNEL_HANDLERS["module"]:
            return CHANNEL_HANDLERS["module"][klass]
    return None


def handler_for(gm: fx.GraphModule, node: fx.Node) -> ChannelHandler:
    """The handler of ``node``: by module type (MRO), function, or method name; a
    barrier when none is registered."""
    if node.op in ("placeholder", "get_attr", "output"):
        return _INERT
    if node.op == "call_module":
        handler = module_handler(type(gm.get_submodule(node.target)))
        return _BARRIER if handler is None else handler
    table = CHANNEL_HANDLERS["function" if node.op == "call_function" else "method"]
    return table.get(node.target, _BARRIER)
