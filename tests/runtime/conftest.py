"""Fixtures for the runtime tests: small compressed zoo models saved as .ppz, and a
few hundred images to run them on."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from pyprune.api import LoadedModel, load_model, save_model
from pyprune.data import ArrayDataset, BatchLoader, Normalize, load_dataset

from ..conftest import shared_data_root
from ..passes_helpers import compressed

# mask per layer, so that no layer (a classifier, say) ends up entirely zero.
PIPELINE = "slim(ratio=0.3),mask(sparsity=0.8,scope=layer),quant(bits=5)"
ARCHS = ("resnet20", "vgg11", "densenet40")


def randomize_batchnorm(module: nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm random affine parameters and running statistics, so that
    folding them is not the identity and slimming has gammas to rank."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            with torch.no_grad():
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch) -> Path:
    """Every test gets its own runtime cache folder, never ~/.cache."""
    cache = tmp_path / "runtime-cache"
    monkeypatch.setenv("PYPRUNE_CACHE", str(cache))
    return cache


@pytest.fixture(scope="session")
def images() -> ArrayDataset:
    """256 CIFAR-10 test images, or random images where the shared data is absent."""
    root = shared_data_root()
    if root is not None:
        return load_dataset("cifar10", "test", data_root=root, limit=256)
    g = torch.Generator().manual_seed(0)
    return ArrayDataset(torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8, generator=g),
                        torch.randint(0, 10, (256,), generator=g), "random")


@pytest.fixture(scope="session")
def compressed_ppz(tmp_path_factory) -> Callable[[str], tuple[LoadedModel, Path]]:
    """``compressed_ppz(arch)``: the randomly initialised zoo model after slim, mask
    and quant (``LoadedModel`` of its graph, in eval mode) and the .ppz it was saved to."""
    made: dict[str, tuple[LoadedModel, Path]] = {}

    def get(arch: str) -> tuple[LoadedModel, Path]:
        if arch not in made:
            model = load_model(arch=arch)
            randomize_batchnorm(model.module)
            gm, books = compressed(model, PIPELINE)
            path = save_model(model, tmp_path_factory.mktemp(arch) / "model.ppz", gm=gm, codebooks=books)
            made[arch] = (LoadedModel(gm.eval(), model.name, model.mean, model.std, model.input_shape), path)
        return made[arch]

    return get


# DenseNet-40's concatenations make it ten times slower per image than the others here.
N_IMAGES = {"densenet40": 64}


def logits(module, model, images):
    with torch.no_grad():
        return torch.cat([module(x) for x, _ in BatchLoader(images, 256, Normalize(model.mean, model.std))])


@pytest.fixture(scope="module")
def reference(compressed_ppz, images):
    """Per arch: the compressed model, the images it is tested on and its logits on them."""
    results = {}

    def get(arch):
        if arch not in results:
            model, _ = compressed_ppz(arch)
            n = N_IMAGES.get(arch, len(images))
            subset = ArrayDataset(images.images[:n], images.labels[:n], images.name)
            results[arch] = model, subset, logits(model.module, model, subset)
        return results[arch]

    return get
