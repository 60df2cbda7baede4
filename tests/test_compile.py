"""pyprune compile end to end on the shared ResNet-20 with a few hundred images:
outputs, reproducibility of the report from the written file, resume after a
kill, and every error path."""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pyprune.data import DataSpec
from pyprune.api import evaluate_model, inspect_file, load_model
from pyprune.cli import main
from pyprune.export import stored_codes

from .test_cli import last_json, run_cli

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_args(data_root, models_dir):
    """A compile small enough for CI: 300 val and test images, 512 training images."""
    weights = models_dir / "resnet20-12fca82f.th"
    return ["--arch", "resnet20", "--weights", weights, "--data-root", data_root, "--val-from", "test",
            "--val-limit", 300, "--screen-limit", 200, "--test-limit", 300, "--train-limit", 512,
            "--recal-images", 256, "--finetune-epochs", 0.25, "--batch-size", 64,
            "--slim-levels", "0.1,0.3", "--mask-levels", "0.5,0.8", "--bits-levels", "6,3", "--quiet",
            "--no-per-layer"]  # per-layer settings screen every layer (tests/search/test_layerwise.py)


def report_of(out):
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def clean_compile(tiny_args, tmp_path_factory):
    """One uninterrupted tiny compile at a 2-point target, shared by the tests that read
    its outputs and the resume test that must reproduce it: (exit code, stdout, out/)."""
    out = tmp_path_factory.mktemp("clean") / "out"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main([str(a) for a in ["compile", *tiny_args, "--max-drop", 0.02, "-o", out, "--json"]])
    return code, stdout.getvalue(), out


