import json

import pytest

from pyprune.cli import main
from pyprune.opt import OptConfig

from .test_cli import last_json, run_cli


def test_opt_slims_saves_and_the_file_evaluates_the_same(capsys, data_root, models_dir, tmp_path):
    out = tmp_path / "slim.pt"
    weights = models_dir / "resnet20-12fca82f.th"
    code, stdout, _ = run_cli(capsys, "opt", weights, "--arch", "resnet20", "--passes", "slim(ratio=0.3)",
                              "--slim-l1", 1e-2, "--l1-epochs", 1, "--finetune-epochs", 1, "--train-limit", 256,
                              "--batch-size", 64, "--data-root", data_root, "--eval-split", "test",
                              "--eval-limit", 200, "-o", out, "--json", "--no-progress")
    assert code == 0 and out.is_file()
    report = last_json(stdout)
    names = [s["name"] for s in report["steps"]]
    assert names == ["input", "l1", "slim"]
    first, l1, slim = report["steps"]
    assert l1["params"] == first["params"] and slim["params"] < first["params"]
    assert slim["accuracy_before_training"] is not None and slim["train_epochs"] == 1
    assert slim["record"]["achieved_ratio"] == pytest.approx(0.3, abs=0.02)

    code, stdout, _ = run_cli(capsys, "eval", out, "--data-root", data_root, "--limit", 200, "--json",
                              "--no-progress")
    assert code == 0 and last_json(stdout)["accuracy"] == pytest.approx(slim["accuracy"])
    code, stdout, _ = run_cli(capsys, "info", out, "--json")
    assert json.loads(stdout)["total"]["params"] == slim["params"]

    code, _, err = run_cli(capsys, "opt", weights, "--arch", "resnet20", "--passes", "slim(ratio=0.3)",
                           "--data-root", data_root, "-o", out)
    assert code == 2 and "--force" in err


@pytest.mark.parametrize("passes,message", [("slim(ratio=0.3", "column"), ("prune(x=1)", "unknown pass"),
                                            ("slim(ratio=2)", "ratio")])
def test_bad_pipelines_fail_before_any_work(capsys, tmp_path, passes, message):
    code, _, err = run_cli(capsys, "opt", "--arch", "resnet20", "--passes", passes, "--data-root", tmp_path,
                           "--eval-split", "none", "-o", tmp_path / "x.pt")
    assert code == 2 and message in err and not (tmp_path / "x.pt").exists()


def test_sparsity_training_needs_both_flags():
    with pytest.raises(ValueError, match="both"):
        OptConfig("slim", slim_l1=1e-4)


def test_provenance_leaves_codebooks_to_the_container():
    from pyprune.opt import _without_codebooks

    record = {"layers": {"conv": {"bits": 5, "codebook": [0.1, 0.2]}}, "codebooks": {"conv": [0.1, 0.2]}}
    assert _without_codebooks([{"name": "quant", "record": record}]) == \
        [{"name": "quant", "record": {"layers": {"conv": {"bits": 5}}}}]


def test_the_same_input_and_seed_give_the_same_file(capsys, data_root, tmp_path):
    """Issue 19, defect 7: step timings stay out of the file (they are in --json)."""
    outputs = []
    for name in ("a.ppz", "b.ppz"):
        out = tmp_path / name
        code, stdout, _ = run_cli(capsys, "opt", "--arch", "resnet20", "--passes", "mask(sparsity=0.5),quant(bits=5)",
                                  "--finetune-epochs", 0.02, "--train-limit", 128, "--batch-size", 32,
                                  "--data-root", data_root, "--eval-split", "none", "-o", out, "--json",
                                  "--no-progress")
        assert code == 0 and all("seconds" in step for step in last_json(stdout)["steps"])
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]
