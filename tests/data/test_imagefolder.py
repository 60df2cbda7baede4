"""``imagefolder:PATH`` datasets: splits, errors, transforms, determinism, shards, CLI.

The tree: 3 classes, 20 train + 6 val PNGs per class, 40x48 RGB. Red encodes the
class, green the image's index within its class folder, blue is seeded noise (so
resizing and cropping are really checked against the reference)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from pyprune.api import load_model
from pyprune.cli import main
from pyprune.data import DatasetNotFoundError, FolderDataset, load_dataset, load_imagefolder
from pyprune.data import imagefolder as imf
from pyprune.distributed import Shard

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLASSES = ("ant", "bee", "cow")  # created in another order below, so sorting is checked
TRAIN, VAL = 20, 6
SHAPE = (3, 32, 32)


def make_tree(root: Path, classes=CLASSES, train=TRAIN, val=VAL) -> Path:
    rng = np.random.default_rng(0)
    for part, count in (("train", train), ("val", val)):
        for name in sorted(classes, reverse=True):
            folder = root / part / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.zeros((40, 48, 3), dtype=np.uint8)
                pixels[..., 0] = 60 * CLASSES.index(name) + 30
                pixels[..., 1] = 10 * i + (5 if part == "val" else 0)
                pixels[..., 2] = rng.integers(0, 256, (40, 48))
                Image.fromarray(pixels).save(folder / f"img{i:02d}.png")
    (root / "train" / "ant" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_tree(tmp_path_factory.mktemp("folder"))


def load(tree, split, **kw) -> FolderDataset:
    kw.setdefault("input_shape", SHAPE)
    return load_dataset(f"imagefolder:{tree}", split, **kw)


def identities(ds: FolderDataset) -> list[tuple[str, str, str]]:
    return [ds.path(i).relative_to(ds.directory.parent).parts for i in range(len(ds))]


def decode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(class, index within the class) of each image of a normalised batch, from
    its centre pixel's red and green."""
    pixel = x[:, :2, x.shape[2] // 2, x.shape[3] // 2] * torch.tensor(STD[:2]) + torch.tensor(MEAN[:2])
    red, green = (pixel * 255).round().long().unbind(1)
    return (red - 30) // 60, (green - green % 5) // 10


def all_batches(batches) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*list(batches))
    return torch.cat(xs), torch.cat(ys)


def test_splits_sizes_and_disjoint(tree):
    splits = {s: load(tree, s) for s in imf.SPLITS}
    # 2% of 20 rounds down to 0, raised to the minimum of 1 per class.
    assert {s: len(d) for s, d in splits.items()} == {
        "train": 57, "val": 3, "test": 18, "test-search": 9, "test-report": 9}
    train, val = set(identities(splits["train"])), set(identities(splits["val"]))
    assert not train & val
    assert train | val == {("train", c, f"img{i:02d}.png") for c in CLASSES for i in range(TRAIN)}
    search, report = set(identities(splits["test-search"])), set(identities(splits["test-report"]))
    assert not search & report and search | report == set(identities(splits["test"]))
    for split, per_class in (("val", 1), ("test-search", 3), ("test-report", 3), ("test", 6)):
        assert torch.bincount(splits[split].labels).tolist() == [per_class] * 3, split
    # Fixed: a second load (with a fresh scan) cuts the same splits in the same order.
    imf._scan.cache_clear()
    assert identities(load(tree, "train")) == identities(splits["train"])
    # A fixed random order, not the folder order.
    assert identities(splits["test"]) != sorted(identities(splits["test"]))
    assert splits["test"].name == f"imagefolder:{tree}/test" and splits["test"].classes == CLASSES


def test_holdout_sizes():
    # 2% rounded down, at least 1, at most 50 per class.
    assert imf.holdout_sizes(np.array([1300, 732, 99, 20, 1, 5000])).tolist() == [26, 14, 1, 1, 1, 50]


def test_labels_match_folders_and_pixels(tree):
    for split in ("train", "test-report"):
        ds = load(tree, split)
        assert ds.num_classes == 3
        assert [CLASSES[int(y)] for y in ds.labels] == [ds.path(i).parent.name for i in range(len(ds))]
        x, y = all_batches(ds.batches(16, MEAN, STD))
        cls, idx = decode(x)
        assert torch.equal(y, ds.labels) and torch.equal(cls, ds.labels)
        assert idx.tolist() == [int(ds.path(i).stem[3:]) for i in range(len(ds))]


def test_eval_batches_match_pil_torchvision_reference(tree):
    ds = load_imagefolder(tree, "test", input_shape=(3, 32, 32), num_workers=2)
    batches = ds.batches(5, MEAN, STD)
    assert len(batches) == 4
    x, y = all_batches(batches)
    want = []
    for i in range(len(ds)):
        img = Image.open(ds.path(i)).convert("RGB")
        img = TF.center_crop(TF.resize(img, 37), 32)  # round(32 * 256 / 224) = round(36.57)
        want.append(TF.normalize(TF.to_tensor(img), MEAN, STD))
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (18, 3, 32, 32)
    torch.testing.assert_close(x, torch.stack(want), rtol=0, atol=0)
    assert torch.equal(y, ds.labels)


