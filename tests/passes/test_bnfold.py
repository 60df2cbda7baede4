"""bnfold: BatchNorm as inference uses it. Before/expected graphs compared by their
ops, outputs against the unfolded model, codebooks kept intact, float16 vectors, and
the folded model through the container, the runtime, ONNX and the training engine."""

import copy

import pytest
import torch
from torch import nn

from pyprune.api import LoadedModel, save_model
from pyprune.data import ArrayDataset
from pyprune.encode import load_ppz, ppz_bytes
from pyprune.encode.ppz import inspect
from pyprune.export import export_onnx, verify_onnx
from pyprune.ir import ChannelAffine, PassManager, example_input, propagate_shapes, trace
from pyprune.models import build_model
from pyprune.passes import build_pipeline, codebooks_of, create_pass
from pyprune.passes.bnfold import looks_shared
from pyprune.runtime import load_runtime
from pyprune.train import TrainConfig, fine_tune


class Net(nn.Module):
    """conv-bn-relu (foldable), a quantizable conv-bn, an add, and a BN after the add."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.bn3 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(x))
        x = self.bn3(x + y)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=g) * 2 - 0.5  # some negative gammas
            m.bias.data = torch.randn(n, generator=g)
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model.eval()


def traced(model, shape=(3, 8, 8)):
    return propagate_shapes(trace(model), example_input(shape))


def ops_of(gm):
    """The graph as (op, what) pairs: module types for call_module, names otherwise."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_module":
            out.append(("module", type(gm.get_submodule(n.target)).__name__))
        elif n.op in ("call_function", "call_method"):
            out.append((n.op, getattr(n.target, "__name__", str(n.target))))
    return out


def test_before_and_expected():
    torch.manual_seed(0)
    before = traced(randomize_bn(Net()))
    gm = copy.deepcopy(before)
    create_pass("mask", sparsity=0.5, layers={"conv2": 0.5}, include="conv")(gm)
    create_pass("quant", bits=3, layers={"conv1": 0, "fc": 0})(gm)  # conv2 shares 8 values, conv1 is plain
    x = torch.randn(4, 3, 8, 8)
    want = gm(x)
    codebook = torch.unique(gm.conv2.weight[gm.conv2.weight != 0])
    result = create_pass("bnfold")(gm)
    after = result.graph_module
    assert ops_of(before) == [("module", "Conv2d"), ("module", "BatchNorm2d"), ("call_function", "relu"),
                              ("module", "Conv2d"), ("module", "BatchNorm2d"), ("call_function", "add"),
                              ("module", "BatchNorm2d"), ("call_function", "adaptive_avg_pool2d"),
                              ("call_function", "flatten"), ("module", "Linear")]
    expected = [("module", "Conv2d"), ("call_function", "relu"),  # bn1 folded into conv1
                ("module", "Conv2d"), ("module", "ChannelAffine"),  # conv2 keeps its codebook
                ("call_function", "add"), ("module", "ChannelAffine"),  # bn3 reads an add
                ("call_function", "adaptive_avg_pool2d"), ("call_function", "flatten"), ("module", "Linear")]
    assert ops_of(after) == expected
    assert result.record["folded"] == {"bn1": "conv1"} and result.record["affine"] == ["bn2", "bn3"]
    torch.testing.assert_close(after(x), want, atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.unique(after.conv2.weight[after.conv2.weight != 0]), codebook)
    assert after.conv1.bias is not None and not any(isinstance(m, nn.BatchNorm2d) for m in after.modules())


def test_pruned_weights_stay_plus_zero_under_a_negative_scale():
    torch.manual_seed(1)
    gm = traced(randomize_bn(Net()))
    gm.bn1.weight.data[:] = -1.0  # every scale negative: 0.0 * s would be -0.0
    create_pass("mask", sparsity=0.6, layers={"conv1": 0.6})(gm)
    zeros = gm.conv1.weight == 0
    gm = create_pass("bnfold")(gm).graph_module
    w = gm.conv1.weight.detach()
    assert torch.equal(w == 0, zeros)
    assert not torch.signbit(w[zeros]).any()  # +0.0: the container stores them as zeros, not values


