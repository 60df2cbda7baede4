"""BatchNorm folding and ReLU fusion against the unfused graph."""

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.ao.nn.intrinsic import ConvReLU2d

from pyprune.ir import trace
from pyprune.models import build_model
from pyprune.runtime import prepare_graph
from pyprune.runtime.fusion import fold_batchnorm, fuse_relu

from .conftest import randomize_batchnorm


def test_resnet20_folds_every_batchnorm_and_fuses_the_inner_relus():
    model = build_model("resnet20").eval()
    randomize_batchnorm(model)
    gm = trace(model)
    graph, bn_layers, relu_layers = prepare_graph(gm)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(graph(x), model(x), atol=1e-4)
    modules = dict(graph.named_modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in modules.values())
    assert len(bn_layers) == 19 and "layer1.0.conv2" in bn_layers
    # conv1 and every block's conv1 take a ReLU; conv2 feeds the residual add, so it cannot.
    assert sorted(relu_layers) == sorted(["conv1"] + [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)])
    assert isinstance(modules["layer2.1.conv1"], ConvReLU2d) and type(modules["layer2.1.conv2"]) is nn.Conv2d
    assert any(isinstance(m, nn.BatchNorm2d) for m in gm.modules()), "the input graph is left alone"


class Branchy(nn.Module):
    """A conv whose output also feeds an add (no fusion), a functional ReLU (fusion),
    and a BatchNorm after a conv that has a second user (no folding)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        a = self.a(x)
        y = torch.relu(a) + a
        b = F.relu(self.b(y))
        c = self.c(b)
        return self.bn(c) + c


def test_fusion_only_where_the_layer_output_has_one_user():
    model = Branchy().eval()
    randomize_batchnorm(model)
    folded, bn_layers = fold_batchnorm(fx.symbolic_trace(model))
    relu_layers = fuse_relu(folded)
    assert bn_layers == [] and relu_layers == ["b"]
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-6)
    assert sum(n.target is F.relu for n in folded.graph.nodes) == 0
    assert sum(n.target is torch.relu for n in folded.graph.nodes) == 1
