"""`pyprune export-onnx`: a saved .ppz exported and verified on CIFAR-10, and the
exit codes: 2 for what the user must fix, 3 for a file that does not verify."""

import numpy as np
import onnx
import pytest
import torch

from pyprune.api import LoadedModel, save_model
from pyprune.cli import EXIT_UNVERIFIED, main
from pyprune.data import load_dataset
from pyprune.export import FORMS, session, unverified_path

from ..passes_helpers import compressed
from ..test_cli import last_json, run_cli
from .models import diverging, tiny

MODELS = "tests.export.models"


def normalised(images, mean, std):
    x = images.double() / 255
    return ((x - torch.tensor(mean, dtype=torch.double).view(1, -1, 1, 1))
            / torch.tensor(std, dtype=torch.double).view(1, -1, 1, 1)).float()


def test_help_names_both_forms(capsys):
    with pytest.raises(SystemExit) as info:
        main(["export-onnx", "--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0
    assert "{dense,compact}" in out  # the --form choices
    assert "\n  dense " in out and "\n  compact " in out  # and each explained
    assert "NAME.unverified.onnx" in out and "--verify" in out


@pytest.fixture(scope="module")
def tiny_ppz(tmp_path_factory):
    model = LoadedModel(tiny(), "tiny")
    gm, books = compressed(model, "mask(sparsity=0.5),quant(bits=4)")
    path = save_model(model, tmp_path_factory.mktemp("ppz") / "tiny.ppz", gm=gm, codebooks=books)
    return model, gm.eval(), books, path


@pytest.mark.parametrize("form", FORMS)
def test_a_ppz_is_exported_and_verified_on_cifar(capsys, tmp_path, data_root, tiny_ppz, form):
    model, gm, books, ppz = tiny_ppz
    out = tmp_path / "out.onnx"
    code, stdout, err = run_cli(capsys, "export-onnx", ppz, "-o", out, "--form", form, "--verify", 16,
                                "--data-root", data_root, "--json")
    assert code == 0, err
    report = last_json(stdout)
    assert report["verified"] is True and report["form"] == form and report["path"] == str(out)
    assert report["verification"]["n"] == 16 and report["verification"]["data"] == "cifar10/val[:16]"
    assert report["bytes"] == out.stat().st_size
    assert report["codebook_tensors"] == (len(books) if form == "compact" else 0)
    assert not unverified_path(out).exists()

    proto = onnx.load(out)  # the file on its own: it says how to feed it, and reproduces the model
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["pyprune.form"] == form and props["pyprune.arch"] == '"tiny"'
    assert props["pyprune.mean"] == str(list(model.mean)) and props["pyprune.std"] == str(list(model.std))
    x = normalised(load_dataset("cifar10", "val", data_root=data_root, limit=16).images, model.mean, model.std)
    got = session(str(out)).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        want = gm(x).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    assert np.array_equal(got.argmax(1), want.argmax(1))


def test_an_op_with_no_onnx_mapping_exits_2_naming_it(capsys, tmp_path):
    out = tmp_path / "x.onnx"
    code, _, err = run_cli(capsys, "export-onnx", "--arch", f"{MODELS}:wobbly", "-o", out, "--verify", 0)
    assert code == 2 and "pyprune_test.wobble" in err and "no ONNX mapping" in err and "Traceback" not in err
    assert not out.exists() and not unverified_path(out).exists()


def test_a_mismatch_exits_3_with_the_figures_and_keeps_the_file_aside(capsys, tmp_path, data_root):
    """models.diverging adds 1 to its logits only while torch.export traces it: a
    genuine export/eager mismatch of exactly 1.0 on every logit, top-1 unchanged."""
    out = tmp_path / "x.onnx"
    kept = tmp_path / "x.unverified.onnx"
    code, _, err = run_cli(capsys, "export-onnx", "--arch", f"{MODELS}:diverging", "-o", out, "--verify", 8,
                           "--data-root", data_root)
    assert code == EXIT_UNVERIFIED == 3
    assert "ONNX verification failed" in err and "on cifar10/val[:8]: FAILED" in err
    assert "max |logit diff| 1 (limit 0.0001)" in err and "top-1 differs on 0/8 images" in err
    assert "8 images have a logit off by more than 0.0001" in err and f"kept as {kept}" in err
    assert not out.exists() and kept.is_file()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = diverging().eval()(x).numpy() + 1
    np.testing.assert_allclose(session(str(kept)).run(None, {"input": x.numpy()})[0], want, rtol=0, atol=1e-4)


def test_an_existing_output_is_left_alone_without_force(capsys, tmp_path):
    out = tmp_path / "x.onnx"
    out.write_bytes(b"precious")
    # refused before the data (there is none at --data-root) and before the export (wobbly cannot be exported)
    code, _, err = run_cli(capsys, "export-onnx", "--arch", f"{MODELS}:wobbly", "-o", out, "--data-root", tmp_path)
    assert code == 2 and "exists" in err and "--force" in err
    assert out.read_bytes() == b"precious" and not unverified_path(out).exists()
    code, stdout, err = run_cli(capsys, "export-onnx", "--arch", f"{MODELS}:probe", "-o", out, "--force",
                                "--verify", 0, "--json")
    assert code == 0, err
    report = last_json(stdout)
    assert report["verified"] is False and report["verification"] is None and "not verified" in stdout
    assert out.stat().st_size == report["bytes"] and onnx.load(out).graph.output[0].name == "logits"


def test_missing_data_is_found_before_exporting(capsys, tmp_path):
    out = tmp_path / "x.onnx"
    code, _, err = run_cli(capsys, "export-onnx", "--arch", f"{MODELS}:wobbly", "-o", out,
                           "--data-root", tmp_path / "none")
    assert code == 2 and "CIFAR-10 not found" in err and "wobble" not in err
    assert not out.exists()


@pytest.mark.parametrize("args,message", [(["--opset", 16], "opset must be an integer >= 17"),
                                          (["--verify", -1], "--verify must be >= 0")])
def test_bad_options_exit_2(capsys, tmp_path, args, message):
    out = tmp_path / "x.onnx"
    code, _, err = run_cli(capsys, "export-onnx", "--arch", f"{MODELS}:wobbly", "-o", out, *args)
    assert code == 2 and message in err and not out.exists()
