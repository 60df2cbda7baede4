"""pyprune.distributed: fine-tuning and compile under torchrun with 2 gloo
processes on the CPU, against one process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyprune.data import DataSpec
from pyprune.api import evaluate_model, load_model

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "distributed_worker.py"


def torchrun(*args, nproc=2, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc-per-node={nproc}", *map(str, args)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def fine_tuned(tmp_path, kind):
    """(one process's state, [each of two processes' states]) after the worker's fine-tune."""
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, WORKER, one, kind], cwd=REPO, check=True, timeout=120)
    run = torchrun(WORKER, two, kind)
    assert run.returncode == 0, run.stderr[-3000:]
    single = torch.load(one / "rank0.pt")
    ranks = [torch.load(two / f"rank{r}.pt") for r in range(2)]
    assert single["world"] == 1 and [r["world"] for r in ranks] == [2, 2]
    return single, ranks


def quantized_weights(state):
    return {k: v for k, v in state.items() if k.endswith("weight") and v.dim() > 1}


@pytest.mark.parametrize("kind", ["nobn", "bn"])
def test_two_processes_keep_masks_and_codebooks_like_one(tmp_path, kind):
    single, (rank0, rank1) = fine_tuned(tmp_path, kind)
    # every process ends with the same model, buffers included
    assert rank0["state"].keys() == rank1["state"].keys()
    assert all(torch.equal(rank0["state"][k], rank1["state"][k]) for k in rank0["state"])
    weights = quantized_weights(single["state"])
    assert len(weights) == 3
    for name, w in weights.items():
        w2 = rank0["state"][name]
        assert not torch.equal(w, single["before"][name])  # the fine-tune did move the weights
        assert torch.equal(w == 0, w2 == 0), name  # the same mask
        # ... with the pass's count (scope=layer: half of every layer; the weights may regrow)
        assert int((w == 0).sum()) == int((single["before"][name] == 0).sum()) == round(0.5 * w.numel()), name
        values, values2 = w[w != 0].unique(), w2[w2 != 0].unique()
        assert len(values) == len(values2) <= 2 ** 3, name  # the same number of shared values
        # the split batch has the whole batch's gradient (BatchNorm statistics are taken
        # over all processes), so the codebooks agree up to the order of floating-point sums
        torch.testing.assert_close(values2, values, rtol=0, atol=2e-6)
    for name, t in single["state"].items():  # everything else too, BatchNorm buffers included
        if t.is_floating_point():
            torch.testing.assert_close(rank0["state"][name], t, rtol=0, atol=2e-6)
    assert rank0["loss"] == pytest.approx(single["loss"], abs=1e-6)


def test_per_process_batchnorm_statistics_are_what_no_sync_bn_trades(tmp_path):
    single, (rank0, rank1) = fine_tuned(tmp_path, "bn-local")
    # still one model everywhere, with the same mask sizes and codebook sizes (which
    # weights are zero follows the training, since pruned weights may regrow) ...
    assert all(torch.equal(rank0["state"][k], rank1["state"][k]) for k in rank0["state"])
    for name, w in quantized_weights(single["state"]).items():
        w2 = rank0["state"][name]
        assert int((w == 0).sum()) == int((w2 == 0).sum()), name
        assert len(w[w != 0].unique()) == len(w2[w2 != 0].unique()) <= 2 ** 3, name
    # ... but each process normalised its own half-batch: the statistics, and with them
    # the training, are no longer one process's (synchronized, they agree within 2e-6)
    stats = [k for k in single["state"] if k.endswith("running_var")]
    assert stats and max((rank0["state"][k] - single["state"][k]).abs().max().item() for k in stats) > 1e-3


@pytest.fixture(scope="module")
def tiny_compile_args(data_root, models_dir):
    weights = models_dir / "resnet20-12fca82f.th"
    return ["--arch", "resnet20", "--weights", weights, "--data-root", data_root, "--val-from", "test",
            "--val-limit", 200, "--screen-limit", 100, "--test-limit", 200, "--train-limit", 256,
            "--recal-images", 128, "--finetune-epochs", 0.5, "--batch-size", 64, "--slim-levels", "0.3",
            "--mask-levels", "0.5", "--bits-levels", "6", "--onnx-verify", 64, "--quiet", "--max-drop", 0.05]


