"""Native extensions: pyprune._C (CPU) and pyprune._C_cuda, against torch as reference."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from pyprune import _native
from tests.conftest import needs_gpu

SHAPES = [(0,), (1,), (7,), (3, 5), (64, 3, 3, 3), (2, 0, 4), (100_003,)]  # last: above the OpenMP grain
MASK_DTYPES = [torch.bool, torch.uint8, torch.float32]


def reference(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return weight * (mask != 0)


def random_mask(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    keep = torch.rand(shape, generator=gen) < 0.5
    if dtype == torch.float32:  # non-binary values too: any nonzero keeps
        return torch.randn(shape, generator=gen) * keep
    if dtype == torch.uint8:
        return torch.randint(0, 4, shape, generator=gen, dtype=torch.uint8) * keep
    return keep


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Exact equality, NaN and the sign of zero included."""
    assert actual.dtype == expected.dtype == torch.float32
    assert actual.shape == expected.shape
    assert torch.equal(actual.contiguous().view(torch.int32), expected.contiguous().view(torch.int32))


@pytest.fixture(scope="module")
def C():
    return _native.cpu()


# ---- CPU -------------------------------------------------------------------------


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_apply_mask_matches_reference(C, shape, mask_dtype):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=gen)
    mask = random_mask(shape, mask_dtype, gen)
    out = C.apply_mask(weight, mask)
    assert_bitwise_equal(out, reference(weight, mask))
    assert out.is_contiguous()
    assert out.data_ptr() != weight.data_ptr() or weight.numel() == 0  # a new tensor


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES, ids=str)
def test_apply_mask_non_contiguous(C, mask_dtype):
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(40, 30, generator=gen).t()  # transposed view
    mask = random_mask((60, 40), mask_dtype, gen)[::2]  # strided rows
    assert not weight.is_contiguous() and not mask.is_contiguous()
    assert_bitwise_equal(C.apply_mask(weight, mask), reference(weight, mask))
    w_slice = torch.randn(8, 16, 3, generator=gen)[:, ::4, 1]
    m_slice = random_mask((8, 4), mask_dtype, gen)
    assert_bitwise_equal(C.apply_mask(w_slice, m_slice), reference(w_slice, m_slice))


def test_apply_mask_special_values(C):
    weight = torch.tensor([float("nan"), float("inf"), -float("inf"), -1.5, -0.0, 2.0] * 2)
    mask = torch.tensor([0.0] * 6 + [1.0] * 6)
    mask[0] = -0.0  # negative zero masks out
    mask[-1] = float("nan")  # NaN != 0: keeps
    assert_bitwise_equal(C.apply_mask(weight, mask), reference(weight, mask))


def test_apply_mask_does_not_modify_inputs(C):
    weight = torch.randn(10)
    mask = torch.zeros(10, dtype=torch.bool)
    before = weight.clone()
    C.apply_mask(weight, mask)
    assert torch.equal(weight, before)


def test_apply_mask_shape_mismatch(C):
    with pytest.raises(RuntimeError, match=r"shapes differ: \[3, 4\] vs \[4, 3\]"):
        C.apply_mask(torch.zeros(3, 4), torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="shapes differ"):
        C.apply_mask(torch.zeros(12), torch.ones(3, 4, dtype=torch.bool))  # same numel, no broadcasting


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.int32])
def test_apply_mask_rejects_weight_dtype(C, dtype):
    with pytest.raises(RuntimeError, match="weight must be float32, got"):
        C.apply_mask(torch.zeros(4, dtype=dtype), torch.ones(4, dtype=torch.bool))


@pytest.mark.parametrize("dtype", [torch.int32, torch.float64, torch.int8])
def test_apply_mask_rejects_mask_dtype(C, dtype):
    with pytest.raises(RuntimeError, match="mask must be bool, uint8 or float32, got"):
        C.apply_mask(torch.zeros(4), torch.ones(4, dtype=dtype))


def test_apply_mask_rejects_non_tensor(C):
    with pytest.raises(TypeError):
        C.apply_mask([1.0, 2.0], torch.ones(2, dtype=torch.bool))


def test_openmp_linked(C):
    threads = C.omp_max_threads()
    assert isinstance(threads, int) and threads >= 1


# ---- CUDA ------------------------------------------------------------------------

needs_nvcc = pytest.mark.skipif(
    shutil.which("nvcc") is None or os.environ.get("PYPRUNE_CUDA") == "0",
    reason="no nvcc on PATH (or PYPRUNE_CUDA=0): the CUDA extension is not built here",
)


@needs_nvcc
def test_cuda_extension_built():
    assert _native.has_cuda_extension(), "nvcc exists here, so setup.py should have built pyprune._C_cuda"
    mod = _native.cuda(required=True)
    assert callable(mod.apply_mask)


def test_cuda_accessor_when_missing(monkeypatch):
    def fail(name):
        raise ImportError(f"No module named 'pyprune.{name}'")

    monkeypatch.setattr(_native, "_load", fail)
    assert _native.cuda() is None
    assert not _native.has_cuda_extension()
    with pytest.raises(ImportError, match="pip install -e . --no-build-isolation"):
        _native.cuda(required=True)
    with pytest.raises(ImportError, match="pyprune._C is not built"):
        _native.cpu()


@needs_nvcc
def test_cuda_rejects_cpu_tensors():
    mod = _native.cuda(required=True)
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        mod.apply_mask(torch.zeros(4), torch.ones(4, dtype=torch.bool))




@pytest.mark.parametrize("mask_dtype", MASK_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES + [(3_000_000,)], ids=str)  # last: more elements than one grid pass
@pytest.mark.gpu
@needs_gpu
def test_cuda_apply_mask_matches_cpu(C, C_cuda, shape, mask_dtype):
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(shape, generator=gen)
    mask = random_mask(shape, mask_dtype, gen)
    out = C_cuda.apply_mask(weight.cuda(), mask.cuda())
    assert out.is_cuda
    assert_bitwise_equal(out.cpu(), C.apply_mask(weight, mask))


@pytest.mark.gpu
@needs_gpu
def test_cuda_apply_mask_special_and_non_contiguous(C, C_cuda):
    weight = torch.tensor([float("nan"), float("inf"), -1.5, -0.0, 2.0] * 4).reshape(4, 5).t()
    mask = torch.tensor([0.0, 1.0] * 10).reshape(5, 4)
    assert not weight.is_contiguous()
    assert_bitwise_equal(C_cuda.apply_mask(weight.cuda(), mask.cuda()).cpu(), C.apply_mask(weight, mask))


@pytest.mark.gpu
@needs_gpu
def test_cuda_apply_mask_errors(C_cuda):
    w = torch.zeros(3, 4, device="cuda")
    with pytest.raises(RuntimeError, match="shapes differ"):
        C_cuda.apply_mask(w, torch.ones(4, 3, dtype=torch.bool, device="cuda"))
    with pytest.raises(RuntimeError, match="weight must be float32"):
        C_cuda.apply_mask(w.double(), torch.ones(3, 4, dtype=torch.bool, device="cuda"))
    with pytest.raises(RuntimeError, match="mask must be bool, uint8 or float32"):
        C_cuda.apply_mask(w, torch.ones(3, 4, dtype=torch.int32, device="cuda"))
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        C_cuda.apply_mask(w, torch.ones(3, 4, dtype=torch.bool))

