"""quant: weight sharing by per-layer 1-D k-means (deep compression, step 2).

Needs: a ``GraphModule`` whose layers are ``call_module`` nodes of ``nn.Conv*d`` or
``nn.Linear`` (as for ``mask``). Usually runs after ``mask``: the zeros are the
mask and are never a code.

Guarantees: for every quantized layer, k-means with ``k = 2**bits`` clusters runs
on the layer's NON-ZERO weights only; afterwards every weight of the layer is
exactly ``0.0`` (exactly the weights that were zero before) or one of at most
``2**bits`` float32 centroids, no centroid is ``0.0``, and the result is
deterministic for a given ``seed``. A layer with no more than ``k`` distinct
non-zero values keeps them exactly (they are its codebook); an all-zero layer is
left alone. The record holds, per layer, ``bits``, ``distinct`` (number of distinct
non-zero values) and ``codebook`` (sorted list of floats, exactly the values in
the layer), and ``codebooks`` maps each layer to that list. After centroid
fine-tuning the values move: read the current ones with :func:`codebooks`.

Initialisation (``init``): ``linear`` spaces the centroids evenly over
``[min, max]`` of the non-zero weights (deep compression's choice: it keeps the
rare large weights), ``density`` puts them at evenly spaced quantiles of the
weights' CDF, ``kmeans++`` is the D^2 seeding with a generator seeded from
``seed`` and the layer name. Lloyd iterations (at most ``iters``) then run to a
fixed point; the 1-D assignment is a ``searchsorted`` over the midpoints of the
sorted centroids, and cluster means come from prefix sums over the sorted
weights, so an iteration costs O(k log n).

Bits: ``bits`` for every layer, ``conv_bits`` / ``linear_bits`` by kind (deep
compression used 8 and 5), ``layers={name: bits}`` for single layers; any of them
may be 0 to leave those layers unquantized.

Refuses: bits outside 0..16, unknown ``init`` or ``grad``, ``iters < 1`` and names in
``layers`` that are not Conv/Linear layers of the graph.

Fine-tuning (``grad``): with ``grad="ste"``, the default, the weights train straight
through (:func:`ste_projection`): the optimizer steps full-precision latent weights,
and after every step each layer's non-zero latent weights are assigned to the
nearest of its shared values, each value moves to the mean of the latent weights
assigned to it (one Lloyd step), and the layer takes those values. A weight can
change cluster; the layer keeps at most as many values as it has now, and its
zeros are whatever the passes before it (a mask) make them. With ``grad="mean"`` or
``"sum"`` (deep compression's centroid fine-tuning, :func:`tie_hooks`) the clusters
are captured once: every weight's gradient becomes the MEAN or the SUM (the exact
gradient of the shared centroid) of its cluster's gradients, zero for zero weights,
and each cluster is re-tied to one value after every step, so the clusters and the
zero set never change. The sum steps a centroid of a few thousand weights a few
thousand times further than an untied weight: on the shared ResNet-20, 5-bit codes
fine-tuned at lr 0.01 with the sum fell from 0.83 to 0.76 top-1. Tied clusters
leave little to train at 2-3 bits (a few values per layer, and BatchNorm); the
latent weights recover much more (``bench/straight_through.py``).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from ..ir import PassResult
from .base import GraphPass, Knob, Option, Range
from .constraints import Projection, TrainHooks, read_codebooks
from .layers import present_layers, weight_layers
from .registry import register_pass

INITS = ("linear", "kmeans++", "density")
GRADS = ("ste", "mean", "sum")
TIED = ("mean", "sum")  # the grads of tie_hooks
MAX_BITS = 16
KMEANSPP_SAMPLE = 1 << 16


def _check_bits(bits: Any, what: str) -> int | None:
    if bits is None:
        return None
    if isinstance(bits, bool) or not isinstance(bits, int) or not 0 <= bits <= MAX_BITS:
        raise ValueError(f"{what} must be an integer in 0..{MAX_BITS}, got {bits!r}")
    return bits


def _init_centroids(x: np.ndarray, k: int, init: str, seed: int) -> np.ndarray:
    """``k`` initial centroids for the sorted float64 values ``x`` (more distinct than k)."""
    if init == "linear":
        return np.linspace(x[0], x[-1], k)
    if init == "density":  # evenly spaced levels of the empirical CDF
        return x[np.round((np.arange(k) + 0.5) / k * (x.size - 1)).astype(np.int64)]
    # kmeans++: first centroid uniformly, then each with probability ~ D(x)^2, drawn from
    # an evenly strided sample of the sorted values (same distribution, bounded cost)
    if x.size > KMEANSPP_SAMPLE:
        x = x[np.round(np.linspace(0, x.size - 1, KMEANSPP_SAMPLE)).astype(np.int64)]
    rng = np.random.default_rng(seed)
    centroids = [x[rng.integers(x.size)]]
    d2 = (x - centroids[0]) ** 2
    for _ in range(1, k):
        cdf = np.cumsum(d2)
        if cdf[-1] <= 0:
            break
        pick = min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), x.size - 1)
        centroids.append(x[pick])
        d2 = np.minimum(d2, (x - centroids[-1]) ** 2)
    return np.sort(np.array(centroids))


def kmeans_1d(values: torch.Tensor, k: int, init: str = "linear", iters: int = 100,
              seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D k-means of ``values`` (any shape). Returns ``(centroids, labels)``: the
    sorted float64 centroids of the non-empty clusters (at most ``k``) and, for
    each value, the index of its centroid. With at most ``k`` distinct values the
    centroids are exactly those values."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    flat = values.detach().reshape(-1).to("cpu", torch.float64)
    if flat.numel() == 0:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    x, order = torch.sort(flat)
    distinct, first_of = torch.unique_consecutive(x, return_inverse=True)
    if distinct.numel() <= k:
        labels = torch.empty_like(order)
        labels[order] = first_of
        return distinct, labels
    xs = x.numpy()  # NumPy from here: O(k log n) per iteration, no per-op thread overhead
    c = _init_centroids(xs, k, init, int(seed))
    n = xs.size
    prefix = np.concatenate([[0.0], np.cumsum(xs)])

    def clusters(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[start, end) of each centroid's cluster in ``xs``; ``c`` sorted and distinct."""
        bounds = np.searchsorted(xs, (c[1:] + c[:-1]) / 2)  # first index of every cluster but the first
        return np.concatenate([[0], bounds]), np.concatenate([bounds, [n]])

    for _ in range(max(int(iters), 1)):
        c = np.unique(c)  # sorted; merges centroids that met
        starts, ends = clusters(c)
        keep = ends > starts
        new = (prefix[ends[keep]] - prefix[starts[keep]]) / (ends[keep] - starts[keep])
        if new.size == c.size and np.array_equal(new, c):
            break
        c = new
    starts, ends = clusters(np.unique(c))
    keep = ends > starts
    starts, ends = starts[keep], ends[keep]  # drop clusters that ended empty
    c = torch.from_numpy((prefix[ends] - prefix[starts]) / (ends - starts))
    sorted_labels = torch.from_numpy(np.repeat(np.arange(starts.size), ends - starts))
    labels = torch.empty_like(order)
    labels[order] = sorted_labels
    return c, labels


