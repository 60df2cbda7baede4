"""write_onnx: export, verify, then write; a mismatch leaves nothing at the path
and keeps the file as NAME.unverified.onnx."""

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from pyprune.data import ArrayDataset
from pyprune.export import VerificationError, session, unverified_path, verification_inputs, write_onnx

from .models import diverging, images, probe, wobbly

SHAPE = (3, 32, 32)


def test_a_verified_file_is_written(tmp_path):
    module, x = probe().eval(), images(8)
    path = tmp_path / "m.onnx"
    report = write_onnx(module, path, "dense", SHAPE, inputs=x, data="random[:8]")
    assert report.verification.passed and report.verification.data == "random[:8]"
    assert report.bytes == path.stat().st_size and report.path == path
    d = report.to_dict()
    assert d["verified"] is True and d["path"] == str(path) and d["form"] == "dense" and d["opset"] == 18
    onnx.checker.check_model(onnx.load(path), full_check=True)
    with torch.no_grad():
        np.testing.assert_allclose(session(str(path)).run(None, {"input": x.numpy()})[0], module(x).numpy(),
                                   rtol=0, atol=1e-4)
    assert not unverified_path(path).exists()
    assert report.summary().startswith(f"wrote {path} (dense form, opset 18") and "passed" in report.summary()


def test_a_mismatch_writes_nothing_at_the_path_and_keeps_the_file_aside(tmp_path):
    """The mismatch is genuine: models.Diverging adds 1 to its logits only while
    torch.export traces it, so the ONNX graph is off by exactly 1 on every logit."""
    module, x = diverging().eval(), images(8)
    path = tmp_path / "m.onnx"
    kept = tmp_path / "m.unverified.onnx"
    kept.write_bytes(b"an older unverified file")  # replaced: it is for inspection only
    with pytest.raises(VerificationError) as info:
        write_onnx(module, path, "compact", SHAPE, inputs=x, atol=1e-4)
    assert not path.exists()
    assert info.value.kept == str(kept) and str(info.value).endswith(f"kept as {kept}")
    v = info.value.verification
    assert not v.passed and v.n == 8 and v.max_abs_diff == pytest.approx(1.0, abs=1e-5)
    assert v.over_atol_images == 8 and v.top1_mismatches == 0  # +1 on every logit keeps the order
    with torch.no_grad():  # the kept file is that export
        np.testing.assert_allclose(session(str(kept)).run(None, {"input": x.numpy()})[0], module(x).numpy() + 1,
                                   rtol=0, atol=1e-4)


def test_an_existing_file_is_refused_before_any_work(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"precious")
    # wobbly() cannot be exported: FileExistsError, not OnnxExportError, shows nothing was tried
    with pytest.raises(FileExistsError, match="--force"):
        write_onnx(wobbly(), path, "dense", SHAPE)
    assert path.read_bytes() == b"precious"
    report = write_onnx(probe(), path, "dense", SHAPE, force=True)  # no inputs: written unverified
    assert report.verification is None and report.to_dict()["verified"] is False
    assert report.summary().endswith("not verified")
    assert path.stat().st_size == report.bytes and onnx.load(path).graph.input[0].name == "input"


@pytest.mark.parametrize("name,kept", [("m.onnx", "m.unverified.onnx"), ("m", "m.unverified.onnx"),
                                       ("a.b.onnx", "a.b.unverified.onnx"), ("m.bin", "m.unverified.bin")])
def test_unverified_path(name, kept):
    assert unverified_path(Path("out") / name) == Path("out") / kept


def test_verification_inputs_are_the_first_images_normalised():
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (5, 3, 4, 4), generator=g, dtype=torch.uint8)
    dataset = ArrayDataset(raw, torch.zeros(5, dtype=torch.long), "synthetic")
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    x, description = verification_inputs(dataset, 3, mean, std)
    want = (raw[:3].double() / 255 - torch.tensor(mean, dtype=torch.double).view(1, 3, 1, 1)) / torch.tensor(
        std, dtype=torch.double).view(1, 3, 1, 1)
    assert x.dtype == torch.float32 and description == "synthetic[:3]"
    np.testing.assert_allclose(x.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)
    x, description = verification_inputs(dataset, 10, mean, std)  # no more than there are
    assert x.shape[0] == 5 and description == "synthetic[:5]"