def test_float16_vectors_and_their_bytes():
    torch.manual_seed(2)
    gm = traced(randomize_bn(Net()))
    x = torch.randn(4, 3, 8, 8)
    want = gm(x)
    half = create_pass("bnfold", float16=True, shared=["conv1", "conv2"])(copy.deepcopy(gm)).graph_module
    full = create_pass("bnfold", shared=["conv1", "conv2"])(copy.deepcopy(gm)).graph_module
    assert half.bn1.scale.dtype == torch.float16 and full.bn1.scale.dtype == torch.float32
    torch.testing.assert_close(half(x), want, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(full(x), want, atol=1e-5, rtol=1e-5)
    rows = {r["name"]: r for r in inspect_bytes_of(half)}
    assert rows["bn1.scale"]["dtype"] == "float16" and rows["bn1.scale"]["dense_bytes"] == 2 * 8


def inspect_bytes_of(gm):
    from pyprune.encode.ppz import inspect_bytes

    return inspect_bytes(ppz_bytes(gm))["tensors"]


def test_batchnorm_without_running_statistics_is_kept():
    model = Net()
    model.bn3 = nn.BatchNorm2d(8, track_running_stats=False)
    gm = traced(model.eval())
    record = create_pass("bnfold")(gm).record
    assert "bn3" in record["kept"] and "running statistics" in record["kept"]["bn3"]
    assert isinstance(gm.bn3, nn.BatchNorm2d) and "bn1" in record["folded"]


def test_shared_layers_are_detected_from_repeated_values():
    w = torch.randn(64, 32)
    assert not looks_shared(w)
    q = torch.tensor([0.5, -0.25, 1.0, 0.0])[torch.randint(0, 4, (64, 32))]
    assert looks_shared(q)


@pytest.mark.parametrize("arch", ["resnet20", "vgg11", "densenet40", "resnet164"])
def test_zoo_models_lose_every_batchnorm_and_keep_their_outputs(arch):
    torch.manual_seed(0)
    gm = traced(randomize_bn(build_model(arch), seed=3), (3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    want = gm(x)
    result = PassManager([create_pass("bnfold")], (example_input((3, 32, 32)),), check_numerics=True,
                         atol=1e-3).run(gm)
    after = result.graph_module
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in after.modules())
    torch.testing.assert_close(after(x), want, atol=1e-4, rtol=1e-4)
    assert result.stats[1].params <= result.stats[0].params


@pytest.fixture(scope="module")
def folded_file(tmp_path_factory):
    """A masked and quantized ResNet-20 (random weights, random BatchNorm), folded, packed."""
    torch.manual_seed(0)
    model = LoadedModel(randomize_bn(build_model("resnet20")), "resnet20")
    gm = traced(model.module, model.input_shape)
    passes = build_pipeline("mask(sparsity=0.7),quant(bits=4)")
    gm = PassManager(passes, (example_input(model.input_shape),)).run(gm).graph_module.eval()
    x = torch.randn(4, 3, 32, 32)
    want = gm(x)
    unfolded = len(ppz_bytes(gm, model.meta(), codebooks_of(passes, gm)))
    gm = create_pass("bnfold")(gm).graph_module
    path = save_model(model, tmp_path_factory.mktemp("bnfold") / "folded.ppz", gm=gm,
                      codebooks=codebooks_of(passes, gm))
    return path, x, want, unfolded


def test_a_folded_file_loads_evaluates_and_is_smaller(folded_file):
    path, x, want, unfolded = folded_file
    gm, _ = load_ppz(path)
    assert sum(isinstance(m, ChannelAffine) for m in gm.modules()) == 19
    torch.testing.assert_close(gm(x), want, atol=1e-4, rtol=1e-4)
    total = inspect(path)["total"]
    assert total["file_bytes"] < unfolded and total["parts"]["vectors"] < 0.6 * 19 * 4 * 4 * 64


def test_the_runtime_folds_channel_affine_into_the_layers(folded_file):
    path, x, want, _ = folded_file
    for runtime in ("dense", "sparse"):
        model = load_runtime(path, runtime=runtime, batch_size=4, use_cache=False)
        graph = model.module.graph_module
        assert not any(isinstance(m, ChannelAffine) for m in graph.modules())  # all follow a conv
        torch.testing.assert_close(model.module(x), want, atol=1e-4, rtol=1e-4)


def test_a_folded_file_exports_to_onnx_and_verifies(folded_file):
    path, x, _, _ = folded_file
    gm, meta = load_ppz(path)
    for form in ("dense", "compact"):
        exported = export_onnx(gm, meta["input_shape"], form)
        assert verify_onnx(exported.serialized(), gm, x).passed, form


def test_fine_tuning_a_folded_model_refuses(folded_file):
    path, _, _, _ = folded_file
    gm, _ = load_ppz(path)
    data = ArrayDataset(torch.zeros(8, 3, 32, 32, dtype=torch.uint8), torch.zeros(8, dtype=torch.long), "zeros")
    with pytest.raises(ValueError, match="folded for inference.*--keep-batchnorm"):
        fine_tune(gm, data, (0.5,) * 3, (0.25,) * 3, TrainConfig(epochs=1, batch_size=4, progress=False))
