"""The lanes layout in the runtime (pyprune/runtime/lanes.py): where conversions go, and
runtime models with lanes layers computing what the model they were built from computes."""

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from pyprune import _native
from pyprune.runtime import build_runtime
from pyprune.runtime.lanes import FromLanes, LanesSparseConv2d, ToLanes, lanes_for

from .conftest import ARCHS, logits

C = _native.cpu()


class ResidualBlock(nn.Module):
    """conv-relu-conv plus the input, ReLU, then a classifier head that needs NCHW."""

    def __init__(self, scalar_after: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)
        self.scalar_after = scalar_after

    def forward(self, x):
        y = F.relu(self.conv2(F.relu(self.conv1(x))) + x)
        if self.scalar_after:
            y = y + 1.0  # not zero where y is: must leave the lanes layout first
        return self.head(F.adaptive_avg_pool2d(y, 1).flatten(1))


def sparse_block(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    block = ResidualBlock(**kwargs).eval()
    with torch.no_grad():
        for conv in (block.conv1, block.conv2):
            conv.weight[torch.rand_like(conv.weight) < 0.6] = 0
    return block


def module_kinds(gm: fx.GraphModule) -> list[str]:
    """The graph's nodes in order, as the kind of what each computes."""
    kinds = []
    for n in gm.graph.nodes:
        if n.op == "call_module":
            kinds.append(type(gm.get_submodule(n.target)).__name__)
        elif n.op in ("call_function", "call_method"):
            kinds.append(getattr(n.target, "__name__", str(n.target)))
        else:
            kinds.append(n.op)
    return kinds


def test_a_residual_block_is_converted_once_in_and_once_out_and_its_add_fused():
    rt = build_runtime(fx.symbolic_trace(sparse_block()), (4, 6, 6), "sparse", batch_size=8)
    # before: conv1(+relu), conv2, add, relu, pool, flatten, linear; the add and the ReLU
    # after it go into conv2, which takes the block's input as its residual
    expected = ["placeholder", "ToLanes", "LanesSparseConv2d", "LanesSparseConv2d", "FromLanes",
                "adaptive_avg_pool2d", "flatten", "SparseLinear", "output"]
    assert module_kinds(rt.graph_module) == expected
    assert rt.plan.lanes_conversions == 2 and rt.plan.fused_adds == 1 and rt.plan.lanes == lanes_for(8)
    # the input's one ToLanes feeds both the first convolution and, as residual, the second
    (to_lanes,) = [n for n in rt.graph_module.graph.nodes if n.op == "call_module" and n.target.endswith("to_lanes")]
    conv1, conv2 = [n for n in rt.graph_module.graph.nodes if n.op == "call_module" and
                    isinstance(rt.graph_module.get_submodule(n.target), LanesSparseConv2d)]
    assert conv1.args == (to_lanes,) and conv2.args == (conv1, to_lanes)
    assert rt.graph_module.get_submodule(conv2.target).relu_after_residual


def test_an_operation_that_breaks_the_zero_border_reads_nchw():
    rt = build_runtime(fx.symbolic_trace(sparse_block(scalar_after=True)), (4, 6, 6), "sparse", batch_size=8)
    kinds = module_kinds(rt.graph_module)
    assert kinds[kinds.index("FromLanes") + 1] == "add"  # the scalar add reads NCHW


@pytest.mark.parametrize("scalar_after", [False, True])
@pytest.mark.parametrize("batch", [1, 8, 13, 40])
def test_lanes_runtime_computes_the_model_at_any_batch(scalar_after, batch):
    block = sparse_block(scalar_after=scalar_after)
    rt = build_runtime(fx.symbolic_trace(block), (4, 6, 6), "sparse", batch_size=16)
    assert any(isinstance(m, LanesSparseConv2d) for m in rt.modules())
    x = torch.randn(batch, 4, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(rt(x), block(x), rtol=1e-5, atol=1e-5)


def test_below_the_batched_kernels_batch_nothing_is_in_lanes():
    rt = build_runtime(fx.symbolic_trace(sparse_block()), (4, 6, 6), "sparse", batch_size=C.sparse_batched_from - 1)
    assert rt.plan.lanes is None and rt.plan.lanes_conversions == 0
    assert not any(isinstance(m, (LanesSparseConv2d, ToLanes, FromLanes)) for m in rt.modules())


@pytest.mark.parametrize("runtime", ["sparse", "auto"])
@pytest.mark.parametrize("arch", ARCHS)
def test_lanes_runtimes_keep_outputs_and_predictions(arch, runtime, reference):
    model, subset, want = reference(arch)
    rt = build_runtime(model.module, model.input_shape, runtime, batch_size=16, repeats=1)
    got = logits(rt, model, subset)  # batches of 256 and a remainder, not 16: any batch runs
    assert (got - want).abs().max().item() <= 1e-4
    assert torch.equal(got.argmax(1), want.argmax(1))
    in_lanes = {name for name, m in rt.graph_module.named_modules() if isinstance(m, LanesSparseConv2d)}
    assert in_lanes == {p.name for p in rt.plan.layers if p.choice == "lanes"}
    if runtime == "sparse":
        convs = {p.name for p in rt.plan.layers if p.kind == "conv" and not p.reason}
        assert in_lanes == convs and convs
    else:  # the decision rule, from the plan's own timings
        for p in rt.plan.layers:
            if p.lanes_ms is not None:
                assert (p.choice == "lanes") == (p.lanes_ms < min(p.dense_ms, p.sparse_ms) + p.convert_ms)
    assert 0 < rt.plan.lanes_conversions or not in_lanes
    assert "lanes ms" in rt.table()

