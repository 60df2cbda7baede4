"""The runtime's record of what it decided per layer, and why."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from ..text import format_table

# sparse: the sparse kernel on NCHW activations; lanes: the batched sparse kernel on
# activations in the lanes layout (.lanes), converted where a neighbour needs NCHW.
Choice = Literal["dense", "sparse", "lanes"]
RUNTIMES = ("dense", "sparse", "auto")


@dataclass
class LayerPlan:
    """One Conv2d/Linear layer of the runtime graph.

    ``choice`` is the kernel it runs; ``reason`` says why when the choice was not
    measured (forced, or the sparse kernels cannot run the layer). ``dense_ms`` and
    ``sparse_ms`` are median times of one call at the plan's batch size, None where
    nothing was measured."""

    name: str
    kind: str  # "conv" or "linear"
    input_shape: tuple[int, ...] | None
    weight_shape: tuple[int, ...]
    sparsity: float  # share of exact zeros in the weight
    bn_folded: bool
    relu_fused: bool
    choice: Choice
    reason: str = ""
    dense_ms: float | None = None
    sparse_ms: float | None = None
    lanes_ms: float | None = None
    convert_ms: float | None = None  # to and from the lanes layout, charged to leaving it
    weight_bytes: int | None = None  # the weight in memory: dense tensor, fp32 CSR or codes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RuntimePlan:
    """The per-layer plan of a runtime model. ``source`` is ``"forced"`` (dense or
    sparse asked for), ``"measured"`` (auto, timed at load) or ``"cache"`` (auto,
    choices and their timings read back from the cache, nothing re-measured)."""

    runtime: str
    batch_size: int
    threads: int
    backend: str  # "native" or "reference": which sparse kernels ran
    source: str
    layers: list[LayerPlan] = field(default_factory=list)
    cache_file: str | None = None
    lanes: int | None = None  # images per lane group of the lanes layers; None below 8 images
    lanes_conversions: int = 0  # NCHW <-> lanes conversions placed between layers
    fused_adds: int = 0  # residual adds (with their ReLUs) done in a sparse convolution's epilogue
    # "program": the graph runs as one native program (.program); "fx (why)": node by node
    executor: str = "fx"

    def choices(self) -> dict[str, Choice]:
        return {layer.name: layer.choice for layer in self.layers}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = [layer.to_dict() for layer in self.layers]
        return d

    def table(self) -> str:
        """A fixed-width table of the layers, then a one-line summary."""
        def ms(v: float | None) -> str:
            return f"{v:.3f}" if v is not None else "-"

        headers = ("layer", "kind", "input", "sparsity", "bn", "relu", "dense ms", "sparse ms", "lanes ms", "choice")
        rows = [(p.name, p.kind, "x".join(map(str, p.input_shape)) if p.input_shape else "-",
                 f"{p.sparsity:.3f}", "folded" if p.bn_folded else "-", "fused" if p.relu_fused else "-",
                 ms(p.dense_ms), ms(p.sparse_ms), ms(p.lanes_ms), p.choice + (f" ({p.reason})" if p.reason else ""))
                for p in self.layers]
        lines = [format_table(headers, rows)]
        n_sparse = sum(p.choice != "dense" for p in self.layers)
        n_lanes = sum(p.choice == "lanes" for p in self.layers)
        lanes = f" ({n_lanes} in lanes of {self.lanes}, {self.lanes_conversions} conversions)" if n_lanes else ""
        lanes += f", {self.fused_adds} residual adds fused" if self.fused_adds else ""
        held = sum(p.weight_bytes or 0 for p in self.layers)
        lines.append(f"runtime {self.runtime}: {n_sparse}/{len(self.layers)} layers sparse{lanes}, weights "
                     f"{held:,} bytes in memory; batch {self.batch_size}, run as {self.executor}, "
                     f"{self.threads} threads, {self.backend} sparse kernels, choices {self.source}"
                     + (f" ({self.cache_file})" if self.cache_file else ""))
        return "\n".join(lines)
