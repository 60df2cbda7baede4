"""Build an inference model from a graph: fold BatchNorm, fuse ReLUs, then give each
Conv2d/Linear layer the dense or the sparse kernel.

``runtime="dense"`` keeps every layer a torch module, ``"sparse"`` runs every layer
the sparse kernels can run on them, and ``"auto"`` times the candidates on the layer's
real input shape (from shape propagation at ``batch_size``) and keeps the fastest. From
8 images on, a convolution has a third candidate besides dense and sparse, "lanes": the
batched sparse kernel with its activations kept in the lanes layout (:mod:`.lanes`),
timed without conversions since runs of such layers share them; the conversions are
then placed where a neighbour needs NCHW. All compute the same function as the input
graph in eval mode, up to float rounding of the folded BatchNorm.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import fx, nn
from torch.fx.experimental.optimization import replace_node_module

from ..ir import example_input, output_shape, propagate_shapes
from .fusion import call_counts, fold_batchnorm, fuse_relu
from .kernels import backend
from .lanes import FromLanes, LanesSparseConv2d, ToLanes, lanes_for, place_conversions
from .measure import interleaved_medians, time_modules
from .modules import sparse_layer, sparse_supported, unfused
from .residual import fuse_residual_adds
from .plan import RUNTIMES, Choice, LayerPlan, RuntimePlan
from .program import lower


class RuntimeModel(nn.Module):
    """An inference-only model: ``graph_module`` is its computation, ``plan`` says per
    layer which kernel it uses and why. ``program``, when the graph could be lowered
    (:mod:`.program`), runs the same computation in one native call and is what
    ``forward`` uses for a single tensor input; else ``graph_module`` runs it."""

    def __init__(self, graph_module: fx.GraphModule, plan: RuntimePlan, program: Any | None = None) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.plan = plan
        self.program = program
        self.eval()

    def train(self, mode: bool = True) -> "RuntimeModel":
        # Folded BatchNorms have no batch statistics to train with, and the sparse
        # layers no gradients: a runtime model stays in eval mode.
        if mode:
            raise RuntimeError("a RuntimeModel is for inference only; train the model it was built from")
        return super().train(False)

    def __getstate__(self) -> dict[str, Any]:
        # The native program holds no state of its own (the graph's tensors, bound as
        # constants) and cannot be copied or pickled: a copy lowers its graph again.
        state = dict(self.__dict__)
        state["program"] = None
        state["_relower"] = self.program is not None
        # Unpickling traces the graph module again, which drops the shapes the lowering
        # reads; they are propagated again from the input's.
        inputs = [output_shape(n) for n in self.graph_module.graph.find_nodes(op="placeholder")]
        state["_input_shape"] = inputs[0][1:] if len(inputs) == 1 and inputs[0] is not None else None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        relower = state.pop("_relower", False)
        input_shape = state.pop("_input_shape", None)
        self.__dict__.update(state)
        if relower:
            placeholders = self.graph_module.graph.find_nodes(op="placeholder")
            if input_shape is not None and output_shape(placeholders[0]) is None:
                propagate_shapes(self.graph_module, example_input(tuple(input_shape)))
            self.program = lower(self.graph_module)[0]

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        if self.program is not None and len(args) == 1:
            return self.program.run(args[0])
        return self.graph_module(*args)

    def table(self) -> str:
        return self.plan.table()


def prepare_graph(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[str], list[str]]:
    """The dense inference graph of ``gm`` (a copy; ``gm`` is untouched): BatchNorm
    folded, ReLUs fused. Also the layers that took a BatchNorm and those that took a ReLU."""
    folded, bn_layers = fold_batchnorm(gm)
    relu_layers = fuse_relu(folded)
    return folded, bn_layers, relu_layers


def _layer_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The first call of every Conv/Linear layer, in graph order."""
    first: dict[str, fx.Node] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module" and n.target not in first and \
                isinstance(unfused(gm.get_submodule(n.target))[0], (nn.modules.conv._ConvNd, nn.Linear)):
            first[n.target] = n
    return list(first.values())


def _input_shape(node: fx.Node) -> tuple[int, ...] | None:
    arg = node.args[0] if node.args else None
    return output_shape(arg) if isinstance(arg, fx.Node) else None


def _usable_cache(cached: Mapping[str, Any] | None, measurable: list[str]) -> bool:
    return cached is not None and all(name in cached for name in measurable)


def _weight_bytes(layer: nn.Module) -> int:
    """Bytes a layer's weight takes in memory: its CSR or codes, else the dense tensor."""
    if hasattr(layer, "weight_bytes"):
        return layer.weight_bytes
    return layer.weight.numel() * layer.weight.element_size()


@torch.inference_mode()
def _time_lanes(layer: LanesSparseConv2d, x: torch.Tensor, lanes: int, pad: int, repeats: int) -> tuple[float, float]:
    """Median ms of ``layer`` on the lanes form of ``x``, and of converting its input to
    and its output from that layout."""
    to_lanes, from_lanes = ToLanes(lanes, pad), FromLanes(pad)
    xl = to_lanes(x)
    out = layer(xl)
    layer_s, to_s, from_s = interleaved_medians([lambda: layer(xl), lambda: to_lanes(x), lambda: from_lanes(out, x)],
                                                repeats)
    return layer_s * 1e3, (to_s + from_s) * 1e3


