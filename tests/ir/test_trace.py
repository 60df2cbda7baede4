import pytest
import torch
from torch import nn

from pyprune.ir import TraceError, example_input, output_shape, propagate_shapes, trace
from pyprune.models import available_models, build_model, get_spec


@pytest.mark.parametrize("arch", available_models())
def test_every_zoo_model_traces_and_propagates_shapes(arch):
    torch.manual_seed(0)
    model = build_model(arch).eval()
    spec = get_spec(arch)
    x = example_input(spec.input_shape, batch=2)
    gm = propagate_shapes(trace(model), x)
    for node in gm.graph.nodes:
        if node.op in ("call_module", "call_function", "call_method"):
            assert output_shape(node) is not None, f"{arch}: no shape on {node.name}"
    (out,) = [n for n in gm.graph.nodes if n.op == "output"]
    assert output_shape(out.args[0]) == (2, 10)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # a Python branch on a tensor value: untraceable
            return x * 2
        return x


class Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.block = nn.Sequential(nn.ReLU(), DataDependent())

    def forward(self, x):
        return self.block(self.conv(x))


def test_trace_failure_names_module_line_and_ways_out():
    with pytest.raises(TraceError) as info:
        trace(Wrapper())
    err = info.value
    assert err.module_path == "block.1" and err.module_type == "DataDependent"
    message = str(err)
    assert "'block.1' (DataDependent)" in message
    assert "if x.sum() > 0" in message  # the failing line of user code
    assert "leaf module" in message and "rewrite" in message
    assert "--leaf-module DataDependent" in message  # a flag that exists


def test_leaf_module_is_the_way_out():
    model = Wrapper().eval()
    gm = trace(model, leaf_modules=[DataDependent])
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert targets == ["conv", "block.0", "block.1"]
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(gm(x), model(x))


def test_a_traced_model_survives_pickling(tmp_path):
    """torch.save of a whole traced model (what a user may do with any nn.Module) loads
    back and computes the same; unpickling re-creates the tracer with no arguments."""
    model = Wrapper().eval()
    gm = trace(model, leaf_modules=[DataDependent])
    torch.save(gm, tmp_path / "gm.pt")
    back = torch.load(tmp_path / "gm.pt", weights_only=False)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(back(x), gm(x), rtol=0, atol=0)
    assert [n.target for n in back.graph.nodes if n.op == "call_module"] == ["conv", "block.0", "block.1"]


def test_shape_propagation_keeps_training_mode_and_bn_stats():
    model = build_model("resnet20")
    gm = trace(model).train()
    before = gm.bn1.running_mean.clone()
    propagate_shapes(gm, torch.randn(4, 3, 32, 32) * 5)
    assert gm.training and torch.equal(gm.bn1.running_mean, before)


class GatedConv(nn.Module):
    """A conv whose output goes through data-dependent Python control flow."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y if y.mean() > -1e9 else -y


class LeafNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.gated = GatedConv()
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        x = self.gated(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


@pytest.mark.parametrize("name", ["GatedConv", "gated", f"{__name__}:GatedConv"])
def test_leaf_modules_by_class_name_path_or_qualified_class(name):
    model = LeafNet().eval()
    gm = trace(model, leaf_modules=[name])
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["conv1", "bn1", "gated", "fc"]
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(gm(x), model(x))


def test_a_leaf_module_name_that_matches_nothing_is_refused():
    with pytest.raises(ValueError, match="'Gated' names no submodule of LeafNet.*GatedConv"):
        trace(LeafNet(), leaf_modules=["Gated"])