def test_tiny_compile_writes_everything_and_the_file_reproduces_the_report(clean_compile, data_root):
    code, stdout, out = clean_compile
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["bytes.png", "model.onnx", "model.ppz", "pareto.png", "report.json",
                                                     "report.md"]
    report, summary = report_of(out), last_json(stdout)
    chosen = report["chosen"]
    assert summary["pipeline"] == chosen["pipeline"] and chosen["met_target"]
    assert chosen["val_accuracy"] >= report["target"]["accuracy"] == pytest.approx(
        report["baseline"]["val_accuracy"] - 0.02)
    assert chosen["file_bytes"] == (out / "model.ppz").stat().st_size
    assert chosen["compression"] == pytest.approx(report["baseline"]["fp32_bytes"] / chosen["file_bytes"])
    assert chosen["pipeline"] and chosen["compression"] > 1.5  # lossless packing alone gives about 0.97x
    assert report["data"]["val_split"] == "cifar10/test-search" and report["data"]["test_split"] == "cifar10/test-report"

    # the written file, loaded and evaluated independently, gives the reported accuracies
    model = load_model(str(out / "model.ppz"))
    val = evaluate_model(model, split="test-search", data=DataSpec(root=str(data_root)), limit=300, progress=False)
    test = evaluate_model(model, split="test-report", data=DataSpec(root=str(data_root)), limit=300, progress=False)
    assert val.accuracy == chosen["val_accuracy"] and test.accuracy == chosen["test_accuracy"]
    assert val.accuracy == chosen["search_val_accuracy"]  # the model searched is the model written

    # every candidate is reported with what it cost; the chosen one is among them
    rows = report["candidates"]
    assert {"pipeline", "accuracy", "size_bytes", "seconds", "finetune_epochs", "phase"} <= set(rows[0])
    assert any(r["key"] == chosen["key"] + "#val" and r["meets"] for r in rows)
    assert report["search"]["finetuned"] == sum(r["phase"] == "finetune" for r in rows)
    # every fine-tune (0.25 epoch: the same first 2 seeded batches) distils from the one
    # teacher, which computes those 2 batches once and answers the rest from memory
    assert report["search"]["finetuned"] >= 2
    assert report["search"]["teacher_batches"] == {"computed": 2, "reused": 2 * (report["search"]["finetuned"] - 1)}
    assert len(report["layers"]) == 20 and report["layers"][0]["layer"] == "conv1"
    md = (out / "report.md").read_text()
    assert "## Per layer" in md and f"{chosen['compression']:.2f}x" in md and "layer3.2.conv2" in md
    assert "the teacher's outputs computed for 2 batches" in md
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "bytes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # where the bytes are: the parts of model.ppz sum to its size, as inspect finds them
    assert sum(chosen["parts"].values()) == chosen["file_bytes"]
    inspected = inspect_file(out / "model.ppz")["total"]
    assert chosen["parts"] == inspected["parts"]
    # inspect and the report give the same ratio, against the same original
    assert inspected["original_fp32_bytes"] == report["baseline"]["fp32_bytes"]
    assert inspected["compression_vs_original"] == pytest.approx(chosen["compression"])

    # model.onnx is the compact form of the written model, verified on the first 256 val images
    onnx = report["onnx"]
    assert onnx["verified"] and onnx["form"] == "compact" and summary["onnx_verified"]
    assert onnx["bytes"] == (out / "model.onnx").stat().st_size == summary["onnx_bytes"]
    assert onnx["verification"]["n"] == 256 and onnx["verification"]["data"] == "cifar10/test-search[:256]"
    import onnx as onnx_lib

    from pyprune.data import Normalize, load_dataset
    from pyprune.export import session

    stored = {t.name: onnx_lib.numpy_helper.to_array(t) for t in onnx_lib.load(str(out / "model.onnx")).graph.initializer}
    quantized = [r["layer"] for r in report["layers"] if r["codes"] is not None]
    weights = model.module.state_dict()
    assert all(stored_codes(stored, f"{q}.weight", weights[f"{q}.weight"].shape).dtype == "uint8"
               and f"{q}.weight" not in stored for q in quantized)
    coded = [name[:-len(".codebook")] for name in stored if name.endswith(".codebook")]
    assert len(coded) == onnx["codebook_tensors"] > 0
    for name in coded:  # the codebook rebuilds the .ppz weight bit for bit
        rebuilt = stored[f"{name}.codebook"][stored_codes(stored, name, weights[name].shape).astype("int64")]
        assert rebuilt.tobytes() == weights[name].numpy().tobytes(), name
    images = load_dataset("cifar10", "test-search", data_root, limit=300)
    x = Normalize(model.mean, model.std)(images.images)
    logits = session(str(out / "model.onnx")).run(None, {"input": x.numpy()})[0]
    assert (logits.argmax(1) == images.labels.numpy()).mean() == pytest.approx(val.accuracy, abs=1 / 300)


