import pickle

import numpy as np
import pytest
import torch

from pyprune.data import DatasetNotFoundError, load_cifar10, load_dataset, resolve_data_root
from pyprune.data import cifar10 as cifar10_module
from pyprune.data.cifar10 import class_balanced_holdout


@pytest.fixture(autouse=True)
def _fresh_cache():
    cifar10_module._read_arrays.cache_clear()
    yield
    cifar10_module._read_arrays.cache_clear()


def synthetic_arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    y = np.tile(np.arange(10, dtype=np.uint8), n // 10)
    rng.shuffle(y)
    return x, y


def write_npz_layout(root, train, test):
    (root / "cifar10").mkdir(parents=True)
    np.savez(root / "cifar10" / "train.npz", x=train[0], y=train[1])
    np.savez(root / "cifar10" / "test.npz", x=test[0], y=test[1])


def write_torchvision_layout(root, train, test):
    """The pickled batches of the official python version, as torchvision reads them."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    chunks = np.array_split(np.arange(len(train[1])), 5)
    parts = [(f"data_batch_{i + 1}", train[0][c], train[1][c]) for i, c in enumerate(chunks)]
    parts.append(("test_batch", test[0], test[1]))
    for name, x, y in parts:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": x.transpose(0, 3, 1, 2).reshape(len(x), -1), "labels": y.tolist()}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(cifar10_module.CLASSES)}, f)


def test_both_layouts_load_the_same_images(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    # The synthetic batches have no official md5 sums; the layout is what is under test.
    monkeypatch.setattr(CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda path, md5=None: True)
    train, test = synthetic_arrays(1000, 0), synthetic_arrays(200, 1)
    write_npz_layout(tmp_path / "npz", train, test)
    write_torchvision_layout(tmp_path / "tv", train, test)
    for split in ("train", "val", "test"):
        a = load_cifar10(split, data_root=tmp_path / "npz", val_size=100)
        b = load_cifar10(split, data_root=tmp_path / "tv", val_size=100)
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    full = test[0].transpose(0, 3, 1, 2)
    assert np.array_equal(load_cifar10("test", data_root=tmp_path / "npz").images.numpy(), full)


def test_shared_splits_are_disjoint_balanced_and_deterministic(data_root):
    train = load_cifar10("train", data_root=data_root)
    val = load_cifar10("val", data_root=data_root)
    test = load_cifar10("test", data_root=data_root)
    assert (len(train), len(val), len(test)) == (45000, 5000, 10000)
    assert torch.equal(val.labels.bincount(), torch.full((10,), 500))
    with np.load(data_root / "cifar10" / "train.npz") as f:
        y = f["y"].astype(np.int64)
    kept, held = class_balanced_holdout(y, 5000, seed=0)
    assert np.intersect1d(kept, held).size == 0
    assert np.union1d(kept, held).size == 50000
    assert torch.equal(val.labels, torch.from_numpy(y[held]))
    cifar10_module._read_arrays.cache_clear()
    again = load_cifar10("val", data_root=data_root)
    assert torch.equal(again.images, val.images)


def test_holdout_depends_on_seed_only():
    y = np.repeat(np.arange(10), 100)
    a = class_balanced_holdout(y, 200, seed=0)[1]
    b = class_balanced_holdout(y, 200, seed=0)[1]
    c = class_balanced_holdout(y, 200, seed=1)[1]
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.array_equal(np.bincount(y[a]), np.full(10, 20))
    with pytest.raises(ValueError, match="multiple"):
        class_balanced_holdout(y, 205, seed=0)


def test_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("PYPRUNE_DATA", str(tmp_path / "env"))
    assert resolve_data_root(tmp_path / "flag").path == tmp_path / "flag"
    assert resolve_data_root(None).path == tmp_path / "env"
    assert resolve_data_root(None).source == "$PYPRUNE_DATA"
    monkeypatch.delenv("PYPRUNE_DATA")
    assert str(resolve_data_root(None).path) == "data"


def test_missing_dataset_names_paths_and_download(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_cifar10("test", data_root=tmp_path)
    message = str(info.value)
    assert str(tmp_path / "cifar10" / "train.npz") in message
    assert str(tmp_path / "cifar-10-batches-py") in message
    assert "--download" in message and "--data-root" in message


def test_download_goes_through_torchvision(tmp_path, monkeypatch):
    calls = []

    class FakeCIFAR10:
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            write = not (tmp_path / "cifar-10-batches-py").exists()
            if write:  # what a real download leaves behind
                write_torchvision_layout(tmp_path, synthetic_arrays(1000, 0), synthetic_arrays(200, 1))

    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    assert cifar10_module.locate(resolve_data_root(tmp_path), download=True) == tmp_path
    assert calls == [(str(tmp_path), True, True), (str(tmp_path), False, True)]
    calls.clear()  # present now: no second download
    assert cifar10_module.locate(resolve_data_root(tmp_path), download=True) == tmp_path
    assert calls == []


def test_bad_arguments(data_root):
    with pytest.raises(ValueError, match="unknown split"):
        load_cifar10("validation", data_root=data_root)
    with pytest.raises(ValueError, match="positive"):
        load_cifar10("test", data_root=data_root, limit=0)
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("mnist", "test", data_root=data_root)
    assert len(load_dataset("cifar10", "test", data_root=data_root, limit=7)) == 7


def test_a_model_of_another_size_is_refused_naming_both(data_root):
    assert load_dataset("cifar10", "test", data_root, limit=3, input_shape=(3, 32, 32)).images.shape == (3, 3, 32, 32)
    with pytest.raises(ValueError, match=r"3x32x32 \(C x H x W\), but the model takes 3x224x224"):
        load_dataset("cifar10", "test", data_root, limit=3, input_shape=(3, 224, 224))
