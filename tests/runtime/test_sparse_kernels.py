"""The native sparse kernels (csrc/cpu/sparse*.cpp) against torch's dense conv2d / linear.

Every instruction-set path this CPU has (scalar always, AVX2 and AVX-512 where present)
and every convolution algorithm run on the same cases: strides 1 and 2, padding 0 and 1,
odd sizes, dilation, empty rows, fully dense and fully zero weights. The batched
algorithm and its lanes layout also run on batches that fill their groups of 8 or 16
images partly, exactly and more than once."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pyprune import _native
from tests.conftest import needs_gpu
from pyprune.runtime.kernels import CSR

C = _native.cpu()
ALL_ISAS = ["scalar", "avx2", "avx512"]
ALGOS = ["direct", "batched", "im2col"]


def isa_param(name: str):
    try:  # the kernel refuses an ISA the CPU lacks: that is the skip condition
        C.sparse_linear(torch.zeros(1, 1), torch.zeros(2, dtype=torch.int32), torch.zeros(0, dtype=torch.int32),
                        torch.zeros(0), isa=name)
        return pytest.param(name)
    except (RuntimeError, ValueError):
        return pytest.param(name, marks=pytest.mark.skip(reason=f"this CPU has no {name}"))


ISAS = [isa_param(n) for n in ALL_ISAS]


def to_csr(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    csr = CSR.from_dense(weight)  # its exactness is tested in test_kernels.py
    return csr.rowptr, csr.colidx, csr.values


def sparse_weight(shape: tuple[int, ...], density: float, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(shape, generator=gen)
    w[torch.rand(shape, generator=gen) >= density] = 0
    if shape[0] > 2:
        w[1] = 0  # an empty row: its output is bias (then ReLU) only
    return w


# (batch, in_ch, height, width, out_ch, kernel, stride, padding, dilation)
CONV_CASES = [
    (1, 3, 7, 9, 5, (3, 3), 1, 1, 1),
    (2, 16, 32, 32, 16, (3, 3), 1, 1, 1),  # a ResNet stage-1 layer
    (3, 5, 11, 6, 7, (3, 3), 2, 1, 1),  # stride 2, odd sizes
    (2, 4, 9, 9, 3, (1, 1), 2, 0, 1),  # 1x1 stride-2 downsample
    (1, 3, 10, 13, 4, (3, 3), 2, 0, 2),  # dilation with stride
    (2, 8, 8, 8, 6, (5, 5), 3, 2, 1),
    (1, 2, 5, 5, 3, (3, 3), 1, 0, 1),
    (1, 6, 7, 5, 4, (3, 1), (2, 1), (1, 0), 1),  # non-square kernel and stride
    (4, 64, 8, 8, 70, (3, 3), 1, 1, 1),  # rows spanning several work blocks
]


def pair(v):
    return tuple(v) if isinstance(v, tuple) else (v, v)


def run_conv(x, w, bias, stride, padding, dilation, relu, isa="auto", algo="direct"):
    rowptr, col, val = to_csr(w)
    return C.sparse_conv2d(x, rowptr, col, val, tuple(w.shape[2:]), bias, pair(stride), pair(padding),
                           pair(dilation), relu, isa, algo)


def reference_conv(x, w, bias, stride, padding, dilation, relu):
    y = F.conv2d(x, w, bias, pair(stride), pair(padding), pair(dilation))
    return F.relu(y) if relu else y


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_sparse_conv2d_matches_torch(case, density, isa, algo):
    n, c, h, w_, oc, k, stride, padding, dilation = case
    gen = torch.Generator().manual_seed(hash((case, density)) % 2**31)
    x = torch.randn(n, c, h, w_, generator=gen)
    w = sparse_weight((oc, c, *k), density, gen)
    bias = torch.randn(oc, generator=gen)
    for relu in (False, True):
        out = run_conv(x, w, bias, stride, padding, dilation, relu, isa, algo)
        expected = reference_conv(x, w, bias, stride, padding, dilation, relu)
        assert out.shape == expected.shape
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    # no bias: an all-zero weight gives exact zeros
    out = run_conv(x, w, None, stride, padding, dilation, False, isa, algo)
    torch.testing.assert_close(out, reference_conv(x, w, None, stride, padding, dilation, False), rtol=1e-4, atol=1e-4)
    if density == 0.0:
        assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("algo, batch", [("direct", 3), ("batched", 20)])
def test_sparse_conv2d_is_deterministic_across_thread_counts(algo, batch):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(batch, 16, 17, 15, generator=gen)
    w = sparse_weight((24, 16, 3, 3), 0.2, gen)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_conv(x, w, None, 1, 1, 1, True, algo=algo)
        torch.set_num_threads(2)
        two = run_conv(x, w, None, 1, 1, 1, True, algo=algo)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)  # each output is summed by one thread in a fixed order


# (in_ch, size, out_ch, kernel, stride, padding, dilation): a ResNet layer, a stride-2 one
# with an odd size, a 1x1 downsample, a dilated one.
LANES_CASES = [(16, 8, 16, 3, 1, 1, 1), (5, 11, 7, 3, 2, 1, 1), (8, 9, 4, 1, 2, 0, 1), (3, 10, 6, 3, 1, 2, 2)]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("batch", [1, 7, 8, 9, 16, 17, 33])
@pytest.mark.parametrize("case", LANES_CASES, ids=str)
def test_batched_conv2d_matches_torch_on_partial_and_whole_groups(case, batch, isa):
    c, size, oc, k, stride, padding, dilation = case
    gen = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, c, size, size + 1, generator=gen)
    w = sparse_weight((oc, c, k, k), 0.3, gen)
    bias = torch.randn(oc, generator=gen)
    out = run_conv(x, w, bias, stride, padding, dilation, True, isa, "batched")
    torch.testing.assert_close(out, reference_conv(x, w, bias, stride, padding, dilation, True), rtol=1e-4, atol=1e-4)


def lanes_reference(x: torch.Tensor, lanes: int, pad: int) -> torch.Tensor:
    """The lanes layout built by padding and permuting in torch."""
    n = x.shape[0]
    groups = -(-n // lanes)
    padded = F.pad(x, (pad, pad, pad, pad))
    padded = torch.cat([padded, padded.new_zeros(groups * lanes - n, *padded.shape[1:])])
    return padded.reshape(groups, lanes, *padded.shape[1:]).permute(0, 2, 3, 4, 1).contiguous()


@pytest.mark.parametrize("lanes", [8, 16])
@pytest.mark.parametrize("pad", [0, 1, 2])
@pytest.mark.parametrize("batch", [1, 8, 9, 16, 21])
def test_lanes_layout_is_padding_and_a_permutation(batch, pad, lanes):
    x = torch.randn(batch, 5, 9, 12, generator=torch.Generator().manual_seed(batch + pad))
    packed = C.to_lanes(x, lanes, pad)
    assert torch.equal(packed, lanes_reference(x, lanes, pad))
    assert torch.equal(C.from_lanes(packed, batch, pad), x)


def test_sparse_lanes_picks_a_lane_count_the_layout_takes():
    assert C.sparse_lanes(1) == 8 and C.sparse_lanes(64) in (8, 16)
    assert C.sparse_lanes(64) == (16 if C.kernel_isa() == "avx512" else 8)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("in_pad, out_pad", [(1, 1), (2, 0), (3, 2)])
@pytest.mark.parametrize("case", LANES_CASES, ids=str)
def test_sparse_conv2d_lanes_matches_torch(case, in_pad, out_pad, isa):
    c, size, oc, k, stride, padding, dilation = case
    if padding > in_pad:
        pytest.skip("the layout's border is narrower than the padding (refusal tested below)")
    gen = torch.Generator().manual_seed(in_pad * 10 + out_pad)
    batch = 19
    x = torch.randn(batch, c, size, size, generator=gen)
    w = sparse_weight((oc, c, k, k), 0.4, gen)
    bias = torch.randn(oc, generator=gen)
    lanes = C.sparse_lanes(batch)
    rowptr, col, val = to_csr(w)
    out = C.sparse_conv2d_lanes(C.to_lanes(x, lanes, in_pad), rowptr, col, val, (k, k), bias, (stride, stride),
                                (padding, padding), (dilation, dilation), True, isa, in_pad, out_pad)
    expected = reference_conv(x, w, bias, stride, padding, dilation, True)
    # the border is exactly zero (the next layer's padding); the lanes past the batch are dropped
    interior = lanes_reference(expected, lanes, out_pad)
    border = torch.ones_like(interior, dtype=torch.bool)
    border[:, :, out_pad:out.shape[2] - out_pad, out_pad:out.shape[3] - out_pad] = False
    assert torch.equal(out[border], torch.zeros_like(out[border]))
    torch.testing.assert_close(C.from_lanes(out, batch, out_pad), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("relu", [False, True])
def test_an_nchw_residual_is_added_before_the_relu(relu, algo):
    gen = torch.Generator().manual_seed(6)
    x, res = torch.randn(10, 6, 9, 7, generator=gen), torch.randn(10, 9, 5, 4, generator=gen)
    w, bias = sparse_weight((9, 6, 3, 3), 0.3, gen), torch.randn(9, generator=gen)
    out = C.sparse_conv2d(x, *to_csr(w), (3, 3), bias, (2, 2), (1, 1), (1, 1), relu, "auto", algo, residual=res)
    expected = F.conv2d(x, w, bias, 2, 1) + res
    torch.testing.assert_close(out, expected.relu() if relu else expected, rtol=1e-4, atol=1e-4)
    with pytest.raises((RuntimeError, ValueError), match="residual"):
        C.sparse_conv2d(x, *to_csr(w), (3, 3), bias, (2, 2), (1, 1), (1, 1), relu, residual=res[:, :, :4])


@pytest.mark.parametrize("relu", [False, True])
def test_a_residual_is_added_before_the_relu(relu):
    gen = torch.Generator().manual_seed(5)
    batch, lanes = 11, C.sparse_lanes(11)
    x, res = torch.randn(batch, 6, 8, 8, generator=gen), torch.randn(batch, 9, 8, 8, generator=gen)
    w, bias = sparse_weight((9, 6, 3, 3), 0.3, gen), torch.randn(9, generator=gen)
    out = C.sparse_conv2d_lanes(C.to_lanes(x, lanes, 1), *to_csr(w), (3, 3), bias, (1, 1), (1, 1), (1, 1), relu,
                                residual=C.to_lanes(res, lanes, 1))
    expected = F.conv2d(x, w, bias, 1, 1) + res
    torch.testing.assert_close(C.from_lanes(out, batch, 1), expected.relu() if relu else expected, rtol=1e-4, atol=1e-4)
    with pytest.raises((RuntimeError, ValueError), match="residual"):
        C.sparse_conv2d_lanes(C.to_lanes(x, lanes, 1), *to_csr(w), (3, 3), bias, (1, 1), (1, 1), (1, 1), relu,
                              residual=C.to_lanes(res, lanes, 2))


def test_lanes_arguments_are_checked():
    w = torch.randn(3, 2, 3, 3)
    rowptr, col, val = to_csr(w)
    x = torch.randn(9, 2, 5, 5)
    with pytest.raises((RuntimeError, ValueError), match="lanes must be 8 or 16"):
        C.to_lanes(x, 12, 1)
    packed = C.to_lanes(x, 8, 1)
    with pytest.raises((RuntimeError, ValueError), match="exceeds the layout"):
        C.sparse_conv2d_lanes(packed, rowptr, col, val, (3, 3), padding=(2, 2), in_pad=1)
    with pytest.raises((RuntimeError, ValueError), match="does not fill"):
        C.from_lanes(packed, 30, 1)
    with pytest.raises((RuntimeError, ValueError), match="lanes"):
        C.sparse_conv2d_lanes(torch.randn(1, 2, 7, 7, 5), rowptr, col, val, (3, 3), in_pad=1)
    with pytest.raises((RuntimeError, ValueError), match="column index"):
        C.sparse_conv2d_lanes(packed, rowptr, col + 100, val, (3, 3), in_pad=1)


def test_sparse_conv2d_accepts_non_contiguous_input():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 9, 9, 4, generator=gen).permute(0, 3, 1, 2)  # NHWC memory
    w = sparse_weight((5, 4, 3, 3), 0.4, gen)
    torch.testing.assert_close(run_conv(x, w, None, 1, 1, 1, False), F.conv2d(x, w, None, 1, 1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("batch", [1, 5, 16, 33])
def test_sparse_linear_matches_torch(batch, density, isa):
    gen = torch.Generator().manual_seed(batch * 10 + int(density * 10))
    x = torch.randn(batch, 37, generator=gen)
    w = sparse_weight((11, 37), density, gen)
    bias = torch.randn(11, generator=gen)
    rowptr, col, val = to_csr(w)
    for relu in (False, True):
        out = C.sparse_linear(x, rowptr, col, val, bias, relu, isa)
        expected = F.linear(x, w, bias)
        torch.testing.assert_close(out, F.relu(expected) if relu else expected, rtol=1e-4, atol=1e-4)
    if density == 0.0:  # no entries at all: exact zeros without bias
        assert torch.equal(C.sparse_linear(x, rowptr, col, val, isa=isa), torch.zeros(batch, 11))


def test_kernel_isa_names_a_path_the_kernels_accept():
    assert C.kernel_isa() in ALL_ISAS
    x = torch.randn(1, 2, 5, 5)
    w = torch.randn(3, 2, 3, 3)
    auto = run_conv(x, w, None, 1, 1, 1, False)
    named = run_conv(x, w, None, 1, 1, 1, False, isa=C.kernel_isa())
    assert torch.equal(auto, named)


@pytest.mark.parametrize("mutate, message", [
    (lambda rp, col, val: (rp, col + 100, val), "column index"),
    (lambda rp, col, val: (rp.flip(0).contiguous(), col, val), "rowptr"),
    (lambda rp, col, val: (rp, col[:-1].contiguous(), val), "entries"),
    (lambda rp, col, val: (rp.long(), col, val), "Int"),
    (lambda rp, col, val: (rp, col, val.double()), "Float"),
])
def test_malformed_csr_is_refused_with_a_message(mutate, message):
    w = torch.randn(3, 2, 3, 3)
    rowptr, col, val = mutate(*to_csr(w))
    with pytest.raises((RuntimeError, ValueError), match=message):
        C.sparse_conv2d(torch.randn(1, 2, 5, 5), rowptr, col, val, (3, 3))


def test_bad_arguments_are_refused():
    w = torch.randn(3, 2, 3, 3)
    rowptr, col, val = to_csr(w)
    x = torch.randn(1, 2, 5, 5)
    with pytest.raises((RuntimeError, ValueError), match="isa"):
        C.sparse_conv2d(x, rowptr, col, val, (3, 3), isa="sse9")
    with pytest.raises((RuntimeError, ValueError), match="algo"):
        C.sparse_conv2d(x, rowptr, col, val, (3, 3), algo="fft")
    with pytest.raises((RuntimeError, ValueError), match="larger than the padded input"):
        C.sparse_conv2d(torch.randn(1, 2, 2, 2), rowptr, col, val, (3, 3))
    with pytest.raises((RuntimeError, ValueError), match="bias"):
        C.sparse_conv2d(x, rowptr, col, val, (3, 3), torch.zeros(4))
    with pytest.raises((RuntimeError, ValueError), match="input"):
        C.sparse_conv2d(x[0], rowptr, col, val, (3, 3))


# ---- CUDA --------------------------------------------------------------------------------

# The CUDA kernel's per-block and per-thread code (csrc/common/sparse_conv_tile.h) runs in
# the CPU extension too, grid and chunks as on the device: checked here without a GPU.
# CONV_CASES has planes larger than one 128-pixel tile and smaller than one, and rows of
# up to 576 entries (several 128-entry chunks).


@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_the_cuda_kernels_logic_matches_torch_on_the_host(case, density):
    n, c, h, w_, oc, k, stride, padding, dilation = case
    gen = torch.Generator().manual_seed(hash((case, density)) % 2**31)
    x = torch.randn(n, c, h, w_, generator=gen)
    w = sparse_weight((oc, c, *k), density, gen)
    bias = torch.randn(oc, generator=gen)
    rowptr, col, val = to_csr(w)
    for relu, b in ((False, None), (True, bias), (False, bias)):
        out = C.sparse_conv2d_portable(x, rowptr, col, val, k, b, pair(stride), pair(padding), pair(dilation), relu)
        torch.testing.assert_close(out, reference_conv(x, w, b, stride, padding, dilation, relu), rtol=1e-4, atol=1e-4)
    if density == 0.0:
        out = C.sparse_conv2d_portable(x, rowptr, col, val, k, None, pair(stride), pair(padding), pair(dilation))
        assert torch.equal(out, torch.zeros_like(out))  # no entries, no bias: exact zeros


@pytest.mark.parametrize("mutate, message", [
    (lambda rp, col, val: (rp, col + 100, val), "column index"),
    (lambda rp, col, val: (rp.flip(0).contiguous(), col, val), "rowptr"),
    (lambda rp, col, val: (rp, col[:-1].contiguous(), val), "entries"),
])
def test_the_cuda_kernels_host_path_refuses_malformed_csr(mutate, message):
    rowptr, col, val = mutate(*to_csr(torch.randn(3, 2, 3, 3)))
    with pytest.raises((RuntimeError, ValueError), match=message):
        C.sparse_conv2d_portable(torch.randn(1, 2, 5, 5), rowptr, col, val, (3, 3))




@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_cuda_sparse_conv2d_matches_torch_on_the_cpu(C_cuda, case, density):
    # The reference runs on the CPU: cuDNN may use TF32, which is less precise than our kernel.
    n, c, h, w_, oc, k, stride, padding, dilation = case
    gen = torch.Generator().manual_seed(hash((case, density)) % 2**31)
    x = torch.randn(n, c, h, w_, generator=gen)
    w = sparse_weight((oc, c, *k), density, gen)
    bias = torch.randn(oc, generator=gen)
    rowptr, col, val = (t.cuda() for t in to_csr(w))
    for relu, b in ((False, None), (True, bias)):
        out = C_cuda.sparse_conv2d(x.cuda(), rowptr, col, val, k, None if b is None else b.cuda(), pair(stride),
                                   pair(padding), pair(dilation), relu)
        assert out.is_cuda
        torch.testing.assert_close(out.cpu(), reference_conv(x, w, b, stride, padding, dilation, relu),
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@needs_gpu
def test_cuda_sparse_conv2d_refuses_bad_input(C_cuda):
    w = torch.randn(3, 2, 3, 3)
    rowptr, col, val = (t.cuda() for t in to_csr(w))
    x = torch.randn(1, 2, 5, 5, device="cuda")
    with pytest.raises(RuntimeError, match="column index"):
        C_cuda.sparse_conv2d(x, rowptr, col + 100, val, (3, 3))
    with pytest.raises(RuntimeError, match="must be on"):
        C_cuda.sparse_conv2d(x, rowptr.cpu(), col, val, (3, 3))
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        C_cuda.sparse_conv2d(x.cpu(), rowptr, col, val, (3, 3))