def test_default_size_is_224(tree):
    x, _ = next(iter(load_imagefolder(tree, "val", input_shape=None, num_workers=0).batches(2, MEAN, STD)))
    assert x.shape == (2, 3, 224, 224)


def test_limit_is_a_prefix(tree):
    full = load(tree, "train")
    part = load(tree, "train", limit=7)
    assert len(part) == 7 and identities(part) == identities(full)[:7]
    assert torch.equal(part.labels, full.labels[:7])
    with pytest.raises(ValueError, match="positive"):
        load(tree, "train", limit=0)


@pytest.mark.parametrize("index", [slice(3, 11), torch.tensor([9, 0, 4, 4]), [5, 2, 8]])
def test_subset(tree, index):
    full = load_imagefolder(tree, "test", input_shape=SHAPE, num_workers=0)
    sub = full.subset(index)
    rows = list(range(len(full)))[index] if isinstance(index, slice) else [int(i) for i in index]
    assert isinstance(sub, FolderDataset) and len(sub) == len(rows)
    assert identities(sub) == [identities(full)[i] for i in rows]
    assert torch.equal(sub.labels, full.labels[rows])
    x_full, _ = all_batches(full.batches(18, MEAN, STD))
    x_sub, y_sub = all_batches(sub.batches(3, MEAN, STD))
    assert torch.equal(x_sub, x_full[rows]) and torch.equal(y_sub, full.labels[rows])


def test_seeded_epochs_replay_with_workers(tree):
    ds = load_imagefolder(tree, "train", input_shape=SHAPE, num_workers=2)
    a = ds.batches(16, MEAN, STD, shuffle=True, augment=True, seed=5)
    b = ds.batches(16, MEAN, STD, shuffle=True, augment=True, seed=5)
    a0, a1 = all_batches(a), all_batches(a)
    b0, b1 = all_batches(b), all_batches(b)
    assert torch.equal(a0[0], b0[0]) and torch.equal(a0[1], b0[1])
    assert torch.equal(a1[0], b1[0]) and torch.equal(a1[1], b1[1])
    assert not torch.equal(a0[1], a1[1])  # a new epoch reshuffles
    # The order is a permutation: the labels of every image, once.
    assert torch.equal(a0[1].sort().values, ds.labels.sort().values)
    # Augmented: not the evaluation crops (and the same with no workers).
    ds0 = load_imagefolder(tree, "train", input_shape=SHAPE, num_workers=0)
    c0 = all_batches(ds0.batches(16, MEAN, STD, shuffle=True, augment=True, seed=5))
    assert torch.equal(c0[0], a0[0])
    plain = all_batches(ds0.batches(16, MEAN, STD, shuffle=True, augment=False, seed=5))
    assert torch.equal(plain[1], a0[1]) and not torch.equal(plain[0], a0[0])
    # Every image is still recognisable after the random crop and flip.
    cls, _ = decode(a0[0])
    assert torch.equal(cls, a0[1])


def test_augmentation_crops_and_flips(tmp_path):
    # Blue ramps up left to right: a flipped crop ramps down, and crops of
    # different widths span different ranges of it.
    ramp = np.zeros((40, 48, 3), dtype=np.uint8)
    ramp[..., 2] = np.arange(48) * 5
    for c in ("a", "b"):
        for part in ("train", "val"):
            (tmp_path / part / c).mkdir(parents=True)
        for i in range(30):
            Image.fromarray(ramp).save(tmp_path / "train" / c / f"{i}.png")
        Image.fromarray(ramp).save(tmp_path / "val" / c / "0.png")
    ds = load_imagefolder(tmp_path, "train", input_shape=SHAPE, num_workers=0)
    x, _ = all_batches(ds.batches(64, MEAN, STD, shuffle=True, augment=True, seed=0))
    blue = x[:, 2, 16]  # the middle row
    slope = blue[:, -4:].mean(1) - blue[:, :4].mean(1)
    flipped = int((slope < 0).sum())
    assert (slope != 0).all() and 0.25 * len(x) < flipped < 0.75 * len(x)
    span = (blue.max(1).values - blue.min(1).values) * STD[2] * 255
    assert span.min() < 100 and span.max() > 180  # the whole ramp spans 235


