"""The runtime graph lowered to one native program (pyprune/runtime/program.py): the
same outputs as the torch.fx graph it came from, a clear fall-back where a node has no
lowering, and clear errors from the program's builder."""

import copy

import pytest
import torch
from torch import fx, nn

from pyprune import _native
from pyprune.runtime import build_runtime
from pyprune.runtime.lanes import lanes_for
from pyprune.runtime.program import lower

from .conftest import ARCHS

native = pytest.importorskip("pyprune._C")
needs_program = pytest.mark.skipif(not hasattr(native, "Program"), reason="the native extension has no Program")


@needs_program
@pytest.mark.parametrize("runtime", ["dense", "sparse"])
@pytest.mark.parametrize("arch", ARCHS)
def test_the_program_computes_what_the_graph_computes(arch, runtime, compressed_ppz):
    model, _ = compressed_ppz(arch)
    rt = build_runtime(model.module, model.input_shape, runtime, batch_size=2)
    assert rt.plan.executor == "program" and rt.program is not None
    assert "run as program" in rt.table()
    x = torch.randn(2, *model.input_shape, generator=torch.Generator().manual_seed(0))
    before = x.clone()
    with torch.inference_mode():
        via_program, via_graph = rt(x), rt.graph_module(x)
    # The same kernels and ATen operators in the same order: equal up to the fused
    # multiply-add a vectorised addcmul may use for a folded BatchNorm.
    assert via_program.shape == via_graph.shape
    assert (via_program - via_graph).abs().max().item() <= 1e-5
    assert torch.equal(x, before)  # in-place steps touch only the program's own values


@needs_program
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_lowers_the_graph_again(compressed_ppz, tmp_path, how):
    model, _ = compressed_ppz("resnet20")
    rt = build_runtime(model.module, model.input_shape, "sparse")
    if how == "deepcopy":
        other = copy.deepcopy(rt)
    else:  # a whole model through torch.save, as users do with any nn.Module
        torch.save(rt, tmp_path / "rt.pt")
        other = torch.load(tmp_path / "rt.pt", weights_only=False)
    assert other.program is not None and other.program is not rt.program
    x = torch.randn(1, *model.input_shape)
    with torch.inference_mode():
        assert torch.equal(other(x), rt(x))


class InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        a = self.conv(x)
        b = a + a  # read before the ReLU changes a in place
        r = self.relu(a)
        c = a + b  # read after: eager mode sees the ReLU's result here
        c += r
        return c


@needs_program
@pytest.mark.parametrize("runtime", ["dense", "sparse"])
def test_in_place_operations_keep_their_effect_on_later_readers(runtime):
    model = InPlace().eval()
    rt = build_runtime(fx.symbolic_trace(model), (3, 8, 8), runtime)
    assert rt.program is not None
    x = torch.randn(2, 3, 8, 8)
    with torch.inference_mode():
        want = model(x)
        assert torch.allclose(rt(x), want, atol=1e-5)
        assert not torch.allclose(want, model.conv(x) * 3 + model.conv(x).relu())  # the in-place effect shows


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return torch.sigmoid(self.conv(x)).flatten(1)


@needs_program
def test_a_node_without_a_lowering_leaves_the_model_on_the_graph_and_says_which():
    model = Gated().eval()
    rt = build_runtime(fx.symbolic_trace(model), (3, 8, 8), "sparse")
    assert rt.program is None
    assert rt.plan.executor.startswith("fx (") and "sigmoid" in rt.plan.executor
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(rt(x), model(x), atol=1e-5)


@needs_program
def test_lanes_layers_stay_on_the_graph(compressed_ppz):
    batch = 8
    if lanes_for(batch) is None:
        pytest.skip("no lanes layout on this build")
    model, _ = compressed_ppz("resnet20")
    rt = build_runtime(model.module, model.input_shape, "sparse", batch_size=batch)
    assert rt.program is None and "ToLanes" in rt.plan.executor


@needs_program
def test_the_program_can_be_turned_off(compressed_ppz):
    model, _ = compressed_ppz("resnet20")
    rt = build_runtime(model.module, model.input_shape, "sparse", program=False)
    assert rt.program is None and rt.plan.executor == "fx (not asked for)"


@needs_program
def test_lower_without_the_native_extension_says_so(monkeypatch, compressed_ppz):
    model, _ = compressed_ppz("resnet20")
    rt = build_runtime(model.module, model.input_shape, "dense", program=False)

    def missing():
        raise ImportError("no _C here")

    monkeypatch.setattr(_native, "cpu", missing)
    assert lower(rt.graph_module) == (None, "no native extension (no _C here)")


@needs_program
def test_the_builder_refuses_what_it_cannot_run():
    program = native.Program(3, 0)
    with pytest.raises(ValueError, match="no operator aten::no_such_op"):
        program.add_op("aten::no_such_op", "", [], 1, [])
    with pytest.raises(ValueError, match="slot 7 outside"):
        program.add_op("aten::relu", "", [("slot", 7)], 1, [])
    with pytest.raises(ValueError, match="takes 1 arguments, got 2"):
        program.add_op("aten::relu", "", [("slot", 0), ("slot", 0)], 1, [])
    with pytest.raises(ValueError, match="needs its argument self"):
        program.add_op("aten::relu", "", [], 1, [])
    with pytest.raises(ValueError, match="unsupported constant"):
        program.add_op("aten::add", "Tensor", [("slot", 0), ("const", object())], 1, [])
    with pytest.raises(ValueError, match="no output set"):
        program.run(torch.zeros(1))


@needs_program
def test_a_hand_built_program_matches_torch():
    """Constants of the kinds the builder takes, a list of slots, and defaults filled in
    (sum's dtype), against the same computation in torch."""
    program = native.Program(5, 0)
    program.add_op("aten::mul", "Scalar", [("slot", 0), ("const", 2.0)], 1, [])
    program.add_op("aten::constant_pad_nd", "", [("slot", 1), ("const", [1, 0]), ("const", -1.0)], 2, [])
    program.add_op("aten::cat", "", [("slots", [1, 0]), ("const", 1)], 3, [1])
    program.add_op("aten::sum", "dim_IntList", [("slot", 3), ("const", [1]), ("const", True)], 4, [3])
    program.set_output(4)
    x = torch.arange(6.0).reshape(2, 3)
    want = torch.cat([x * 2, x], 1).sum(1, keepdim=True)
    assert torch.equal(program.run(x), want)
    assert len(program) == 4