def test_compile_under_torchrun_writes_a_valid_ppz(tmp_path, tiny_compile_args, data_root):
    out = tmp_path / "out"
    run = torchrun("-m", "pyprune", "compile", *tiny_compile_args, "-o", out, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    import json

    report = json.loads((out / "report.json").read_text())
    assert report["processes"] == 2 and report["onnx"]["verified"]
    assert not (out / ".compile-state").exists()
    model = load_model(str(out / "model.ppz"))
    val = evaluate_model(model, split="test-search", data=DataSpec(root=str(data_root)), limit=200, progress=False)
    assert val.accuracy == report["chosen"]["val_accuracy"]  # the file written is the model measured
    assert run.stdout.count("chose ") <= 1  # only rank 0 talks


def test_nproc_launches_torchrun(tmp_path, data_root, models_dir):
    weights = models_dir / "resnet20-12fca82f.th"
    out = tmp_path / "w.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "pyprune", "train", "--arch", "resnet20", "--weights", str(weights),
                          "--data-root", str(data_root), "--limit", "128", "--batch-size", "64", "--epochs", "1",
                          "--eval-split", "none", "--no-progress", "--nproc", "2", "--json", "-o", str(out)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # rank 1 printed nothing
    assert torch.load(out, weights_only=True)["arch"] == "resnet20"


def test_batch_not_divisible_by_processes_is_refused(tmp_path, monkeypatch):
    # each process refuses before its first collective (how a process's error reaches the
    # user through torchrun: test_nproc_passes_on_the_exit_code_of_the_failing_process)
    from pyprune import distributed
    from pyprune.data import ArrayDataset
    from pyprune.train import TrainConfig, fine_tune

    monkeypatch.setattr(distributed, "current", lambda: distributed.Shard(rank=1, world=2))
    data = ArrayDataset(torch.zeros((8, 3, 4, 4), dtype=torch.uint8), torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="--batch-size 63 must be a multiple of the 2 processes"):
        fine_tune(torch.nn.Conv2d(3, 2, 1), data, (0.5,) * 3, (0.25,) * 3, TrainConfig(batch_size=63, progress=False))
    # --nproc checks it before launching anything: a plain usage error
    shortcut = subprocess.run([sys.executable, "-m", "pyprune", "train", "--arch", "resnet20", "--batch-size", "63",
                               "--nproc", "2", "-o", str(tmp_path / "w.pt")], cwd=REPO, capture_output=True,
                              text=True, timeout=120)
    assert shortcut.returncode == 2 and "must be a multiple of --nproc 2" in shortcut.stderr
    assert not (tmp_path / "w.pt").exists()


def test_nproc_passes_on_the_exit_code_of_the_failing_process(tmp_path, models_dir):
    weights = models_dir / "resnet20-12fca82f.th"
    out = tmp_path / "w.pt"
    out.write_bytes(b"keep me")
    run = subprocess.run([sys.executable, "-m", "pyprune", "train", "--arch", "resnet20", "--weights", str(weights),
                          "--batch-size", "64", "--nproc", "2", "-o", str(out)],
                         cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=300)
    # the processes' own exit code (2: bad input), not torchrun's blanket 1, and no launcher traceback
    assert run.returncode == 2, run.stderr[-3000:]
    assert f"{out} exists; pass --force" in run.stderr
    assert "Traceback" not in run.stderr
    assert out.read_bytes() == b"keep me"


def test_a_process_that_cannot_join_its_peers_says_so_in_one_line(monkeypatch, capsys):
    """Under --nproc, a peer that failed first (an existing output, say) can leave while
    this process is still joining; the store then reports "Connection closed by peer".
    That is one line and exit 1, not a traceback beside the peer's error."""
    import torch.distributed as dist

    from pyprune.cli.app import main

    def peer_left(*args, **kwargs):
        raise dist.DistNetworkError("Connection closed by peer\nmore detail")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(dist, "init_process_group", peer_left)
    assert main(["passes"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == ["pyprune passes: error: could not join the other 1 process (one may have failed and "
                                "left): Connection closed by peer"], err


def test_leaving_after_a_failure_never_raises(monkeypatch):
    """After its own error a process leaves the group at once; a peer gone first can
    make that fail, which must not hide the error with a traceback."""
    import torch.distributed as dist

    from pyprune import distributed

    def broken():
        raise dist.DistNetworkError("Connection closed by peer")
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "destroy_process_group", broken)
    distributed.shutdown(together=False)  # returns
    with pytest.raises(dist.DistNetworkError):  # after a success a failure to leave is real
        monkeypatch.setattr(dist, "barrier", lambda: None)
        distributed.shutdown(together=True)
