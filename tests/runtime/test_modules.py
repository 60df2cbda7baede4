"""The sparse and dense inference modules against the torch layers they replace."""

import pytest
import torch
from torch import nn
from torch.ao.nn.intrinsic import ConvReLU2d, LinearReLU

from pyprune.runtime import SparseConv2d, SparseLinear
from pyprune.runtime.modules import dense_layer, sparse_layer, sparse_supported, unfused


def pruned(layer, density=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.mul_(torch.rand(layer.weight.shape, generator=g) < density)
    return layer.eval()


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_sparse_conv_module_matches_conv(relu, bias):
    conv = pruned(nn.Conv2d(6, 10, 3, stride=2, padding=1, dilation=1, bias=bias))
    x = torch.randn(3, 6, 15, 15)
    with torch.no_grad():
        want = conv(x).relu() if relu else conv(x)
        sparse, dense = SparseConv2d(conv, relu), dense_layer(conv, relu)
        assert torch.allclose(sparse(x), want, atol=1e-5) and torch.equal(dense(x), want)
    assert isinstance(dense, ConvReLU2d if relu else nn.Conv2d)
    assert sparse.sparsity == pytest.approx((conv.weight == 0).float().mean().item())
    assert not any(p.requires_grad for p in dense.parameters()) and "nnz=" in repr(sparse)


def quantized(layer, levels: int, density=0.3, seed=0):
    """``layer`` pruned, its remaining weights snapped to ``levels`` values."""
    g = torch.Generator().manual_seed(seed)
    book = torch.randn(levels, generator=g)
    with torch.no_grad():
        layer.weight.copy_(book[torch.randint(0, levels, layer.weight.shape, generator=g)])
    return pruned(layer, density, seed)


@pytest.mark.parametrize("levels, codes, form", [(8, True, "codes of 4 bits"), (4, True, "codes of 3 bits"),
                                                 (8, False, "fp32 CSR"), (100_000, True, "fp32 CSR")])
# rows of 576 and 1000 columns: unquantized at 70% density, more than 255 values a row
@pytest.mark.parametrize("make, shape", [(lambda: nn.Conv2d(64, 10, 3, padding=1), (3, 64, 9, 9)),
                                         (lambda: nn.Linear(1000, 7), (5, 1000))])
def test_a_quantized_layer_is_held_as_codes(make, shape, levels, codes, form):
    layer = quantized(make(), levels, density=0.7 if levels > 128 else 0.3)
    sparse = sparse_layer(layer, relu=True, codes=codes)
    x = torch.randn(shape)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), layer(x).relu(), rtol=1e-4, atol=1e-4)
    assert form in repr(sparse)
    nnz = int((layer.weight != 0).sum())
    if form.startswith("codes"):  # code and gap bits per entry, under a byte at 30% density, not eight bytes
        c = sparse.csr
        assert c.n_entries >= nnz and c.entries.numel() == -(-c.n_entries * (c.code_bits + c.gap_bits) // 8)
        assert sparse.weight_bytes == 4 * (layer.weight.shape[0] + 1) + 4 * (levels + 1) + c.entries.numel()
        assert c.entries.numel() < nnz
    else:
        assert sparse.weight_bytes == 8 * nnz + 4 * (layer.weight.shape[0] + 1)


@pytest.mark.parametrize("relu", [False, True])
def test_sparse_linear_module_matches_linear(relu):
    linear = pruned(nn.Linear(20, 7))
    x = torch.randn(5, 20)
    with torch.no_grad():
        want = linear(x).relu() if relu else linear(x)
        sparse, dense = sparse_layer(linear, relu), dense_layer(linear, relu)
        assert isinstance(sparse, SparseLinear) and isinstance(dense, LinearReLU if relu else nn.Linear)
        assert torch.allclose(sparse(x), want, atol=1e-5) and torch.equal(dense(x), want)
    assert unfused(dense) == (linear, relu)


def test_what_the_sparse_kernels_refuse():
    assert sparse_supported(nn.Conv2d(4, 4, 3), (1, 4, 8, 8)) is None
    assert "groups" in sparse_supported(nn.Conv2d(4, 4, 3, groups=2), (1, 4, 8, 8))
    assert "padding" in sparse_supported(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), (1, 4, 8, 8))
    assert "Conv1d" in sparse_supported(nn.Conv1d(4, 4, 3), (1, 4, 8))
    assert "input of shape" in sparse_supported(nn.Linear(4, 2), (1, 3, 4))
    with pytest.raises(ValueError, match="groups"):
        SparseConv2d(nn.Conv2d(4, 4, 3, groups=4))
