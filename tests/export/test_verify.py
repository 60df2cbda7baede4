"""verify_onnx: onnxruntime against PyTorch, with figures checked against an
independent numpy computation."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from pyprune.export import Verification, VerificationError, export_onnx, session, verify_onnx

from .models import images, probe

N = 16


@pytest.fixture(scope="module")
def exported():
    """(module, ONNX bytes of its dense export, inputs, PyTorch logits of the module)."""
    module = probe().eval()
    blob = export_onnx(module, (3, 32, 32), "dense").serialized()
    x = images(N)
    with torch.no_grad():
        logits = module(x).numpy()
    return module, blob, x, logits


def onnx_logits(blob, x):
    return session(blob).run(None, {"input": x.numpy()})[0]


def test_the_model_it_came_from_passes(exported, tmp_path):
    module, blob, x, logits = exported
    v = verify_onnx(blob, module, x, batch_size=5)  # batches of 5, 5, 5, 1 through the dynamic axis
    want = np.abs(onnx_logits(blob, x).astype(np.float64) - logits).max()
    assert v.passed and v.n == N and v.top1_mismatches == 0 and v.over_atol_images == 0
    assert v.mismatched_images == [] and v.max_abs_diff == pytest.approx(want, abs=1e-6) and v.max_abs_diff <= 1e-4
    path = tmp_path / "m.onnx"
    path.write_bytes(blob)
    assert verify_onnx(str(path), module, x).passed  # a path works as well as bytes
    assert "passed" in v.summary() and "FAILED" not in v.summary()


def test_a_model_in_training_mode_is_compared_in_eval_mode(exported):
    module, blob, x, _ = exported
    module.train()  # BatchNorm on batch statistics would not match the folded ONNX graph
    try:
        assert verify_onnx(blob, module, x).passed
        assert module.training  # and the mode is given back
    finally:
        module.eval()


def test_a_changed_bias_is_caught_with_the_right_figures(exported):
    """Raise one class's bias in the PyTorch model by the median margin to that
    class: every image is off by exactly that much on that logit, and the images
    whose top-1 flips are known from the original logits alone."""
    module, blob, x, logits = exported
    k = int(np.bincount(logits.argmax(1), minlength=10).argmin())  # a class that (almost) never wins
    delta = float(np.median(logits.max(1) - logits[:, k])) + 1e-3
    changed = copy.deepcopy(module)
    with torch.no_grad():
        changed.fc.bias[k] += delta
    shifted = logits.copy()
    shifted[:, k] += delta
    flips = int((shifted.argmax(1) != logits.argmax(1)).sum())
    assert 0 < flips < N  # the figure below tells a count from "all" or "none"

    v = verify_onnx(blob, changed, x, atol=1e-4)
    assert not v.passed
    assert v.max_abs_diff == pytest.approx(delta, abs=1e-5)
    assert v.top1_mismatches == flips
    assert v.over_atol_images == N and v.mismatched_images == list(range(10))  # the first ten shown
    text = v.summary()
    assert "FAILED" in text and f"top-1 differs on {flips}/{N} images" in text and f"{delta:.3g}" in text
    assert f"{N} images have a logit off by more than 0.0001" in text

    # Within a looser atol every logit is close enough, but a different top-1 still fails.
    v = verify_onnx(blob, changed, x, atol=delta + 0.1)
    flipped = np.flatnonzero(shifted.argmax(1) != logits.argmax(1))
    assert not v.passed and v.over_atol_images == 0 and v.top1_mismatches == flips
    assert v.mismatched_images == flipped[:10].tolist()


def test_some_images_over_atol_are_counted_and_listed(exported):
    """A small change to the conv gives each image its own error; with atol at the
    median error about half the images are over it. The expected figures come
    from onnxruntime and PyTorch logits compared here in numpy."""
    module, blob, x, _ = exported
    changed = copy.deepcopy(module)
    with torch.no_grad():
        changed.conv.weight[0, 0, 1, 1] += 0.05
        theirs = changed(x).numpy().astype(np.float64)
    ours = onnx_logits(blob, x).astype(np.float64)
    per_image = np.abs(ours - theirs).max(1)
    atol = float(np.median(per_image))
    over = per_image > atol
    top1 = ours.argmax(1) != theirs.argmax(1)
    v = verify_onnx(blob, changed, x, atol=atol, batch_size=7)
    assert 0 < over.sum() < N
    assert not v.passed and v.atol == atol
    assert v.over_atol_images == int(over.sum()) and v.top1_mismatches == int(top1.sum())
    assert v.mismatched_images == np.flatnonzero(over | top1)[:10].tolist()
    assert v.max_abs_diff == pytest.approx(per_image.max(), rel=1e-6)


class NaNOnImage(nn.Module):
    def __init__(self, inner, image):
        super().__init__()
        self.inner, self.image = inner, image

    def forward(self, x):
        y = self.inner(x).clone()
        y[self.image, 3] = float("nan")
        return y


def test_nan_in_pytorch_logits_fails(exported):
    module, blob, x, _ = exported
    v = verify_onnx(blob, NaNOnImage(module, 2), x)
    assert not v.passed and v.max_abs_diff == float("inf")
    assert v.over_atol_images == 1 and 2 in v.mismatched_images


class LogOfMean(nn.Module):
    """NaN logits for an image with a negative mean, in PyTorch and in ONNX alike."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        return self.fc(torch.log(x.mean((2, 3))))


def test_nan_in_both_fails_too():
    # Agreeing on NaN is not reproducing a model: a NaN difference counts as infinite.
    torch.manual_seed(0)
    module = LogOfMean().eval()
    blob = export_onnx(module, (3, 4, 4), "dense").serialized()
    x = torch.rand(4, 3, 4, 4) + 0.1
    assert verify_onnx(blob, module, x).passed
    x[1] -= 5.0
    with torch.no_grad():
        assert torch.isnan(module(x)[1]).all() and not torch.isnan(module(x)[[0, 2, 3]]).any()
    assert np.isnan(onnx_logits(blob, x)[1]).all()
    v = verify_onnx(blob, module, x)
    assert not v.passed and v.max_abs_diff == float("inf") and v.over_atol_images == 1 and v.mismatched_images == [1]


def test_bad_arguments(exported):
    module, blob, x, _ = exported
    with pytest.raises(ValueError, match="at least one image"):
        verify_onnx(blob, module, x[:0])
    for atol in (-1e-4, float("nan")):
        with pytest.raises(ValueError, match="atol"):
            verify_onnx(blob, module, x, atol=atol)
    other = nn.Sequential(copy.deepcopy(module), nn.Linear(10, 7))
    with pytest.raises(ValueError, match=r"shape \(16, 10\).*\(16, 7\)"):
        verify_onnx(blob, other, x)


def test_verification_error_carries_the_figures():
    v = Verification(n=8, atol=1e-4, max_abs_diff=0.5, top1_mismatches=3, over_atol_images=8,
                     mismatched_images=list(range(8)), data="cifar10/val[:8]")
    err = VerificationError(v, kept="out/m.unverified.onnx")
    assert err.verification is v and err.kept == "out/m.unverified.onnx"
    text = str(err)
    assert "on cifar10/val[:8]: FAILED" in text and "max |logit diff| 0.5 (limit 0.0001)" in text
    assert "top-1 differs on 3/8 images" in text and text.endswith("kept as out/m.unverified.onnx")
    assert v.to_dict()["passed"] is False and v.to_dict()["max_abs_diff"] == 0.5