def quantize_weight(weight: torch.Tensor, bits: int, init: str = "linear", iters: int = 100,
                    seed: int = 0, zero_code: bool = False) -> list[float]:
    """Replace the non-zero weights by their k-means centroids (k = 2**bits, or
    2**bits - 1 with ``zero_code`` when the weight has zeros: zero is then one of the
    2**bits codes) in place; zeros stay zero. Returns the sorted codebook: exactly the
    distinct non-zero values now in ``weight``."""
    with torch.no_grad():
        flat = weight.detach().reshape(-1)
        nonzero = torch.nonzero(flat).squeeze(1)
        if nonzero.numel() == 0:
            return []
        values = flat[nonzero]
        k = 2**bits - (1 if zero_code and nonzero.numel() < flat.numel() and bits > 0 else 0)
        centroids, labels = kmeans_1d(values, max(k, 1), init, iters, seed)
        code = centroids.to(weight.dtype)
        # A centroid can round to (or be) exactly 0: it would merge its cluster into the
        # mask. Use the member value nearest to zero instead, which is non-zero.
        for j in torch.nonzero(code == 0).reshape(-1).tolist():
            members = values[labels.to(values.device) == j]
            code[j] = members[members.abs().argmin()].to(code.dtype)
        new = torch.zeros_like(flat)
        new[nonzero] = code.to(flat.device)[labels.to(flat.device)]
        weight.copy_(new.view(weight.shape))
        return sorted(set(weight.detach().reshape(-1)[nonzero].cpu().tolist()))


