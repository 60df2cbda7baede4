"""Shared fixtures. Data comes from $PYPRUNE_DATA (the Makefile points it at
../shared/data) or the shared folder beside the checkout; tests that need it skip
with a reason when neither exists."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def shared_data_root() -> Path | None:
    for candidate in (os.environ.get("PYPRUNE_DATA"), SHARED / "data"):
        if candidate and (Path(candidate) / "cifar10" / "test.npz").is_file():
            return Path(candidate)
    return None


def shared_models_dir() -> Path | None:
    for candidate in (os.environ.get("PYPRUNE_MODELS"), SHARED / "models"):
        if candidate and any(Path(candidate).glob("resnet20-*.th")):
            return Path(candidate)
    return None


def _or_skip(path: Path | None, what: str) -> Path:
    if path is None:
        pytest.skip(f"{what} not found")
    return path


@pytest.fixture(scope="session")
def data_root() -> Path:
    return _or_skip(shared_data_root(), "shared CIFAR-10 ($PYPRUNE_DATA or ../shared/data)")


@pytest.fixture(scope="session")
def models_dir() -> Path:
    return _or_skip(shared_models_dir(), "shared checkpoints ($PYPRUNE_MODELS or ../shared/models)")


# ---- pytest-xdist: `make test` runs the suite in one process per core -----------------

import torch  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    # Each xdist worker gets its share of the cores: left at torch's default, every
    # worker would run as many threads as there are cores, and on 2 cores two workers
    # of 2 threads each run the small tensors of these tests slower than one of 2.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


# ---- CUDA: one skip condition and one extension fixture for every GPU test ----------

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(),
                               reason="no CUDA device (torch.cuda.is_available() is False)")


@pytest.fixture(scope="session")
def C_cuda():
    """pyprune._C_cuda, or a skip where it is not built."""
    from pyprune import _native

    mod = _native.cuda()
    if mod is None:
        pytest.skip("pyprune._C_cuda is not built")
    return mod
