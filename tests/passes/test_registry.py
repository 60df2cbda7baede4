"""The pass registry: one table that pipeline parsing, `pyprune passes`, `opt
--passes` and the compile search all read. A toy pass registered here, in the test
file, with no other file edited, must be usable by each of them."""

import inspect
import json

import pytest
import torch
from torch import nn

from pyprune.api import load_model
from pyprune.cli import main
from pyprune.ir import PassResult
from pyprune.passes import (PASSES, GraphPass, Knob, Option, Range, check_levels, create_pass, describe_passes,
                            parse_levels, register_pass, registered, searchable_passes)
from pyprune.search.candidates import Stage


class NegateBias(GraphPass):
    """negate every conv/linear bias, times scale (a toy pass for the tests)"""

    name = "negate_bias"
    changes_outputs = True
    options = (Option("scale", float, 1.0, "factor the negated bias is multiplied by", Range(0.0, 2.0)),)
    knob = Knob("scale", (0.25, 0.5, 1.0))

    def call(self, gm):
        for m in gm.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                with torch.no_grad():
                    m.bias.mul_(-self.scale)
        return PassResult(gm, True, {"scale": self.scale})


@pytest.fixture
def toy():
    with registered(NegateBias):
        yield NegateBias
    assert "negate_bias" not in PASSES


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name", ["slim", "mask", "quant", "bnfold"])
def test_declared_options_are_exactly_the_constructor_arguments(name):
    cls = PASSES[name]
    params = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}
    assert params == {o.name: o.default for o in cls.options}


@pytest.mark.parametrize("name", ["slim", "mask", "quant"])
def test_every_ladder_is_valid_and_ordered_least_aggressive_first(name):
    cls = PASSES[name]
    assert check_levels(cls, cls.knob.ladder) == cls.knob.ladder
    assert check_levels(cls, tuple(reversed(cls.knob.ladder))) == cls.knob.ladder


@pytest.mark.parametrize("text,message", [
    ("mask(sparsty=0.5)", r"unknown option 'sparsty' \(did you mean 'sparsity'\?"),
    ("quant(bits='4')", "quant bits must be an int"),
    ("slim(combine=min)", "one of max, sum, mean"), ("mask(sparsity=True)", "mask sparsity must be a float"),
    ("quant(iters=0)", "iters must be an int >= 1"),
])
def test_the_table_checks_options_before_any_work(text, message):
    from pyprune.passes import build_pipeline

    with pytest.raises(ValueError, match=message):
        build_pipeline(text)


def test_levels_are_parsed_as_the_knob_option_type():
    assert parse_levels("quant", "8,4") == (8, 4) and parse_levels("mask", "0.5,1") == (0.5, 1.0)
    with pytest.raises(ValueError, match="int values"):
        parse_levels("quant", "4.5")
    with pytest.raises(ValueError, match="quant levels must be integer bits in 1..16"):
        Stage("quant", (0, 4))
    assert Stage("mask", (0.9, 0.5)).levels == (0.5, 0.9) and Stage("quant", (4, 8)).levels == (8, 4)


def test_a_toy_pass_registered_here_runs_from_a_pipeline(toy):
    assert "negate_bias" in searchable_passes()
    model = load_model(arch="resnet20")
    before = model.module.linear.bias.detach().clone()
    from pyprune.ir import example_input, propagate_shapes, trace

    gm = propagate_shapes(trace(model.module), example_input(model.input_shape))
    create_pass("negate_bias", scale=0.5)(gm)
    assert torch.equal(gm.linear.bias, -0.5 * before)
    with pytest.raises(ValueError, match="negate_bias scale must be a float in"):
        create_pass("negate_bias", scale=3.0)
    with pytest.raises(ValueError, match="unknown option 'ratio'"):
        create_pass("negate_bias", ratio=0.5)


def test_a_toy_pass_is_listed_by_pyprune_passes(capsys, toy):
    code, out, _ = run_cli(capsys, "passes", "--json")
    listed = {p["name"]: p for p in json.loads(out)["passes"]}
    assert code == 0 and list(listed)[:3] == ["slim", "mask", "quant"]
    toy_row = listed["negate_bias"]
    assert toy_row["summary"].startswith("negate every conv/linear bias")
    assert toy_row["options"] == [{"name": "scale", "type": "float", "default": 1.0,
                                   "help": "factor the negated bias is multiplied by", "allowed": "float in [0, 2]",
                                   "choices": None, "range": {"low": 0.0, "high": 2.0, "low_open": False,
                                                              "high_open": False}}]
    assert toy_row["knob"] == {"option": "scale", "ladder": [0.25, 0.5, 1.0], "more_aggressive": "higher",
                               "flag": None}
    assert not toy_row["constrains_training"] and listed["mask"]["constrains_training"]
    assert listed["quant"]["shares_weights"] and listed["quant"]["knob"]["more_aggressive"] == "lower"
    code, table, _ = run_cli(capsys, "passes")
    assert code == 0 and "negate_bias: negate every conv/linear bias" in table
    for name, p in listed.items():
        assert f"{name}: " in table and all(o["name"] in table for o in p["options"])


def test_a_toy_pass_runs_from_opt(capsys, toy, tmp_path):
    out = tmp_path / "negated.pt"
    code, stdout, err = run_cli(capsys, "opt", "--arch", "resnet20", "--passes", "negate_bias(scale=0.5)",
                                "--eval-split", "none", "--no-progress", "-o", out, "--json")
    assert code == 0, err
    steps = json.loads(stdout.strip().splitlines()[-1])["steps"]
    assert [s["name"] for s in steps] == ["input", "negate_bias"] and steps[1]["record"] == {"scale": 0.5}
    original = load_model(arch="resnet20").module.linear.bias.detach()
    assert torch.equal(load_model(str(out)).module.linear.bias, -0.5 * original)


def test_a_toy_pass_is_a_stage_of_a_tiny_compile(capsys, toy, tmp_path, data_root, models_dir):
    weights = models_dir / "resnet20-12fca82f.th"
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "compile", "--arch", "resnet20", "--weights", weights, "--data-root", data_root,
                           "--val-from", "test", "--val-limit", 100, "--screen-limit", 60, "--test-limit", 100,
                           "--train-limit", 64, "--recal-images", 32, "--finetune-epochs", 0, "--onnx-verify", 0,
                           "--order", "negate_bias", "--levels", "negate_bias=0.25,0.5", "--max-drop", 0.9,
                           "--quiet", "-o", out)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["search"]["order"] == ["negate_bias"] and report["settings"]["levels"] == {"negate_bias": [0.25, 0.5]}
    tried = {c["pipeline"] for c in report["candidates"] if c["stage"] == "negate_bias"}
    assert tried and tried <= {"negate_bias(scale=0.25)", "negate_bias(scale=0.5)"}
    assert report["chosen"]["pipeline"] in tried  # the target (a drop of up to 0.9) is met by any setting
    written = load_model(str(out / "model.ppz")).module.linear.bias
    scale = float(report["chosen"]["pipeline"].split("=")[1].rstrip(")"))
    original = load_model(arch="resnet20", weights=str(weights)).module.linear.bias.detach()
    assert torch.allclose(written, -scale * original)


def test_registering_twice_or_a_non_pass_is_refused(toy):
    with pytest.raises(ValueError, match="registered twice"):
        register_pass(NegateBias)
    with pytest.raises(TypeError, match="GraphPass subclass"):
        register_pass(object)


def test_describe_passes_is_json(toy):
    assert json.loads(json.dumps(describe_passes()))[-1]["name"] == "negate_bias"
