import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from pyprune.cli import build_parser, main
from pyprune.data import load_cifar10
from pyprune.models import build_model, load_weights


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def last_json(out):
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("arch,params,tolerance", [
    ("resnet20", 0.27e6, 0.01), ("resnet56", 0.85e6, 0.01), ("vgg19", 20.04e6, 0.01), ("densenet40", 1.02e6, 0.03)])
def test_info_json_reproduces_known_counts(capsys, arch, params, tolerance):
    code, out, _ = run_cli(capsys, "info", "--arch", arch, "--json")
    info = json.loads(out)
    assert code == 0 and set(info) >= {"layers", "total"}
    assert info["total"]["params"] == pytest.approx(params, rel=tolerance)
    assert info["total"]["params"] == sum(layer["params"] for layer in info["layers"])


def test_info_table(capsys):
    code, out, _ = run_cli(capsys, "info", "--arch", "resnet20")
    assert code == 0
    assert "layer1.0.conv1" in out and "269,722" in out and "40,551,040" in out


def test_eval_matches_an_independent_loop(capsys, data_root, models_dir):
    weights = models_dir / "resnet20-12fca82f.th"
    code, out, _ = run_cli(capsys, "eval", weights, "--arch", "resnet20", "--data-root", data_root,
                           "--limit", 300, "--json", "--no-progress")
    result = last_json(out)
    assert code == 0 and result["n"] == 300
    model = build_model("resnet20").eval()
    load_weights(model, weights)
    test = load_cifar10("test", data_root=data_root, limit=300)
    x = test.images.float() / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == test.labels).float().mean().item()
    assert result["accuracy"] == pytest.approx(accuracy)


def test_eval_full_resnet20_reproduces_published_figure(capsys, data_root, models_dir):
    code, out, _ = run_cli(capsys, "eval", "--arch", "resnet20", "--weights", models_dir / "resnet20-12fca82f.th",
                           "--data-root", data_root, "--split", "test", "--json", "--no-progress")
    assert code == 0 and last_json(out)["n"] == 10000
    assert last_json(out)["accuracy"] == pytest.approx(0.810, abs=0.003)


@pytest.mark.slow
def test_eval_full_resnet56_reproduces_published_figure(capsys, data_root, models_dir):
    code, out, _ = run_cli(capsys, "eval", "--arch", "resnet56", "--weights", models_dir / "resnet56-4bfd9763.th",
                           "--data-root", data_root, "--json", "--no-progress")
    assert code == 0 and last_json(out)["accuracy"] == pytest.approx(0.832, abs=0.003)


def test_missing_data_is_a_clear_error(capsys, tmp_path):
    code, _, err = run_cli(capsys, "eval", "--arch", "resnet20", "--data-root", tmp_path, "--no-progress")
    assert code == 2
    assert "CIFAR-10 not found" in err and "--download" in err and "Traceback" not in err


def test_mismatched_checkpoint_lists_keys(capsys, tmp_path):
    bad = tmp_path / "bad.pt"
    state = build_model("resnet20").state_dict()
    del state["linear.bias"]
    state["linear.weight"] = torch.zeros(5, 64)
    torch.save(state, bad)
    code, _, err = run_cli(capsys, "info", bad, "--arch", "resnet20")
    assert code == 2 and "linear.bias" in err and "linear.weight" in err


def test_no_model_is_a_clear_error(capsys):
    code, _, err = run_cli(capsys, "info")
    assert code == 2 and "--arch" in err


def test_train_saves_loadable_weights_and_never_overwrites(capsys, data_root, tmp_path):
    out_file = tmp_path / "tuned.pt"
    args = ["train", "--arch", "resnet20", "--data-root", data_root, "--limit", 128, "--batch-size", 64,
            "--epochs", 1, "--slim-l1", 1e-4, "--eval-split", "none", "--no-progress", "-o", out_file, "--json"]
    code, out, _ = run_cli(capsys, *args)
    assert code == 0 and out_file.is_file()
    summary = last_json(out)
    assert len(summary["epochs"]) == 1 and summary["epochs"][0]["images_per_s"] > 0
    model = build_model("resnet20")
    load_weights(model, out_file)  # weights_only loading of our own output
    mtime = out_file.stat().st_mtime_ns
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and "--force" in err and out_file.stat().st_mtime_ns == mtime