def _layer_seed(seed: int, name: str) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % 2**63


@register_pass
class QuantPass(GraphPass):
    """tie each layer's non-zero weights to 2**bits shared values by 1-D k-means (deep compression, step 2)"""

    name = "quant"
    changes_outputs = True
    options = (
        Option("bits", int, 8, "codebook bits of every layer (0: leave unquantized)", Range(0, MAX_BITS)),
        Option("conv_bits", int, None, "bits of conv layers, in place of bits", Range(0, MAX_BITS)),
        Option("linear_bits", int, None, "bits of linear layers, in place of bits", Range(0, MAX_BITS)),
        Option("init", str, "linear", "centroid initialisation", choices=INITS),
        Option("iters", int, 100, "most Lloyd iterations", Range(1)),
        Option("seed", int, 0, "seed of kmeans++ (with each layer's name)"),
        Option("layers", dict, None, "{layer: bits} overrides; 0 leaves a layer alone"),
        Option("grad", str, "ste", "fine-tuning: ste trains the weights straight through (latent weights, "
               "re-assigned to the nearest shared value after every step); mean or sum tie each cluster "
               "(its gradient is the mean or sum of its members')", choices=GRADS),
        Option("zero_code", bool, False, "count zero as one of the 2**bits codes where a layer has zeros (deep "
               "compression's dense form): 4-bit layers then pack two codes per byte in compact ONNX"),
    )
    # One layer a bit coarser costs nothing a screen can see: on ResNet-56 (4 -> 3 bits)
    # single-layer screens ranked layers no better than chance against 4,000 other
    # images, which themselves moved by -0.2 to +0.1 points (bench/screen_noise.py).
    knob = Knob("bits", (8, 7, 6, 5, 4, 3, 2), increasing=False, range=Range(1, MAX_BITS), flag="--bits-levels",
                per_layer="layers", layer_screens=False)
    training_constraint = ("each layer keeps at most its number of shared values: weights train straight through "
                           "and take the nearest value (grad=ste), or each cluster trains as one (grad=mean/sum)")
    examples = (("quant(bits=5)", "share weights: per-layer k-means on the non-zero weights, 2^5 codes"),
                ("quant(conv_bits=8,linear_bits=5,init=density)", "deep compression's bits, quantile initialisation"))

    def __init__(self, bits: int = 8, conv_bits: int | None = None, linear_bits: int | None = None,
                 init: str = "linear", iters: int = 100, seed: int = 0,
                 layers: Mapping[str, int] | None = None, grad: str = "ste", zero_code: bool = False) -> None:
        self.check_options(dict(bits=bits, conv_bits=conv_bits, linear_bits=linear_bits, init=init, iters=iters,
                                seed=seed, layers=layers, grad=grad, zero_code=zero_code))
        self.zero_code = zero_code
        self.bits, self.conv_bits, self.linear_bits = bits, conv_bits, linear_bits
        self.init, self.iters, self.seed, self.grad = init, iters, int(seed), grad
        self.layers = {str(k): _check_bits(v, f"bits of layer {k!r}") for k, v in (layers or {}).items()}
        self.quantized: list[str] | None = None  # layer names, once the pass has run
        self._bits: dict[str, int] = {}  # {layer: bits} of the layers it quantized

    def plan(self, gm: fx.GraphModule) -> dict[str, int]:
        """``{layer: bits}`` for the layers to quantize, in graph order."""
        names = weight_layers(gm, "conv,linear")
        unknown = sorted(set(self.layers) - set(names))
        if unknown:
            raise ValueError(f"quant layers not among the conv/linear layers of the graph: {', '.join(unknown)}")
        plan = {}
        for n in names:
            if n in self.layers:
                bits = self.layers[n]
            else:
                linear = isinstance(gm.get_submodule(n), nn.Linear)
                kind_bits = self.linear_bits if linear else self.conv_bits
                bits = self.bits if kind_bits is None else kind_bits
            if bits:
                plan[n] = bits
        return plan

    def call(self, gm: fx.GraphModule) -> PassResult:
        per_layer: dict[str, dict[str, Any]] = {}
        modified = False
        for name, bits in self.plan(gm).items():
            w = gm.get_submodule(name).weight
            before = w.detach().clone()
            codebook = quantize_weight(w, bits, self.init, self.iters, _layer_seed(self.seed, name), self.zero_code)
            modified = modified or not torch.equal(before, w.detach())
            n = w.numel()
            zeros = int((w == 0).sum())
            per_layer[name] = {"bits": bits, "distinct": len(codebook), "params": n, "zeros": zeros,
                               "codebook": codebook}
        self.quantized = list(per_layer)
        self._bits = {n: r["bits"] for n, r in per_layer.items()}
        record = {"init": self.init, "layers": per_layer,
                  "codebooks": {n: r["codebook"] for n, r in per_layer.items()}}
        return PassResult(gm, modified=modified, record=record)

    def training_hooks(self, gm: fx.GraphModule) -> TrainHooks:
        """Fine-tuning of the quantized layers (see ``grad``), captured from ``gm`` now."""
        names = self.quantized if self.quantized is not None else list(self.plan(gm))
        if self.grad == "ste":
            return TrainHooks(projections=[ste_projection(gm, names)])
        return tie_hooks(gm, names, reduce=self.grad)

    def codebook_layers(self, gm: fx.GraphModule) -> dict[str, int]:
        """The layers it quantized (or, not run yet, would quantize) and their bits."""
        return dict(self._bits) if self.quantized is not None else self.plan(gm)