def build_runtime(gm: fx.GraphModule, input_shape: tuple[int, ...], runtime: str = "auto",
                  batch_size: int = 1, repeats: int = 5,
                  cached: Mapping[str, Mapping[str, Any]] | None = None, codes: bool = True,
                  program: bool = True) -> RuntimeModel:
    """The runtime model of ``gm`` for one-sample input ``input_shape``.

    ``cached`` (``{layer: {"choice", "dense_ms", "sparse_ms"}}``, as :mod:`.cache`
    stores) replaces the measurement of ``runtime="auto"`` when it covers every layer
    that has a choice; otherwise every such layer is measured ``repeats`` times.
    ``codes`` keeps a quantized sparse layer's weight as codes (:class:`CodesCSR`, code
    and gap bits per non-zero) rather than fp32 CSR. ``program`` lowers the graph to a
    native program (:mod:`.program`) where every node has a lowering; the plan's
    ``executor`` says which ran and why."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if batch_size < 1:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    graph, bn_layers, relu_layers = prepare_graph(gm)
    propagate_shapes(graph, example_input(tuple(input_shape), batch_size))
    counts = call_counts(graph)
    nodes = _layer_nodes(graph)

    shapes = {n.target: _input_shape(n) for n in nodes}
    reasons: dict[str, str | None] = {}
    for node in nodes:
        if counts[node.target] > 1:
            reasons[node.target] = f"called at {counts[node.target]} places"
        elif shapes[node.target] is None:
            reasons[node.target] = "no input shape"
        else:
            reasons[node.target] = sparse_supported(graph.get_submodule(node.target), shapes[node.target])
    measurable = [n.target for n in nodes if reasons[n.target] is None]
    lanes = lanes_for(batch_size)
    lanes_able = {name for name in measurable if lanes and type(unfused(graph.get_submodule(name))[0]) is nn.Conv2d}
    # One border for the whole run of lanes layers: the largest padding any of them needs.
    pad = max((max(unfused(graph.get_submodule(name))[0].padding) for name in lanes_able), default=0)
    from_cache = runtime == "auto" and _usable_cache(cached, measurable)
    source = "forced" if runtime != "auto" else "cache" if from_cache else "measured"

    modules = dict(graph.named_modules())
    originals = dict(gm.named_modules())

    def unfolded(name: str) -> torch.Tensor | None:
        """The layer's weight before BatchNorm folding, which codes keep apart from its factor."""
        original = originals.get(name)
        weight = getattr(unfused(original)[0], "weight", None) if original is not None else None
        return weight.detach() if isinstance(weight, torch.Tensor) else None

    layers = []
    for node in nodes:
        name, dense = node.target, modules[node.target]
        layer, relu = unfused(dense)
        shape = shapes[name]
        choice: Choice = "dense"
        dense_ms = sparse_ms = lanes_ms = convert_ms = sparse = None
        if reasons[name] is None and runtime == "sparse":
            choice = "lanes" if name in lanes_able else "sparse"
        elif reasons[name] is None and runtime == "auto" and from_cache:
            entry = cached[name]
            choice, dense_ms, sparse_ms, lanes_ms, convert_ms = (
                entry["choice"], entry.get("dense_ms"), entry.get("sparse_ms"), entry.get("lanes_ms"),
                entry.get("convert_ms"))
            if choice == "lanes" and name not in lanes_able:  # an entry from another build of pyprune
                choice = "sparse"
        elif reasons[name] is None and runtime == "auto":
            sparse = sparse_layer(layer, relu, codes, unfolded(name))
            x = torch.randn(shape)
            dense_ms, sparse_ms = time_modules([dense, sparse], x, repeats=repeats)
            choice = "sparse" if sparse_ms < dense_ms else "dense"
            if name in lanes_able:
                lanes_ms, convert_ms = _time_lanes(LanesSparseConv2d(sparse, pad), x, lanes, pad, repeats)
                # Leaving the lanes layout costs the conversions of this layer's input and output
                # when its neighbours stay in it, as they mostly do from 8 images on.
                if lanes_ms < min(dense_ms, sparse_ms) + convert_ms:
                    choice = "lanes"
        if choice in ("sparse", "lanes"):
            # Only layers called once get here, so swapping the module changes one call.
            sparse = sparse or sparse_layer(layer, relu, codes, unfolded(name))
            replace_node_module(node, modules, LanesSparseConv2d(sparse, pad) if choice == "lanes" else sparse)
        layers.append(LayerPlan(name, "linear" if isinstance(layer, nn.Linear) else "conv", shape,
                                tuple(layer.weight.shape), (layer.weight == 0).float().mean().item(),
                                name in bn_layers, name in relu_layers, choice, reasons[name] or "",
                                dense_ms, sparse_ms, lanes_ms, convert_ms,
                                _weight_bytes(sparse if choice != "dense" else layer)))
    rewrite = place_conversions(graph, {p.name for p in layers if p.choice == "lanes"}, lanes or 8, pad)
    fused = fuse_residual_adds(graph, rewrite.in_lanes)
    graph.graph.lint()
    graph.recompile()
    graph.eval().requires_grad_(False)
    native, why_not = lower(graph) if program else (None, "not asked for")
    plan = RuntimePlan(runtime, batch_size, torch.get_num_threads(), backend(), source, layers,
                       lanes=lanes, lanes_conversions=rewrite.conversions, fused_adds=fused,
                       executor="program" if native is not None else f"fx ({why_not})")
    return RuntimeModel(graph, plan, native)


def plan_cache_entry(plan: RuntimePlan) -> dict[str, dict[str, Any]]:
    """What :mod:`.cache` stores of a measured plan: the layers that had a choice."""
    return {p.name: {"choice": p.choice, "dense_ms": p.dense_ms, "sparse_ms": p.sparse_ms, "lanes_ms": p.lanes_ms,
                     "convert_ms": p.convert_ms}
            for p in plan.layers if not p.reason}
