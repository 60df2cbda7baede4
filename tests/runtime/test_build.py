"""Runtime models of compressed zoo models: the same outputs and predictions as the
model they were built from, whichever kernels run."""

import pytest
import torch
from torch import fx, nn

from pyprune.api import LoadedModel
from pyprune.data import ArrayDataset
from pyprune.runtime import RuntimeModel, SparseConv2d, SparseLinear, build_runtime
from pyprune.train import evaluate

from .conftest import ARCHS, logits


@pytest.mark.parametrize("runtime", ["dense", "sparse", "auto"])
@pytest.mark.parametrize("arch", ARCHS)
def test_every_runtime_keeps_outputs_and_predictions(arch, runtime, reference):
    model, subset, want = reference(arch)
    rt = build_runtime(model.module, model.input_shape, runtime, repeats=2)
    assert isinstance(rt, RuntimeModel) and rt.plan.runtime == runtime
    got = logits(rt, model, subset)
    assert (got - want).abs().max().item() <= 1e-4
    assert torch.equal(got.argmax(1), want.argmax(1))
    sparse = {name for name, m in rt.graph_module.named_modules() if isinstance(m, (SparseConv2d, SparseLinear))}
    chosen = {p.name for p in rt.plan.layers if p.choice == "sparse"}
    assert sparse == chosen
    if runtime == "dense":
        assert not sparse and rt.plan.source == "forced"
    if runtime == "sparse":
        assert chosen == {p.name for p in rt.plan.layers if not p.reason} and len(chosen) == len(rt.plan.layers)
    if runtime == "auto":
        assert rt.plan.source == "measured"
        assert all(p.dense_ms > 0 and p.sparse_ms > 0 and p.choice == ("sparse" if p.sparse_ms < p.dense_ms
                                                                      else "dense") for p in rt.plan.layers)
    assert all(0.75 <= p.sparsity <= 0.85 for p in rt.plan.layers)  # mask(sparsity=0.8,scope=layer)
    assert all(p.input_shape[0] == 1 for p in rt.plan.layers)
    assert "runtime " + runtime in rt.table()


def test_plan_records_shapes_at_the_requested_batch(compressed_ppz):
    model, _ = compressed_ppz("resnet20")
    rt = build_runtime(model.module, model.input_shape, "auto", batch_size=4, repeats=1)
    first = rt.plan.layers[0]
    assert first.name == "conv1" and first.input_shape == (4, 3, 32, 32) and first.bn_folded and first.relu_fused
    assert rt.plan.layers[-1].kind == "linear" and rt.plan.batch_size == 4


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.depthwise = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.pointwise = nn.Conv2d(4, 6, 1)

    def forward(self, x):
        return self.pointwise(self.depthwise(x))


def test_layers_the_sparse_kernel_cannot_run_stay_dense():
    model = Grouped().eval()
    rt = build_runtime(fx.symbolic_trace(model), (4, 8, 8), "sparse")
    plan = {p.name: p for p in rt.plan.layers}
    assert plan["depthwise"].choice == "dense" and "groups=4" in plan["depthwise"].reason
    assert plan["pointwise"].choice == "sparse" and not plan["pointwise"].reason
    assert isinstance(rt.graph_module.get_submodule("depthwise"), nn.Conv2d)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert torch.allclose(rt(x), model(x), atol=1e-5)


def test_bad_arguments_are_clear_errors():
    gm = fx.symbolic_trace(Grouped())
    with pytest.raises(ValueError, match="runtime must be one of"):
        build_runtime(gm, (4, 8, 8), "fast")
    with pytest.raises(ValueError, match="batch size"):
        build_runtime(gm, (4, 8, 8), "auto", batch_size=0)


def test_runtime_model_is_a_loaded_model_module(compressed_ppz):
    model, _ = compressed_ppz("resnet20")
    rt = build_runtime(model.module, model.input_shape, "dense")
    wrapped = LoadedModel(rt, model.name, model.mean, model.std, model.input_shape)
    assert not any(p.requires_grad for p in wrapped.module.parameters())


def test_runtime_model_stays_in_eval_mode(compressed_ppz, images):
    model, _ = compressed_ppz("densenet40")  # its BatchNorms follow concatenations: they stay, unfolded
    rt = build_runtime(model.module, model.input_shape, "dense")
    assert not rt.training and not rt.graph_module.training
    few = ArrayDataset(images.images[:8], images.labels[:8])
    assert torch.equal(evaluate(rt, few, model.mean, model.std, progress=False).predictions,
                       evaluate(model.module, few, model.mean, model.std, progress=False).predictions)
    assert not rt.graph_module.training
    with pytest.raises(RuntimeError, match="inference only"):
        rt.train()


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return self.conv(self.conv(x))


def test_a_layer_called_twice_is_listed_once_and_stays_dense():
    model = Shared().eval()
    rt = build_runtime(fx.symbolic_trace(model), (3, 8, 8), "sparse")
    assert [(p.name, p.choice, p.reason) for p in rt.plan.layers] == [("conv", "dense", "called at 2 places")]
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(rt(x), model(x), atol=1e-5)
