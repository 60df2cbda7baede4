"""Whole models in the .ppz container: exact round trip, CLI eval/info/inspect."""

import json

import pytest
import torch

from pyprune.api import load_model, save_model
from pyprune.encode import GraphFormatError
from pyprune.encode import ppz
from pyprune.encode.model_ppz import load_ppz
from pyprune.ir import example_input

from ..passes_helpers import compressed
from ..test_cli import last_json, run_cli


@pytest.fixture
def resnet20(models_dir):
    return load_model(arch="resnet20", weights=str(models_dir / "resnet20-12fca82f.th"))


def test_round_trip_is_bit_identical(resnet20, tmp_path):
    gm, books = compressed(resnet20)
    assert books and all(len(cb) <= 32 for cb in books.values())
    path = save_model(resnet20, tmp_path / "m.ppz", gm=gm, codebooks=books)
    assert ppz.is_ppz(path)
    loaded, meta = load_ppz(path)
    want = gm.state_dict()
    got = loaded.state_dict()
    assert sorted(got) == sorted(want)
    for k in want:  # compare the bytes: bit-identical, not merely close
        assert got[k].dtype == want[k].dtype and torch.equal(got[k].view(-1).view(torch.uint8),
                                                             want[k].contiguous().view(-1).view(torch.uint8)), k
    x = example_input((3, 32, 32), batch=8)
    assert torch.equal(loaded(x), gm.eval()(x))
    assert meta["arch"] == "resnet20" and meta["mean"] == list(resnet20.mean)


def test_cli_eval_info_inspect(resnet20, tmp_path, capsys, data_root):
    gm, books = compressed(resnet20)
    path = save_model(resnet20, tmp_path / "m.ppz", gm=gm, codebooks=books)
    code, out, _ = run_cli(capsys, "eval", path, "--data-root", data_root, "--limit", 200, "--json", "--no-progress")
    from pyprune.data import load_dataset
    from pyprune.train import evaluate

    want = evaluate(gm, load_dataset("cifar10", "test", data_root=data_root, limit=200), resnet20.mean,
                    resnet20.std, progress=False)
    assert code == 0 and last_json(out)["accuracy"] == want.accuracy
    code, out, _ = run_cli(capsys, "info", path, "--json")
    assert code == 0 and json.loads(out)["total"]["params"] == sum(p.numel() for p in gm.parameters())
    code, out, _ = run_cli(capsys, "inspect", path)
    assert code == 0 and "layer3.2.conv2.weight" in out and "compression" in out
    assert "codes stream: Huffman" in out and "entropy" in out
    code, out, _ = run_cli(capsys, "inspect", path, "--json")
    report = json.loads(out)
    assert report["total"]["file_bytes"] == path.stat().st_size
    assert report["total"]["fp32_bytes"] / report["total"]["file_bytes"] > 8  # slim + mask + 5 bits


def test_quantized_layers_need_a_container(resnet20, tmp_path):
    gm, books = compressed(resnet20, "quant(bits=4)")
    with pytest.raises(ValueError, match=".ppz"):
        save_model(resnet20, tmp_path / "m.pt", gm=gm, codebooks=books)


def test_corrupt_or_foreign_files_are_clear_errors(resnet20, tmp_path, capsys):
    gm, books = compressed(resnet20, "quant(bits=4)")
    path = save_model(resnet20, tmp_path / "m.ppz", gm=gm, codebooks=books)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    bad = tmp_path / "bad.ppz"
    bad.write_bytes(bytes(data))
    code, _, err = run_cli(capsys, "eval", bad, "--limit", 10)
    assert code == 2 and "Traceback" not in err and "section" in err
    foreign = ppz.pack(tmp_path / "foreign.ppz", {"hello": "world"}, {"t": torch.zeros(3)})
    with pytest.raises(GraphFormatError, match="no pyprune model"):
        load_ppz(foreign)


@pytest.mark.parametrize("arch", ["resnet20", "vgg11", "densenet40", "resnet164"])
def test_a_model_packed_with_nothing_removed_is_smaller_than_its_fp32_bytes(arch, tmp_path):
    """The lossless file (what compile writes when nothing meets the target): the
    tensors' exponent bytes compress (raw_z) by more than the manifest and table cost."""
    model = load_model(arch=arch)
    path = save_model(model, tmp_path / "m.ppz")
    total = ppz.inspect(path)["total"]
    assert total["file_bytes"] < total["fp32_bytes"] == total["original_fp32_bytes"]
    assert total["compression"] == total["compression_vs_original"] > 1.0
    assert sum(total["parts"].values()) == total["file_bytes"] and total["parts"]["raw tensors"] > 0


def test_the_published_resnet20_packed_losslessly_is_smaller_than_fp32(resnet20, tmp_path):
    path = save_model(resnet20, tmp_path / "m.ppz")
    total = ppz.inspect(path)["total"]
    loaded = load_model(str(path))
    x = example_input((3, 32, 32), batch=4)
    assert torch.equal(loaded.module(x), resnet20.module.eval()(x))
    assert total["file_bytes"] < 0.9 * total["fp32_bytes"]


def test_weights_quantized_before_keep_their_codes_without_codebooks(resnet20, tmp_path):
    """A compiled model compiled again: no pass of the new run made codebooks, but its
    weights still hold a few shared values; the file stores them as codes, losslessly,
    in as few bytes as when the codebooks are given."""
    gm, books = compressed(resnet20)
    with_books = save_model(resnet20, tmp_path / "with.ppz", gm, codebooks=books)
    without = save_model(resnet20, tmp_path / "without.ppz", gm)
    assert without.stat().st_size == with_books.stat().st_size
    loaded, _ = load_ppz(without)
    for name, t in gm.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name


def test_a_saved_model_says_what_was_done_to_it(resnet20, tmp_path):
    from pyprune.cli.present import history_line

    gm, books = compressed(resnet20)
    provenance = [{"compile": "slim(ratio=0.3),quant(bits=5)", "target": 0.9, "bnfold": {"float16": True}}]
    path = save_model(resnet20, tmp_path / "m.ppz", gm, provenance=provenance, codebooks=books)
    model = load_model(str(path))
    assert model.history == ("compile slim(ratio=0.3),quant(bits=5)", "BatchNorm folded into the convolutions")
    assert history_line(model).startswith("resnet20 was compressed before: compile slim(ratio=0.3),quant(bits=5); "
                                          "BatchNorm folded")
    assert history_line(load_model(arch="resnet20")) is None