def _compile_process(args, out):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # A background job of a non-interactive shell inherits SIGINT ignored, and Python then
    # installs no KeyboardInterrupt handler: restore the default, as a terminal has it.
    return subprocess.Popen([sys.executable, "-m", "pyprune", "compile", *map(str, args), "-o", str(out)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_candidates(proc, journal, n, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if journal.is_file() and len(journal.read_text().splitlines()) >= n + 2:  # fingerprint + baseline + n
            return
        if proc.poll() is not None:
            pytest.fail(f"compile ended before {n} candidates: {proc.communicate()}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail("no progress in the journal")


def test_a_killed_compile_resumes_without_redoing_candidates_and_matches_a_clean_run(capsys, tiny_args, tmp_path,
                                                                                   clean_compile):
    args = [*tiny_args, "--max-drop", 0.02]
    out = tmp_path / "killed"
    proc = _compile_process(args, out)
    journal = out / ".compile-state" / "journal.jsonl"
    _wait_for_candidates(proc, journal, 4)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL and not (out / "report.json").exists()
    done_before = [json.loads(line)["key"] for line in journal.read_text().splitlines()[1:] if line.endswith("}")]

    code, _, err = run_cli(capsys, "compile", *args, "-o", out)
    assert code == 2 and "--resume" in err  # a non-empty out/ is never silently reused
    code, _, _ = run_cli(capsys, "compile", *args, "-o", out, "--resume")
    assert code == 0 and not (out / ".compile-state").exists()
    resumed = report_of(out)
    keys = [c["key"] for c in resumed["candidates"]]
    assert set(done_before) <= set(keys) and len(keys) == len(set(keys))  # nothing measured twice
    assert resumed["search"]["cache_hits"] >= len(done_before) - 1

    code, _, clean_out = clean_compile
    clean = report_of(clean_out)
    assert code == 0 and resumed["chosen"]["pipeline"] == clean["chosen"]["pipeline"]
    assert resumed["chosen"]["val_accuracy"] == clean["chosen"]["val_accuracy"]
    assert [(c["key"], c["accuracy"]) for c in resumed["candidates"]] == \
        [(c["key"], c["accuracy"]) for c in clean["candidates"]]


def test_ctrl_c_exits_130_and_leaves_a_resumable_state(tiny_args, tmp_path):
    out = tmp_path / "out"
    proc = _compile_process([*tiny_args, "--max-drop", 0.02], out)
    _wait_for_candidates(proc, out / ".compile-state" / "journal.jsonl", 1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "--resume" in err
    assert (out / ".compile-state" / "journal.jsonl").is_file() and not (out / "report.json").exists()


def test_baseline_below_an_absolute_target_exits_2_and_writes_nothing(capsys, tiny_args, tmp_path):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "compile", *tiny_args, "--target-acc", 0.99, "-o", out)
    assert code == 2 and "0.9900" in err and "baseline model scores 0.8" in err
    assert not out.exists()


def test_when_nothing_meets_the_target_the_lossless_baseline_is_written(capsys, tiny_args, tmp_path, models_dir):
    out = tmp_path / "out"
    args = [*tiny_args, "--max-drop", 0, "--finetune-epochs", 0, "--slim-levels", 0.9, "--mask-levels", 0.98,
            "--bits-levels", 1, "--no-onnx"]
    code, _, err = run_cli(capsys, "compile", *args, "-o", out)
    assert code == 0 and "warning: no compressed candidate met the target" in err
    report = report_of(out)
    assert not report["chosen"]["met_target"] and report["chosen"]["pipeline"] == ""
    assert report["search"]["candidates"] >= 3 and "Warning" in (out / "report.md").read_text()
    original = load_model(arch="resnet20", weights=str(models_dir / "resnet20-12fca82f.th")).module.state_dict()
    written = load_model(str(out / "model.ppz")).module.state_dict()
    assert all(torch.equal(original[k], written[k]) for k in original)  # packed losslessly


def test_divergent_fine_tuning_is_rolled_back_marked_failed_and_the_search_goes_on(capsys, tiny_args, tmp_path):
    out = tmp_path / "out"
    code, _, _ = run_cli(capsys, "compile", *tiny_args, "--max-drop", 0.02, "--lr", 1e12, "--no-onnx", "-o", out)
    report = report_of(out)
    failed = [c for c in report["candidates"] if c["status"] == "failed"]
    assert code == 0 and failed and all("diverged" in c["reason"] for c in failed)
    assert report["search"]["failed"] == len(failed)
    assert any(c["phase"] == "screen" for c in report["candidates"])  # the search went on past failures
    assert report["chosen"]["val_accuracy"] >= report["target"]["accuracy"]


def test_a_tiny_budget_without_onnx_still_gives_a_valid_result(capsys, tiny_args, tmp_path):
    out = tmp_path / "out"
    code, stdout, _ = run_cli(capsys, "compile", *tiny_args, "--max-drop", 0.02, "--budget-minutes", 1e-6, "--no-onnx",
                              "--json", "-o", out)
    report = report_of(out)
    assert code == 0 and report["search"]["budget_exhausted"]
    assert load_model(str(out / "model.ppz")) is not None
    assert report["chosen"]["val_accuracy"] >= report["target"]["accuracy"]
    # --no-onnx: everything but model.onnx, and the report says how to write it later
    assert sorted(p.name for p in out.iterdir()) == ["bytes.png", "model.ppz", "pareto.png", "report.json", "report.md"]
    assert report["onnx"]["skipped"] == "--no-onnx" and not report["onnx"]["verified"]
    assert "ONNX: not written (--no-onnx; `pyprune export-onnx model.ppz" in (out / "report.md").read_text()
    assert last_json(stdout)["onnx_bytes"] is None


def test_grid_measures_every_combination_and_keeps_the_smallest_that_meets(capsys, tiny_args, tmp_path):
    out = tmp_path / "out"
    args = [*tiny_args, "--search", "grid", "--order", "mask,quant", "--mask-levels", "0.5,0.8", "--bits-levels", 6,
            "--no-onnx"]
    code, _, _ = run_cli(capsys, "compile", *args, "--max-drop", 0.02, "-o", out)
    report = report_of(out)
    grid = [c for c in report["candidates"] if c["stage"] == "grid"]
    assert code == 0 and all(c["phase"] == "finetune" for c in grid)
    assert sorted(c["pipeline"] for c in grid) == sorted([  # (2 mask levels + off) x (1 bits level + off) - baseline
        "mask(sparsity=0.5)", "mask(sparsity=0.8)", "quant(bits=6)",
        "mask(sparsity=0.5),quant(bits=6)", "mask(sparsity=0.8),quant(bits=6)"])
    meeting = [c for c in grid if c["meets"]]
    smallest = min(meeting, key=lambda c: c["size_bytes"])["pipeline"] if meeting else ""  # "": the baseline
    assert report["chosen"]["pipeline"] == smallest


def test_order_exploration_and_sparsity_training_are_reported(capsys, tiny_args, tmp_path):
    out = tmp_path / "out"
    args = [*tiny_args, "--order", "slim,mask", "--explore-order", "--slim-l1", 1e-2, "--l1-epochs", 0.25, "--no-onnx"]
    code, _, _ = run_cli(capsys, "compile", *args, "--max-drop", 0.02, "-o", out)
    search = report_of(out)["search"]
    assert code == 0 and sorted(tuple(o["order"]) for o in search["orders"]) == [("mask", "slim"), ("slim", "mask")]
    best = min(search["orders"], key=lambda o: o["size_bytes"])
    assert search["order"] == best["order"]
    l1 = search["l1"]
    assert l1["paid_off"] == (l1["boundary_with"] > l1["boundary_without"]) and l1["status"] == "ok"
    assert "sparsity training" in (out / "report.md").read_text()


@pytest.mark.parametrize("extra,message", [
    (["--max-drop", 2], "--max-drop is a fraction"),
    (["--max-drop", 0.01, "--bits-levels", 0], "integer bits in 1..16"),
    (["--max-drop", 0.01, "--order", "slim,slim"], "names a stage twice"),
    (["--max-drop", 0.01, "--order", "prune"], "unknown stage"),
    (["--max-drop", 0.01, "--val-limit", 0], "--val-limit must be positive"),
    (["--max-drop", 0.01, "--screen-steps", -1], "--screen-steps must be >= 0"),
    (["--max-drop", 0.01, "--search", "grid", "--explore-order"], "not to --search grid"),
])
def test_bad_flags_fail_before_any_work_and_leave_nothing(capsys, tiny_args, tmp_path, extra, message):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "compile", *tiny_args, *extra, "-o", out)
    assert code == 2 and message in err and not out.exists()


def test_both_targets_or_none_is_a_usage_error(capsys, tiny_args, tmp_path):
    for extra in (["--max-drop", 0.01, "--target-acc", 0.9], []):
        with pytest.raises(SystemExit) as info:
            run_cli(capsys, "compile", *tiny_args, *extra, "-o", tmp_path / "out")
        assert info.value.code == 2 and "--target-acc" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_dataset_and_untraceable_model_leave_nothing(capsys, tiny_args, tmp_path):
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    args = [str(a) for a in tiny_args]
    args[args.index("--data-root") + 1] = str(empty)
    code, _, err = run_cli(capsys, "compile", *args, "--max-drop", 0.01, "-o", out)
    assert code == 2 and "CIFAR-10 not found" in err and not out.exists()
    code, _, err = run_cli(capsys, "compile", "--arch", "tests.ir.test_trace:Wrapper", "--max-drop", 0.01,
                           "--data-root", empty, "-o", out)
    assert code == 2 and "trac" in err.lower() and not out.exists()


def test_a_non_empty_output_folder_needs_resume_or_force(capsys, tiny_args, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "compile", *tiny_args, "--max-drop", 0.01, "-o", out)
    assert code == 2 and "--force" in err
    code, _, err = run_cli(capsys, "compile", *tiny_args, "--max-drop", 0.01, "-o", out, "--resume")
    assert code == 2 and "no interrupted compile" in err
    assert (out / "notes.txt").read_text() == "mine"


# MobileNetV2 brings what no other compile test has (depthwise convolutions, inverted
# residuals) in half ResNet-18's time (37 s against 52 s on 2 cores, most of ResNet-18's
# in packing and exporting its 11M weights); ResNet-18's basic blocks are the CIFAR
# ResNets' of the tiny compiles above, its loading and passes are in tests/models/test_torchvision.py.
@pytest.mark.parametrize("arch", ["torchvision:mobilenet_v2", pytest.param("torchvision:resnet18",
                                                                           marks=pytest.mark.slow)])
def test_tiny_compile_of_a_torchvision_model_on_an_image_folder(tmp_path, arch):
    """A torchvision ImageNet architecture, from the user's own weights file, on a
    generated ImageFolder tree: the whole compile runs and its .ppz, loaded back and
    evaluated independently, reproduces the reported accuracy. At 64x64 (the CLI's
    --input-size 64) to stay fast."""
    import torchvision

    from pyprune.compile import CompileConfig, compile_model
    from pyprune.data import load_dataset
    from pyprune.search import Target
    from pyprune.train import TrainConfig, evaluate

    from .data.test_imagefolder import make_tree

    name = arch.split(":", 1)[1]
    torch.manual_seed(0)
    weights = tmp_path / f"{name}.pt"
    torch.save(torchvision.models.get_model(name, weights=None, num_classes=3).state_dict(), weights)
    tree = make_tree(tmp_path / "tree")
    model = load_model(arch=arch, weights=str(weights), num_classes=3, input_size=64)
    data = f"imagefolder:{tree}"
    config = CompileConfig(
        Target(max_drop=0.5), tmp_path / "out", levels={"slim": (0.3,), "mask": (0.5,), "quant": (6,)},
        finetune_epochs=1.0, val_from="test", screen_limit=9, recal_images=16, data=data, quiet=True,
        train=TrainConfig(batch_size=8, lr=0.01, seed=0), onnx_verify=8, distill=0.0)  # loading, not recovery
    result = compile_model(model, config, log=lambda _: None)
    assert result.exit_code == 0
    report = result.report
    assert report["chosen"]["met_target"] and report["chosen"]["pipeline"]
    assert report["data"]["val_split"] == f"imagefolder:{tree}/test-search"
    assert report["onnx"]["verified"]
    written = load_model(str(tmp_path / "out" / "model.ppz"))
    assert written.input_shape == (3, 64, 64) and written.mean == model.mean
    val = load_dataset(data, "test-search", input_shape=written.input_shape)
    assert evaluate(written.module, val, written.mean, written.std, progress=False).accuracy == \
        report["chosen"]["val_accuracy"]
    assert report["chosen"]["compression"] > 1.5
