"""Residual adds fused into the sparse convolution before them (pyprune/runtime/residual.py),
in both layouts: NCHW below 8 images, lanes from 8."""

import pytest
import torch
from torch import fx, nn

from pyprune.runtime import build_runtime

from .test_lanes import module_kinds, sparse_block


class BroadcastBlock(nn.Module):
    """conv + a per-channel tensor: an add, but not of two same-shaped activations."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.shift = nn.Parameter(torch.randn(4, 1, 1))

    def forward(self, x):
        return torch.relu(self.conv(x) + self.shift)


@pytest.mark.parametrize("batch, conv_kind, expected", [
    (1, "SparseConv2d", ["placeholder", "SparseConv2d", "SparseConv2d", "adaptive_avg_pool2d", "flatten",
                         "SparseLinear", "output"]),
    (8, "LanesSparseConv2d", ["placeholder", "ToLanes", "LanesSparseConv2d", "LanesSparseConv2d", "FromLanes",
                              "adaptive_avg_pool2d", "flatten", "SparseLinear", "output"]),
])
def test_the_block_add_and_its_relu_go_into_the_second_convolution(batch, conv_kind, expected):
    block = sparse_block()
    rt = build_runtime(fx.symbolic_trace(block), (4, 6, 6), "sparse", batch_size=batch)
    assert module_kinds(rt.graph_module) == expected and rt.plan.fused_adds == 1
    (_, conv2) = [n for n in rt.graph_module.graph.nodes if n.op == "call_module" and
                  type(rt.graph_module.get_submodule(n.target)).__name__ == conv_kind]
    assert len(conv2.args) == 2 and rt.graph_module.get_submodule(conv2.target).relu_after_residual
    for n in (1, 5, 17):
        x = torch.randn(n, 4, 6, 6)
        with torch.no_grad():
            torch.testing.assert_close(rt(x), block(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 8])
def test_a_broadcast_add_is_not_a_residual(batch):
    torch.manual_seed(0)
    block = BroadcastBlock().eval()
    rt = build_runtime(fx.symbolic_trace(block), (4, 6, 6), "sparse", batch_size=batch)
    assert rt.plan.fused_adds == 0 and "add" in module_kinds(rt.graph_module)
    x = torch.randn(3, 4, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(rt(x), block(x), rtol=1e-5, atol=1e-5)
