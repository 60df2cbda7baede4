"""CSR format and the sparse kernel wrappers, against plain torch."""

import pytest
import torch
import torch.nn.functional as F

from pyprune.runtime import CSR, reference_conv2d, reference_linear, sparse_conv2d, sparse_linear


def sparse_weight(shape, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    return torch.where(torch.rand(shape, generator=g) < density, w, 0.0)  # +0.0, not -0.0


def bits(t):
    return t.contiguous().view(-1).view(torch.int32)


@pytest.mark.parametrize("weight", [
    sparse_weight((16, 8, 3, 3), 0.2),
    sparse_weight((10, 64), 0.5),
    torch.zeros(4, 3, 3, 3),                                              # fully zero
    torch.randn(5, 2, 1, 1) + 10.0,                                       # fully dense
    torch.cat([torch.zeros(2, 4, 3, 3), sparse_weight((3, 4, 3, 3), 0.3), torch.zeros(1, 4, 3, 3)]),  # empty rows
    sparse_weight((6, 3, 5, 3), 0.4),                                     # non-square kernel
], ids=["conv", "linear", "zero", "dense", "empty-rows", "5x3"])
def test_csr_round_trip_is_exact(weight):
    csr = CSR.from_dense(weight)
    assert csr.rowptr.dtype == csr.colidx.dtype == torch.int32 and csr.values.dtype == torch.float32
    assert csr.rowptr.shape == (weight.shape[0] + 1,) and csr.nnz == int((weight != 0).sum())
    assert csr.kernel_size == tuple(weight.shape[2:]) and csr.shape == tuple(weight.shape)
    assert torch.equal(bits(csr.to_dense()), bits(weight))
    rows = weight.reshape(weight.shape[0], -1)
    for r in range(rows.shape[0]):  # the documented layout, row by row
        lo, hi = int(csr.rowptr[r]), int(csr.rowptr[r + 1])
        cols = rows[r].nonzero().flatten()
        assert torch.equal(csr.colidx[lo:hi].long(), cols) and torch.equal(csr.values[lo:hi], rows[r][cols])


def test_csr_column_is_ic_kh_kw():
    w = torch.zeros(2, 3, 2, 4)
    w[1, 2, 1, 3] = 7.0
    csr = CSR.from_dense(w)
    assert csr.rowptr.tolist() == [0, 0, 1] and csr.colidx.tolist() == [(2 * 2 + 1) * 4 + 3]


def test_csr_refuses_what_it_cannot_hold():
    with pytest.raises(ValueError, match="float32"):
        CSR.from_dense(torch.ones(2, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="2 dimensions"):
        CSR.from_dense(torch.ones(3))
    good = CSR.from_dense(torch.eye(3))
    with pytest.raises(ValueError, match="out of range"):
        CSR(good.rowptr, torch.tensor([0, 1, 5], dtype=torch.int32), good.values, good.shape)
    with pytest.raises(ValueError, match="int32"):
        CSR(good.rowptr.long(), good.colidx, good.values, good.shape)


@pytest.mark.parametrize("stride,padding,dilation", [((1, 1), (1, 1), (1, 1)), ((2, 2), (0, 1), (1, 1)),
                                                     ((1, 2), (2, 2), (2, 1))])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("relu", [False, True])
def test_sparse_conv2d_matches_torch(stride, padding, dilation, bias, relu):
    w = sparse_weight((12, 5, 3, 3), 0.3, seed=1)
    b = torch.randn(12) if bias else None
    x = torch.randn(2, 5, 9, 11)
    want = F.conv2d(x, w, b, stride, padding, dilation)
    want = want.relu() if relu else want
    csr = CSR.from_dense(w)
    got = sparse_conv2d(x, csr, b, stride, padding, dilation, relu)
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)
    # The reference is the independent expectation for the native kernel, where one is built.
    assert torch.allclose(got, reference_conv2d(x, csr, b, stride, padding, dilation, relu), atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("relu", [False, True])
def test_sparse_linear_matches_torch(bias, relu):
    w = sparse_weight((10, 37), 0.25, seed=2)
    b = torch.randn(10) if bias else None
    x = torch.randn(4, 37)
    want = F.linear(x, w, b)
    want = want.relu() if relu else want
    csr = CSR.from_dense(w)
    assert torch.allclose(sparse_linear(x, csr, b, relu), want, atol=1e-5)
    assert torch.allclose(sparse_linear(x, csr, b, relu), reference_linear(x, csr, b, relu), atol=1e-5)


def test_wrappers_take_non_contiguous_inputs_and_refuse_wrong_ones():
    w = sparse_weight((4, 3, 3, 3), 0.5)
    x = torch.randn(1, 8, 8, 3).permute(0, 3, 1, 2)  # channels-last view
    assert torch.allclose(sparse_conv2d(x, CSR.from_dense(w), None, (1, 1), (1, 1), (1, 1), False),
                          F.conv2d(x, w, None, 1, 1), atol=1e-5)
    with pytest.raises(ValueError, match="float32"):
        sparse_conv2d(x.double(), CSR.from_dense(w), None, (1, 1), (1, 1), (1, 1), False)
    with pytest.raises(ValueError, match="4-D"):
        sparse_conv2d(x, CSR.from_dense(torch.ones(4, 3)), None, (1, 1), (1, 1), (1, 1), False)


def test_negative_zero_is_not_stored():
    csr = CSR.from_dense(torch.tensor([[-0.0, 1.0], [0.0, -0.0]]))
    assert csr.nnz == 1 and torch.equal(bits(csr.to_dense()), bits(torch.tensor([[0.0, 1.0], [0.0, 0.0]])))
