"""``pyprune eval FILE.ppz --runtime dense|sparse|auto``."""

import pytest

from pyprune.data import DataSpec
from pyprune.api import evaluate_model, load_model

from ..test_cli import last_json, run_cli


def test_every_runtime_predicts_the_same_on_every_image(compressed_ppz, capsys, data_root, tmp_path):
    _, path = compressed_ppz("resnet20")
    want = evaluate_model(load_model(str(path)), data=DataSpec(root=data_root), limit=300, progress=False)
    assert want.predictions.shape == (300,)
    for runtime in ("dense", "sparse", "auto"):
        predictions = tmp_path / f"{runtime}.txt"
        code, out, _ = run_cli(capsys, "eval", path, "--runtime", runtime, "--data-root", data_root,
                               "--limit", 300, "--no-progress", "--json", "--predictions", predictions)
        summary = last_json(out)
        assert code == 0 and summary["n"] == 300 and summary["accuracy"] == want.accuracy, runtime
        assert [int(c) for c in predictions.read_text().split()] == want.predictions.tolist(), runtime
        plan = summary["runtime"]
        assert plan["runtime"] == runtime and len(plan["layers"]) == 20 and f"(runtime {runtime})" in out
        assert plan["source"] == {"dense": "forced", "sparse": "forced", "auto": "measured"}[runtime]


def test_weights_as_codes_or_csr_and_lanes_predict_the_same(compressed_ppz, capsys, data_root, tmp_path):
    _, path = compressed_ppz("resnet20")
    want = evaluate_model(load_model(str(path)), data=DataSpec(root=data_root), limit=100, progress=False)
    held = {}
    for weights, batch in (("codes", 1), ("csr", 1), ("codes", 16)):
        predictions = tmp_path / f"{weights}-{batch}.txt"
        code, out, _ = run_cli(capsys, "eval", path, "--runtime", "sparse", "--runtime-weights", weights,
                               "--runtime-batch", batch, "--batch-size", 32, "--data-root", data_root, "--limit", 100,
                               "--no-progress", "--json", "--predictions", predictions)
        assert code == 0 and [int(c) for c in predictions.read_text().split()] == want.predictions.tolist()
        plan = last_json(out)["runtime"]
        held[weights, batch] = sum(layer["weight_bytes"] for layer in plan["layers"])
        assert any(layer["choice"] == "lanes" for layer in plan["layers"]) == (batch == 16)
    # quant(bits=5) at 80% sparsity: about 5 + 3 bits a non-zero against fp32 CSR's 64
    assert held["codes", 1] * 4 < held["csr", 1] and held["codes", 16] == held["codes", 1]


def test_verbose_prints_the_plan(compressed_ppz, capsys, data_root):
    _, path = compressed_ppz("resnet20")
    code, out, _ = run_cli(capsys, "eval", path, "--runtime", "auto", "--runtime-batch", 2, "--verbose",
                           "--data-root", data_root, "--limit", 20, "--no-progress")
    assert code == 0 and "layer1.0.conv1" in out and "sparse ms" in out and "folded" in out
    assert "runtime auto:" in out and "batch 2" in out


@pytest.mark.parametrize("argv", [["--arch", "resnet20"], ["--arch", "resnet20", "--pretrained"]])
def test_runtime_needs_a_saved_model(capsys, argv):
    code, _, err = run_cli(capsys, "eval", *argv, "--runtime", "dense", "--limit", 10)
    assert code == 2 and "saved pyprune model" in err and "Traceback" not in err


def test_runtime_of_a_checkpoint_is_a_clear_error(capsys, models_dir):
    code, _, err = run_cli(capsys, "eval", models_dir / "resnet20-12fca82f.th", "--runtime", "auto")
    assert code == 2 and "not a saved pyprune model" in err


def test_help_explains_the_runtime(capsys):
    with pytest.raises(SystemExit):
        run_cli(capsys, "eval", "--help")
    out = capsys.readouterr().out
    assert "--runtime {dense,sparse,auto}" in out and "PYPRUNE_CACHE" in out and "--runtime-batch" in out