@pytest.mark.parametrize("command", ["info", "eval", "train", "models"])
def test_help_explains_itself(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "usage: pyprune" in out
    if command != "models":
        assert "--arch" in out and "--trust-pickle" in out


def test_module_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "pyprune", "models"], capture_output=True, text=True, check=True)
    assert "resnet56" in proc.stdout and "densenet40" in proc.stdout


def test_demo_path_without_shared_models_downloads_once(capsys, data_root, models_dir, tmp_path, monkeypatch):
    """`make demo` on a machine without ../shared: the checkpoint comes from GitHub
    (here a stand-in for the network call) into the cache, verified, then reused."""
    import shutil

    import torch.hub

    calls = []

    def fake_download(url, dst, hash_prefix=None):
        calls.append((url, hash_prefix))
        shutil.copy(models_dir / url.rsplit("/", 1)[1], dst)

    monkeypatch.delenv("PYPRUNE_MODELS", raising=False)
    monkeypatch.setenv("PYPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    args = ["eval", "--arch", "resnet20", "--pretrained", "--download", "--data-root", data_root,
            "--limit", 50, "--json", "--no-progress"]
    code, out, _ = run_cli(capsys, *args)
    assert code == 0 and last_json(out)["n"] == 50
    assert calls == [("https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"
                      "resnet20-12fca82f.th", "12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8")]
    assert (tmp_path / "cache" / "resnet20-12fca82f.th").is_file()
    code, _, _ = run_cli(capsys, *args)
    assert code == 0 and len(calls) == 1  # cached: no second download
    monkeypatch.setenv("PYPRUNE_CACHE", str(tmp_path / "empty"))
    code, _, err = run_cli(capsys, "eval", "--arch", "resnet20", "--pretrained", "--data-root", data_root,
                           "--limit", 50)
    assert code == 2 and "--download" in err


def test_leaf_module_lets_info_trace_and_refuses_to_save_before_any_work(capsys, tmp_path):
    arch = "tests.ir.test_trace:LeafNet"
    code, _, err = run_cli(capsys, "info", "--arch", arch)
    assert code == 2 and "--leaf-module GatedConv" in err and "Traceback" not in err
    code, out, _ = run_cli(capsys, "info", "--arch", arch, "--leaf-module", "GatedConv", "--json")
    layers = {row["name"]: row for row in json.loads(out)["layers"]}
    assert code == 0 and layers["gated"]["op"] == "GatedConv" and layers["gated"]["params"] == 4 * 4 * 9 + 4
    output = tmp_path / "leaf.ppz"
    code, out, err = run_cli(capsys, "opt", "--arch", arch, "--leaf-module", "GatedConv", "--passes",
                             "mask(sparsity=0.5)", "--eval-split", "none", "--no-progress", "-o", output)
    assert code == 2 and "could not hold this model" in err and "GatedConv" in err and not output.exists()
    assert "input:" not in out  # refused before the first step was measured
    code, _, err = run_cli(capsys, "info", "--arch", arch, "--leaf-module", "Gated")
    assert code == 2 and "names no submodule" in err


# --- what a new user meets --------------------------------------------------------

def test_no_arguments_lists_the_commands(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    for command in ("info", "eval", "train", "opt", "compile", "export-onnx", "inspect", "passes", "models"):
        assert command in out


def _subcommand_parsers():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices


@pytest.mark.parametrize("command", ["info", "eval", "train", "opt", "compile", "export-onnx"])
def test_help_says_each_default_once_and_every_option_has_help(command):
    parser = _subcommand_parsers()[command]
    text = parser.format_help()
    assert "(default: None)" not in text
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{command} {action.option_strings[0]} has no help"
            assert action.help.count("default") <= 1
    for line_start in ("--lr", "--batch-size"):
        assert line_start not in text or "(default: " in text


@pytest.mark.parametrize("argv", [
    ["compile", "--arch", "resnet20", "--target-acc", "0.9", "-o", "OUT", "--batch-size", "0"],
    ["opt", "--arch", "resnet20", "--passes", "slim(ratio=0.1)", "-o", "OUT.ppz", "--batch-size", "-3"],
    ["eval", "--arch", "resnet20", "--limit", "0"],
    ["train", "--arch", "resnet20", "-o", "OUT.pt", "--lr", "0"],
])
def test_sizes_and_rates_must_be_positive(argv, tmp_path, capsys):
    argv = [str(tmp_path / a) if a.startswith("OUT") else a for a in argv]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert "must be" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
