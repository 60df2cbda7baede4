"""Sparse convolution (pyprune._C.sparse_conv2d) against torch's dense conv2d, same run.

Layers: every distinct 3x3 convolution of ResNet-56 on CIFAR (found by running the
model, not typed in) plus one VGG-16 layer (256 -> 256 channels at 8x8, its third block
on CIFAR). Weights are random with the given share of smallest-magnitude entries zeroed;
inputs random. For each layer, sparsity and batch, dense and sparse are timed interleaved
in one process with the same thread count; the table gives medians and their ratio, and
beside it the physical limit, the ratio of multiply-adds (1 / density). From 8 images on
it also times the batched kernel on the lanes layout, as the runtime runs it between two
such layers, and the two layout conversions that this saves there.

A second table, at 90% sparsity, compares the kernel's instruction-set paths and
algorithms (direct, batched, im2col) on NCHW input and output.

    python bench/sparse_conv.py                 # the tables of bench/README.md and sparse_conv.png
    python bench/sparse_conv.py --repeats 5 --sparsity 0.9 --batch 1
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from _measure import interleaved_medians, table
from pyprune import _native
from pyprune.models import build_model
from pyprune.runtime.kernels import CSR, CodesCSR


@dataclass(frozen=True)
class ConvShape:
    name: str
    in_channels: int
    out_channels: int
    size: int  # input height = width
    stride: int

    def label(self) -> str:
        return f"{self.name} {self.in_channels}->{self.out_channels} @{self.size}x{self.size} s{self.stride}"


def resnet56_shapes() -> list[ConvShape]:
    """Distinct 3x3 convolutions of ResNet-56, in network order."""
    model = build_model("resnet56").eval()
    seen: dict[tuple, ConvShape] = {}

    def hook(module, inputs, _):
        key = (module.in_channels, module.out_channels, inputs[0].shape[-1], module.stride[0])
        if module.kernel_size == (3, 3) and key not in seen:
            seen[key] = ConvShape("resnet56", *key)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    for h in handles:
        h.remove()
    return list(seen.values())


SHAPES = resnet56_shapes() + [ConvShape("vgg16", 256, 256, 8, 1)]


def pruned_weight(shape: ConvShape, sparsity: float, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(shape.out_channels, shape.in_channels, 3, 3, generator=gen)
    k = round(sparsity * w.numel())
    if k:
        w.view(-1)[w.abs().view(-1).argsort()[:k]] = 0
    return w


def quantized(w: torch.Tensor, bits: int) -> torch.Tensor:
    """The non-zeros of ``w`` snapped to 2**bits evenly spaced levels (speed does not
    depend on which levels)."""
    levels = torch.linspace(float(w.min()), float(w.max()), 2 ** bits)
    snapped = levels[(w.unsqueeze(-1) - levels).abs().argmin(-1)]
    return torch.where(w != 0, snapped, 0.0)


def time_layer(C, shape: ConvShape, sparsity: float, batch: int, repeats: int, variants: dict[str, dict],
               lanes: bool = False, bits: int | None = None) -> dict[str, float]:
    """Median seconds of dense conv2d ("dense"), of each sparse variant (kwargs of
    sparse_conv2d, NCHW in and out; ``codes=True`` passes the weight as codes,
    which needs ``bits``, the quantization of every contender's weight) and, with
    ``lanes``, of the batched kernel on the lanes layout ("lanes": in and out already in
    it, as between two such layers of the runtime) and of the two conversions it saves
    there ("convert": to_lanes of the input plus from_lanes of the output)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, shape.in_channels, shape.size, shape.size, generator=gen)
    w = pruned_weight(shape, sparsity, gen)
    if bits:
        w = quantized(w, bits)
    csr = CSR.from_dense(w)
    rowptr, col, val = csr.rowptr, csr.colidx, csr.values
    codes = CodesCSR.from_dense(w) if bits else None
    s = (shape.stride, shape.stride)
    fns = {"dense": lambda: F.conv2d(x, w, None, s, (1, 1))}
    expected = fns["dense"]()
    for name, kw in variants.items():
        kw = dict(kw)
        if kw.pop("codes", False):
            weights = codes.kernel_args()
            kw.update(codes.kernel_kwargs())
        else:
            weights = (rowptr, col, val)
        fns[name] = lambda kw=kw, weights=weights: C.sparse_conv2d(x, *weights, (3, 3), None, s, (1, 1), (1, 1),
                                                                   False, **kw)
    checks = {name: fns[name] for name in variants}
    if lanes:
        n_lanes = C.sparse_lanes(batch)
        xl = C.to_lanes(x, n_lanes, 1)
        fns["lanes"] = lambda: C.sparse_conv2d_lanes(xl, rowptr, col, val, (3, 3), None, s, (1, 1), (1, 1), False)
        out = fns["lanes"]()
        fns["convert"] = lambda: (C.to_lanes(x, n_lanes, 1), C.from_lanes(out, batch, 1))
        checks["lanes"] = lambda: C.from_lanes(fns["lanes"](), batch, 1)
    for f in checks.values():  # a benchmark of a wrong kernel is worthless
        torch.testing.assert_close(f(), expected, rtol=1e-3, atol=1e-3)
    with torch.no_grad():
        return dict(zip(fns, interleaved_medians(list(fns.values()), repeats=repeats, warmup=2, min_seconds=0.002)))


