"""Inference modules the runtime puts in place of a Conv2d or Linear layer.

Both paths compute ``relu?(layer(x))`` with the bias fused in: the dense path is
torch's own module (``nn.Conv2d`` / ``nn.Linear``, or torch's fused
``ConvReLU2d`` / ``LinearReLU`` container when a ReLU was fused into the layer);
the sparse path is :class:`SparseConv2d` / :class:`SparseLinear` over a CSR weight.
All are inference only: no parameter requires a gradient.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.ao.nn.intrinsic import ConvReLU2d, LinearReLU

from .kernels import CSR, CodesCSR, sparse_conv2d, sparse_linear

Layer = nn.Conv2d | nn.Linear


def unfused(module: nn.Module) -> tuple[nn.Module, bool]:
    """``(layer, relu)`` of a layer or of torch's fused layer+ReLU container."""
    if isinstance(module, (ConvReLU2d, LinearReLU)):
        return module[0], True
    return module, False


def sparse_supported(module: nn.Module, input_shape: tuple[int, ...] | None) -> str | None:
    """Why the sparse kernels cannot run this layer, or None if they can."""
    layer, _ = unfused(module)
    if type(layer) is nn.Conv2d:
        if layer.groups != 1:
            return f"groups={layer.groups} (the sparse kernel needs 1)"
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            return f"padding {layer.padding!r} mode {layer.padding_mode}"
        if input_shape is not None and len(input_shape) != 4:
            return f"input of shape {input_shape}"
    elif type(layer) is nn.Linear:
        if input_shape is not None and len(input_shape) != 2:
            return f"input of shape {input_shape} (the sparse kernel takes [N, IN])"
    else:
        return f"{type(layer).__name__} has no sparse kernel"
    if layer.weight.dtype != torch.float32 or layer.weight.device.type != "cpu":
        return f"weight is {layer.weight.dtype} on {layer.weight.device}"
    return None


def _frozen(module: nn.Module) -> nn.Module:
    return module.eval().requires_grad_(False)


def dense_layer(layer: Layer, relu: bool) -> nn.Module:
    """The dense path: ``layer`` itself, or torch's fused container with a ReLU after it."""
    if not relu:
        return _frozen(layer)
    # In place is safe (the layer's output is a fresh tensor) and saves allocating
    # and writing a second activation of the same size.
    fused = ConvReLU2d(layer, nn.ReLU(inplace=True)) if isinstance(layer, nn.Conv2d) else \
        LinearReLU(layer, nn.ReLU(inplace=True))
    return _frozen(fused)


class _SparseLayer(nn.Module):
    """Holds the weight (also as buffers, so ``state_dict`` shows it) and the bias: as
    :class:`CodesCSR` (code and gap bits per non-zero) when it is codebook-quantized and
    ``codes`` is on, else as fp32 :class:`CSR`. The kernels take either. ``unfolded`` is
    the weight before BatchNorm was folded in, which lets codes keep one codebook."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, relu: bool, codes: bool = True,
                 unfolded: torch.Tensor | None = None) -> None:
        super().__init__()
        # Detached: a folded weight may still require grad, and what is computed from it
        # (the codes' per-row factors) would carry its history, which copies refuse.
        weight = weight.detach()
        as_codes = None
        if codes:
            as_codes = CodesCSR.from_folded(unfolded, weight) if unfolded is not None else CodesCSR.from_dense(weight)
        self.csr: CSR | CodesCSR = as_codes or CSR.from_dense(weight)
        for name, t in zip(self.csr.FIELDS, self.csr.kernel_args()):
            self.register_buffer(name, t)
        self.register_buffer("row_scale", getattr(self.csr, "row_scale", None))
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())
        self.relu = relu
        self.sparsity = float((weight == 0).float().mean())
        self.nnz = int((weight != 0).sum())

    @property
    def weight_bytes(self) -> int:
        """Bytes the weight takes in memory."""
        return self.csr.nbytes

    def extra_repr(self) -> str:
        form = f"codes of {self.csr.code_bits} bits" if isinstance(self.csr, CodesCSR) else "fp32 CSR"
        if getattr(self.csr, "row_scale", None) is not None:
            form += " times a factor per row"
        return (f"shape={self.csr.shape}, nnz={self.nnz}, {form}, {self.weight_bytes} bytes, bias={self.bias is not None}, "
                f"relu={self.relu}")


class SparseConv2d(_SparseLayer):
    """``relu?(conv2d(x, W, b))`` of a groups-1 ``nn.Conv2d`` with zero padding, on its CSR.
    Given a ``residual`` of its output's shape it returns ``relu?(conv2d(x, W, b) +
    residual)``, the ReLU when its own or when ``relu_after_residual`` is set (see
    :mod:`.residual`)."""

    def __init__(self, conv: nn.Conv2d, relu: bool = False, codes: bool = True,
                 unfolded: torch.Tensor | None = None) -> None:
        reason = sparse_supported(conv, None)
        if reason:
            raise ValueError(f"SparseConv2d cannot run this convolution: {reason}")
        super().__init__(conv.weight, conv.bias, relu, codes, unfolded)
        self.stride, self.padding, self.dilation = tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation)
        self.relu_after_residual = False

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        relu = self.relu or (residual is not None and self.relu_after_residual)
        return sparse_conv2d(x, self.csr, self.bias, self.stride, self.padding, self.dilation, relu,
                             residual=residual)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, stride={self.stride}, padding={self.padding}, dilation={self.dilation}"


class SparseLinear(_SparseLayer):
    """``relu?(linear(x, W, b))`` of an ``nn.Linear`` on a ``[N, IN]`` input, on its CSR."""

    def __init__(self, linear: nn.Linear, relu: bool = False, codes: bool = True,
                 unfolded: torch.Tensor | None = None) -> None:
        super().__init__(linear.weight, linear.bias, relu, codes, unfolded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sparse_linear(x, self.csr, self.bias, self.relu)


def sparse_layer(layer: Layer, relu: bool, codes: bool = True, unfolded: torch.Tensor | None = None) -> nn.Module:
    """The sparse path for ``layer`` (check :func:`sparse_supported` first); ``unfolded``
    is its weight before BatchNorm was folded in, which codes keep apart."""
    kind = SparseConv2d if isinstance(layer, nn.Conv2d) else SparseLinear
    return kind(layer, relu, codes, unfolded)
