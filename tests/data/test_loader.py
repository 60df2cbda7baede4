import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import functional as TF

from pyprune.data import ArrayDataset, BatchLoader, Normalize, random_crop_flip

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def tiny_dataset(n=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ArrayDataset(torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
                        torch.randint(0, 10, (n,), generator=g))


def reference_crop_flip(images, pad, generator):
    """One image at a time, the way torchvision's RandomCrop + RandomHorizontalFlip do it."""
    b, _, h, w = images.shape
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    out = []
    for i in range(b):
        img = F.pad(images[i], (pad, pad, pad, pad))
        img = TF.crop(img, int(dy[i]), int(dx[i]), h, w)
        out.append(TF.hflip(img) if flip[i] else img)
    return torch.stack(out)


@pytest.mark.parametrize("pad", [0, 2, 4])
def test_batched_augmentation_matches_per_image_reference(pad):
    images = tiny_dataset(16).images
    got = random_crop_flip(images, pad, torch.Generator().manual_seed(3))
    want = reference_crop_flip(images, pad, torch.Generator().manual_seed(3))
    assert torch.equal(got, want)


def test_augmentation_really_flips_and_shifts():
    images = tiny_dataset(64).images
    out = random_crop_flip(images, 4, torch.Generator().manual_seed(0))
    unchanged = (out == images).flatten(1).all(1)
    assert 0 < unchanged.sum() < len(images)  # a few land on offset 4 unflipped, most do not


def test_normalize_matches_torchvision():
    images = tiny_dataset(4).images
    want = TF.normalize(images.float() / 255, MEAN, STD)
    torch.testing.assert_close(Normalize(MEAN, STD)(images), want, rtol=1e-6, atol=1e-6)


def test_loader_is_seeded_per_epoch():
    ds = tiny_dataset(50)
    a = BatchLoader(ds, 16, Normalize(MEAN, STD), shuffle=True, augment=True, seed=5)
    b = BatchLoader(ds, 16, Normalize(MEAN, STD), shuffle=True, augment=True, seed=5)
    first_a, first_b = list(a), list(b)
    for (xa, ya), (xb, yb) in zip(first_a, first_b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    second_a = list(a)
    assert not torch.equal(first_a[0][1], second_a[0][1])  # a new epoch reshuffles


def test_eval_order_covers_everything_once():
    ds = tiny_dataset(50)
    loader = BatchLoader(ds, 16, Normalize(MEAN, STD))
    labels = torch.cat([y for _, y in loader])
    assert len(loader) == 4 and torch.equal(labels, ds.labels)
    dropped = BatchLoader(ds, 16, Normalize(MEAN, STD), shuffle=True, drop_last=True)
    assert len(dropped) == 3 and sum(len(y) for _, y in dropped) == 48
    with pytest.raises(ValueError):
        BatchLoader(ds, 0, Normalize(MEAN, STD))


def test_dataset_validates_its_arrays():
    with pytest.raises(ValueError, match="uint8"):
        ArrayDataset(torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        ArrayDataset(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.long))