def codebooks(gm: nn.Module, record: Mapping[str, Any] | Iterable[str]) -> dict[str, torch.Tensor]:
    """The current codebook of each quantized layer: its sorted distinct non-zero
    weight values (float, on the CPU). ``record`` is the quant pass's record (its
    ``layers`` are read, and their ``bits`` checked) or an iterable of layer names.
    Read them from the model rather than the record after centroid fine-tuning."""
    layers = record.get("layers", {}) if isinstance(record, Mapping) else {n: {} for n in record}
    return read_codebooks(gm, {n: info.get("bits") if isinstance(info, Mapping) else None
                               for n, info in layers.items()})


def nearest_value(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """For each entry of ``x``, the index of the nearest of the sorted ``values``
    (the lower one on a tie)."""
    return torch.bucketize(x, (values[1:] + values[:-1]) / 2)


def ste_projection(gm: nn.Module, layer_names: Iterable[str]) -> Projection:
    """Straight-through fine-tuning of the named layers: capture each layer's shared
    values now (its sorted distinct non-zero weights); the projection assigns each
    non-zero latent weight to the nearest value, moves every value that has weights
    to their mean (one Lloyd step, so the values follow training), assigns again and
    writes the values. Zeros stay zero; a value that would become exactly 0.0 (and
    so join the zeros) keeps the member nearest zero instead, as
    :func:`quantize_weight` does."""
    values = {n: torch.unique(w[w != 0]) for n in present_layers(gm, layer_names)
              for w in [gm.get_submodule(n).weight.detach()]}
    values = {n: v for n, v in values.items() if v.numel()}

    def project(weights: dict[str, torch.Tensor]) -> None:
        for n, v in values.items():
            w = weights[n]
            nonzero = w != 0
            x = w[nonzero]
            if x.numel() == 0:
                continue
            v = v.to(device=x.device, dtype=x.dtype)
            label = nearest_value(v, x)
            # means in float64: exact for a cluster whose members are all equal, so a
            # projected layer is a fixed point of the projection
            count = torch.zeros(v.numel(), dtype=torch.float64, device=x.device).index_add_(
                0, label, torch.ones_like(x, dtype=torch.float64))
            total = torch.zeros_like(count).index_add_(0, label, x.to(torch.float64))
            v = torch.where(count > 0, total / count.clamp(min=1), v.to(torch.float64)).to(x.dtype)
            for j in torch.nonzero(v == 0).reshape(-1).tolist():
                members = x[label == j]
                v[j] = members[members.abs().argmin()]
            v = torch.sort(v).values
            values[n] = v
            w[nonzero] = v[nearest_value(v, x)]

    return Projection(tuple(values), project)


def tie_hooks(gm: nn.Module, layer_names: Iterable[str], reduce: str = "mean") -> TrainHooks:
    """Capture each named layer's clusters now (``torch.unique(w, return_inverse=True)``
    over its non-zero weights). After backward each weight's gradient becomes the
    mean (or, with ``reduce="sum"``, the sum) of its cluster's gradients (zero for
    zero weights); after each step every weight is set to the value of its
    cluster's first member (zeros to zero)."""
    if reduce not in TIED:
        raise ValueError(f"reduce must be one of {', '.join(TIED)}, got {reduce!r}")
    ties = {}
    for n in present_layers(gm, layer_names):
        w = gm.get_submodule(n).weight.detach()
        flat = w.reshape(-1)
        index = torch.nonzero(flat).squeeze(1)
        if index.numel() == 0:
            ties[n] = (w.shape, index, index, index, 0, index.to(w.dtype))
            continue
        _, inverse, counts = torch.unique(flat[index], return_inverse=True, return_counts=True)
        k = int(inverse.max()) + 1
        # first member (lowest flat position) of each cluster
        first = torch.full((k,), index.numel(), dtype=torch.long, device=index.device)
        first.scatter_reduce_(0, inverse, torch.arange(index.numel(), device=index.device), reduce="amin")
        scale = counts.to(w.dtype).reciprocal() if reduce == "mean" else torch.ones(k, dtype=w.dtype)
        ties[n] = (w.shape, index, inverse, index[first], k, scale)

    def _get(model: nn.Module, n: str):
        shape, index, inverse, first, k, scale = ties[n]
        w = model.get_submodule(n).weight
        if w.shape != shape:
            raise RuntimeError(f"clusters of {n} were captured for shape {tuple(shape)} but the weight is now "
                               f"{tuple(w.shape)}: capture the hooks again after passes that reshape layers")
        if index.device != w.device:
            ties[n] = (shape, index.to(w.device), inverse.to(w.device), first.to(w.device), k, scale.to(w.device))
        return w, ties[n]

    def after_backward(model: nn.Module) -> None:
        for n in ties:
            w, (_, index, inverse, _, k, scale) = _get(model, n)
            if w.grad is None:
                continue
            g = w.grad.reshape(-1)
            sums = torch.zeros(k, dtype=g.dtype, device=g.device).index_add_(0, inverse, g[index])
            new = torch.zeros_like(g)
            new[index] = (sums * scale)[inverse]
            w.grad.copy_(new.view(w.shape))

    def after_step(model: nn.Module) -> None:
        with torch.no_grad():
            for n in ties:
                w, (_, index, inverse, first, _, _) = _get(model, n)
                flat = w.detach().reshape(-1)
                new = torch.zeros_like(flat)
                new[index] = flat[first][inverse]
                w.copy_(new.view(w.shape))

    return TrainHooks(after_backward=[after_backward], after_step=[after_step], fixes_zeros=True)
