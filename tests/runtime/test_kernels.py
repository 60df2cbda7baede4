"""CSR format and the sparse kernel wrappers, against plain torch."""

import pytest
import torch
import torch.nn.functional as F

from pyprune import _native
from pyprune.runtime import CSR, CodesCSR, reference_conv2d, reference_linear, sparse_conv2d, sparse_linear


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


# ---- codes: one byte per entry -------------------------------------------------------------

def quantized_weight(shape, levels, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    book = torch.randn(levels, generator=g)
    w = book[torch.randint(0, levels, shape, generator=g)]
    return torch.where(torch.rand(shape, generator=g) < density, w, 0.0)


def entries_by_hand(weight, code_bits, gap_bits):
    """The documented layout, row by row in plain Python: each entry gap - 1 above the
    code, fillers of code 0 and the widest gap where a gap is wider than the field holds,
    all entries one after the other in a little-endian bit stream."""
    rows = weight.reshape(weight.shape[0], -1)
    book = sorted(set(rows[rows != 0].tolist()))
    widest = 1 << gap_bits
    values = []
    for r in range(rows.shape[0]):
        col = -1
        for c in rows[r].nonzero().flatten().tolist():
            gap = c - col
            while gap > widest:
                values.append((widest - 1) << code_bits)
                gap -= widest
            values.append(((gap - 1) << code_bits) | (book.index(rows[r, c].item()) + 1))
            col = c
    width = code_bits + gap_bits
    stream = sum(v << (i * width) for i, v in enumerate(values))
    return list(stream.to_bytes((len(values) * width + 7) // 8, "little"))


@pytest.mark.parametrize("levels, density, code_bits", [
    (1, 0.3, 1), (3, 0.5, 2), (8, 0.1, 4), (8, 0.02, 4), (15, 0.6, 4), (16, 0.3, 5), (127, 0.9, 7),
    (255, 0.9, 8)])
def test_codes_layout_and_round_trip(levels, density, code_bits):
    weight = quantized_weight((12, 9, 3, 3), levels, density, seed=levels)
    present = int(torch.unique(weight[weight != 0]).numel())
    codes = CodesCSR.from_dense(weight)
    assert codes.code_bits == max(1, present.bit_length()) and (present < levels or codes.code_bits == code_bits)
    assert codes.entries.tolist() == entries_by_hand(weight, codes.code_bits, codes.gap_bits)
    # the gap width is the one that makes the stream smallest
    sizes = {g: len(entries_by_hand(weight, codes.code_bits, g)) for g in range(1, 9)}
    assert sizes[codes.gap_bits] == min(sizes.values())
    assert torch.equal(codes.to_dense(), weight)
    assert codes.codebook[0] == 0 and codes.codebook.numel() == present + 1


def test_codes_are_refused_past_255_values_a_row():
    assert CodesCSR.from_dense(quantized_weight((20, 600), 100_000, 0.9)) is None  # ~540 values a row
    assert CodesCSR.from_dense(quantized_weight((20, 600), 255, 1.0)) is not None


@pytest.mark.parametrize("levels, density", [(4, 0.05), (8, 0.3), (100, 0.5)])
def test_native_kernels_on_codes_match_fp32_csr(levels, density):
    weight = quantized_weight((16, 8, 3, 3), levels, density)
    codes, csr = CodesCSR.from_dense(weight), CSR.from_dense(weight)
    x = torch.randn(9, 8, 10, 10)
    native = _native.cpu()
    for algo in ("direct", "batched"):  # fillers add zeros: the same sums, exactly
        on_codes, on_csr = (native.sparse_conv2d(x, *w.kernel_args(), (3, 3), None, (1, 1), (1, 1), (1, 1), True,
                                                 "auto", algo, **w.kernel_kwargs()) for w in (codes, csr))
        assert torch.equal(on_codes, on_csr)
    linear = quantized_weight((7, 50), levels, density)
    xl = torch.randn(5, 50)
    torch.testing.assert_close(sparse_linear(xl, CodesCSR.from_dense(linear), None, False),
                               F.linear(xl, linear), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_codes_unpacked_in_chunks_of_rows_match_fp32_csr_at_any_thread_count(threads):
    """Weights of 8,192 entries and more are unpacked by chunks of rows, one per thread,
    and the gaps the dropped fillers leave are closed after: the same CSR for any count."""
    weight = quantized_weight((128, 128, 3, 3), 8, 0.08)
    codes, csr = CodesCSR.from_dense(weight), CSR.from_dense(weight)
    assert codes.n_entries >= 8192 and codes.n_entries > csr.nnz  # fillers present
    x = torch.randn(1, 128, 6, 6)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        on_codes, on_csr = (_native.cpu().sparse_conv2d(x, *w.kernel_args(), (3, 3), None, (1, 1), (1, 1), (1, 1),
                                                        False, **w.kernel_kwargs()) for w in (codes, csr))
        assert torch.equal(on_codes, on_csr)
        bad = codes.entries.clone()
        bad[-1] = 255  # the last row's last entries: a code past the codebook or a column past the end
        with pytest.raises((RuntimeError, ValueError), match="past"):
            _native.cpu().sparse_conv2d(x, codes.rowptr, bad, codes.codebook, (3, 3), gap_bits=codes.gap_bits)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("mutate, message", [
    (lambda rp, e, book: (rp, e, book[:1].contiguous()), "codebook has 2 to 256"),
    (lambda rp, e, book: (rp, torch.full_like(e, 255), book), "past"),
    (lambda rp, e, book: (rp.flip(0).contiguous(), e, book), "rowptr"),
    (lambda rp, e, book: (rp, e[:-1].contiguous(), book), "bytes"),
])
def test_malformed_codes_are_refused(mutate, message):
    codes = CodesCSR.from_dense(quantized_weight((3, 2, 3, 3), 4, 0.5))
    with pytest.raises((RuntimeError, ValueError), match=message):
        _native.cpu().sparse_conv2d(torch.randn(1, 2, 5, 5), *mutate(*codes.kernel_args()), (3, 3),
                                    **codes.kernel_kwargs())
    with pytest.raises((RuntimeError, ValueError), match="gap_bits"):
        _native.cpu().sparse_conv2d(torch.randn(1, 2, 5, 5), *codes.kernel_args(), (3, 3))


def test_rows_scaled_apart_get_a_codebook_each():
    """BatchNorm folded into a quantized layer: every row its own scale of one codebook."""
    g = torch.Generator().manual_seed(0)
    weight = quantized_weight((40, 6, 3, 3), 8, 0.4) * (torch.rand(40, 1, 1, 1, generator=g) + 0.5)
    assert torch.unique(weight).numel() > 128
    codes = CodesCSR.from_dense(weight)
    assert codes.codebook.shape == (40, 9) and codes.code_bits == 4
    assert torch.equal(codes.to_dense(), weight)
    x = torch.randn(3, 6, 7, 7)
    torch.testing.assert_close(sparse_conv2d(x, codes, None, (1, 1), (1, 1), (1, 1), False),
                               F.conv2d(x, weight, None, 1, 1), rtol=1e-5, atol=1e-5)
    with pytest.raises((RuntimeError, ValueError), match="per row"):
        _native.cpu().sparse_conv2d(x, codes.rowptr, codes.entries, codes.codebook[:5].contiguous(), (3, 3),
                                    gap_bits=codes.gap_bits)


def test_a_folded_layer_keeps_one_codebook_and_a_factor_per_row():
    """Folding computes weight * factor per row; codes of the weight times the factor
    rebuild it bit for bit, with one shared codebook instead of one per row."""
    g = torch.Generator().manual_seed(1)
    quantized = quantized_weight((40, 6, 3, 3), 8, 0.4)
    factor = torch.rand(40, generator=g) + 0.5
    folded = quantized * factor.view(-1, 1, 1, 1) + 0.0
    codes = CodesCSR.from_folded(quantized, folded)
    assert codes.row_scale is not None and codes.codebook.shape == (9,)
    assert torch.equal(codes.to_dense(), folded)
    assert codes.nbytes < CodesCSR.from_dense(folded).nbytes  # 40 factors, not 40 codebooks
    x = torch.randn(3, 6, 7, 7)
    for algo in ("direct", "batched"):
        out = _native.cpu().sparse_conv2d(x, *codes.kernel_args(), (3, 3), None, (1, 1), (1, 1), (1, 1), False,
                                          "auto", algo, **codes.kernel_kwargs())
        torch.testing.assert_close(out, F.conv2d(x, folded, None, 1, 1), rtol=1e-5, atol=1e-5)
    # not a product of the two: the folded weight's own codes
    other = folded.clone()
    other[0, 0, 0, 0] = 123.0
    assert CodesCSR.from_folded(quantized, other).row_scale is None
    with pytest.raises((RuntimeError, ValueError), match="row_scale"):
        csr = CSR.from_dense(folded)
        _native.cpu().sparse_conv2d(x, *csr.kernel_args(), (3, 3), row_scale=factor)