def speedup_table(C, args) -> list[tuple[ConvShape, float, int, float]]:
    """Per layer, batch and sparsity: dense, the sparse kernel on NCHW (algo auto: direct
    below 8 images, batched from 8) and, from 8 images, the lanes layers of the runtime.
    The plotted speedup is the runtime's: lanes where they run, else NCHW."""
    rows, results = [], []
    for shape in SHAPES:
        for batch in args.batch:
            for sparsity in args.sparsity:
                lanes = batch >= C.sparse_batched_from
                t = time_layer(C, shape, sparsity, batch, args.repeats, {"nchw": {}}, lanes=lanes)
                best = t["dense"] / (t["lanes"] if lanes else t["nchw"])
                results.append((shape, sparsity, batch, best))
                ms = lambda k: f"{t[k] * 1e3:.3f}" if k in t else "-"  # noqa: E731
                ratio = lambda k: f"{t['dense'] / t[k]:.2f}x" if k in t else "-"  # noqa: E731
                rows.append([shape.label(), str(batch), f"{sparsity:.2f}", ms("dense"), ms("nchw"), ms("lanes"),
                             ms("convert"), ratio("nchw"), ratio("lanes"), f"{1 / (1 - sparsity):.0f}x"])
                print(f"  {rows[-1]}", flush=True)
    print()
    print(table(["layer", "batch", "sparsity", "dense ms", "sparse ms (NCHW)", "lanes ms", "conversions ms",
                 "speedup NCHW", "speedup lanes", "MAC ratio (limit)"], rows))
    return results


def variants_table(C, args) -> None:
    variants = {isa: {"isa": isa, "algo": "direct"} for isa in ("avx512", "avx2", "scalar") if supports(C, isa)}
    variants["batched"] = {"algo": "batched"}
    variants["im2col"] = {"algo": "im2col"}
    variants["auto, fp32 CSR"] = {}
    variants["auto, codes"] = {"codes": True}
    rows = []
    for shape in SHAPES:
        for batch in args.batch:
            times = time_layer(C, shape, 0.9, batch, args.repeats, variants, bits=4)
            rows.append([shape.label(), str(batch)] + [f"{t * 1e3:.3f}" for t in times.values()])
    print()
    print(f"At 90% sparsity, weights quantized to 4 bits, ms, NCHW in and out (direct algorithm per isa; the "
          f"others use isa={C.kernel_isa()}; auto: direct below 8 images, batched from 8; codes: the weight "
          "as codes (code and gap bits per entry), unpacked per call):")
    print(table(["layer", "batch", "dense"] + list(variants), rows))


def supports(C, isa: str) -> bool:
    try:
        C.sparse_linear(torch.zeros(1, 1), torch.zeros(2, dtype=torch.int32), torch.zeros(0, dtype=torch.int32),
                        torch.zeros(0), isa=isa)
        return True
    except RuntimeError:
        return False


def plot(results, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len({b for *_, b, _ in results}), figsize=(12, 4.5), sharey=True, squeeze=False)
    for ax, batch in zip(axes[0], sorted({b for *_, b, _ in results})):
        for shape in SHAPES:
            pts = sorted((s, r) for sh, s, b, r in results if sh == shape and b == batch)
            ax.plot([s for s, _ in pts], [r for _, r in pts], marker="o", label=shape.label())
        xs = sorted({s for _, s, _, _ in results})
        ax.plot(xs, [1 / (1 - s) for s in xs], "k--", label="MAC ratio (limit)")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("sparsity")
        ax.set_title(f"batch {batch}")
    axes[0][0].set_ylabel("speedup over torch dense conv2d")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"pyprune sparse conv2d vs torch conv2d, {torch.get_num_threads()} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"\nplot: {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15, help="timed repeats per contender (medians)")
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9, 0.95])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--plot", default="bench/sparse_conv.png")
    p.add_argument("--no-variants", action="store_true", help="skip the ISA / algorithm table")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    C = _native.cpu()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, kernel isa {C.kernel_isa()}")
    results = speedup_table(C, args)
    if args.plot:
        plot(results, args.plot)
    if not args.no_variants:
        variants_table(C, args)


if __name__ == "__main__":
    main()