@pytest.mark.parametrize("workers", [0, 2])
def test_shards_together_make_one_process_batches(tree, workers):
    ds = load_imagefolder(tree, "train", input_shape=SHAPE, num_workers=workers)
    kw = dict(shuffle=True, augment=True, seed=11)
    whole = list(ds.batches(8, MEAN, STD, **kw))
    parts = [list(ds.batches(8, MEAN, STD, shard=Shard(r, 2), **kw)) for r in range(2)]
    assert len(whole) == len(parts[0]) == len(parts[1]) == 8  # 57 images: the last global batch has 1
    for (x, y), (x0, y0), (x1, y1) in zip(whole, *parts):
        assert len(y0) == -(-len(y) // 2)  # tensor_split: rank 0 gets the larger part
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    assert parts[1][-1][0].shape == (0, *SHAPE)


@pytest.mark.parametrize("drop_last,shard,count,last", [
    (False, Shard(), 8, 1), (True, Shard(), 7, 8), (True, Shard(1, 2), 7, 4), (False, Shard(1, 3), 8, 0)])
def test_len_with_drop_last(tree, drop_last, shard, count, last):
    ds = load_imagefolder(tree, "train", input_shape=(3, 8, 8), num_workers=0)
    batches = ds.batches(8, MEAN, STD, shuffle=True, drop_last=drop_last, shard=shard)
    got = [len(y) for _, y in batches]
    assert len(batches) == len(got) == count and got[-1] == last


def test_relative_path_and_errors(tmp_path, monkeypatch):
    make_tree(tmp_path / "good", train=2, val=1)
    monkeypatch.chdir(tmp_path)
    assert len(load_dataset("imagefolder:good", "test")) == 3
    with pytest.raises(DatasetNotFoundError, match="missing"):
        load_dataset("imagefolder:missing", "test")
    (tmp_path / "noval" / "train" / "a").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match=r"noval/val not found"):
        load_dataset("imagefolder:noval", "train")
    (tmp_path / "noval" / "val" / "a").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match=r"no images in .*noval/train"):
        load_dataset("imagefolder:noval", "train")
    (tmp_path / "notrain" / "val").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match=r"notrain/train not found"):
        load_dataset("imagefolder:notrain", "test")
    (tmp_path / "good" / "val" / "ant").rename(tmp_path / "good" / "val" / "ape")
    imf._scan.cache_clear()
    with pytest.raises(ValueError, match="only in train: ant; only in val: ape"):
        load_dataset("imagefolder:good", "train")
    with pytest.raises(ValueError, match="imagefolder:PATH"):
        load_dataset("imagenet", "test")


def test_input_shape_goes_only_to_loaders_that_take_it(monkeypatch):
    from pyprune import data

    calls = []
    monkeypatch.setitem(data.DATASETS, "plain", lambda split, **kw: calls.append(("plain", kw)))
    monkeypatch.setitem(data.DATASETS, "shaped",
                        lambda split, input_shape=None, **kw: calls.append(("shaped", input_shape)))
    load_dataset("plain", "test", input_shape=(3, 8, 8))
    load_dataset("shaped", "test", input_shape=(3, 8, 8))
    assert calls == [("plain", {"data_root": None, "download": False, "limit": None}), ("shaped", (3, 8, 8))]


def test_cli_train_and_eval_on_a_folder(tree, tmp_path, capsys):
    out = tmp_path / "out.pt"
    data = f"imagefolder:{tree}"
    code = main(["train", "--arch", "tests.export.models:tiny", "--data", data, "--limit", "24", "--epochs", "1",
                 "--batch-size", "8", "--no-progress", "-o", str(out), "--json"])
    text = capsys.readouterr().out
    assert code == 0 and out.is_file()
    assert "val top-1" in text and "on 3 images" in text  # the hold-out: one image per class
    code = main(["eval", "--arch", "tests.export.models:tiny", "--weights", str(out), "--data", data,
                 "--split", "test-report", "--limit", "5", "--no-progress"])
    text = capsys.readouterr().out
    assert code == 0 and f"on {data}/test-report" in text and "/5)" in text


def test_two_processes_train_like_one(tree, tmp_path):
    """``pyprune train --nproc 2`` (torchrun, gloo) on the folder: with no BatchNorm
    the split batches give the whole batches' gradients, so the weights match one
    process's (which here also uses another number of DataLoader workers)."""
    repo = Path(__file__).resolve().parents[2]
    args = ["train", "--arch", "tests.distributed_worker:NoBatchNorm", "--data", f"imagefolder:{tree}",
            "--epochs", "2", "--batch-size", "8", "--lr", "0.2", "--no-progress", "--eval-split", "none"]
    states = []
    for nproc, workers in ((1, 2), (2, 1)):
        out = tmp_path / f"nproc{nproc}.pt"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYPRUNE_WORKERS": str(workers)}
        run = subprocess.run([sys.executable, "-m", "pyprune", *args, "--nproc", str(nproc), "-o", str(out)],
                             cwd=repo, env=env, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr[-3000:]
        states.append(torch.load(out)["state_dict"])
    one, two = states
    assert one.keys() == two.keys()
    initial = load_model(arch="tests.distributed_worker:NoBatchNorm").module.state_dict()
    for k in one:
        assert not torch.allclose(one[k], initial[k], rtol=0, atol=1e-3), k  # training did move it
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-5)
