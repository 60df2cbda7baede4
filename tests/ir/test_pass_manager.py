import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from pyprune.ir import PassCheckError, PassManager, PassResult, layer_stats, output_shape, totals, trace

from .graph_utils import assert_graph_equal


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=True)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.relu(self.conv(x))), 1))


class SmallFunctional(Small):
    def forward(self, x):
        return self.fc(torch.flatten(self.pool(F.relu(self.conv(x))), 1))


def relu_module_to_function(gm: fx.GraphModule) -> PassResult:
    """Replace ``nn.ReLU`` calls by ``F.relu``: output-preserving."""
    replaced = []
    for node in list(gm.graph.nodes):
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(module, nn.ReLU):
            with gm.graph.inserting_after(node):
                new = gm.graph.call_function(F.relu, node.args, {"inplace": module.inplace})
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            replaced.append(node.target)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    return PassResult(gm, bool(replaced), {"replaced": replaced})


def drop_conv_bias(gm: fx.GraphModule) -> PassResult:
    """Remove the conv bias: changes outputs and parameter count."""
    gm.conv.bias = None
    return PassResult(gm, True, {"removed": 8})


drop_conv_bias.changes_outputs = True


def example():
    return (torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)),)


def test_before_expected_structural():
    torch.manual_seed(0)
    before = trace(Small())
    expected = trace(SmallFunctional())
    result = PassManager([relu_module_to_function], example()).run(before)
    assert_graph_equal(result.graph_module, expected)
    assert result.stats[1].record == {"replaced": ["relu"]}


def test_passes_run_in_order_and_stats_are_recorded():
    order = []

    def make(name):
        def p(gm):
            order.append(name)
            return gm
        p.__name__ = name
        return p

    gm = trace(Small())
    result = PassManager([make("a"), relu_module_to_function, make("b"), drop_conv_bias], example(),
                         check_numerics=True).run(gm)
    assert order == ["a", "b"]
    assert [s.name for s in result.stats] == ["input", "a", "relu_module_to_function", "b", "drop_conv_bias"]
    params = [s.params for s in result.stats]
    assert params == [3 * 8 * 9 + 8 + 8 * 4 + 4] * 4 + [3 * 8 * 9 + 8 * 4 + 4]
    assert result.stats[2].max_abs_diff == 0.0
    assert result.stats[4].max_abs_diff is None  # exempt: changes outputs on purpose
    assert result.stats[-1].macs == totals(layer_stats(result.graph_module)).macs


def test_numeric_check_names_the_pass():
    def silently_scales(gm):
        with torch.no_grad():
            gm.fc.weight.mul_(1.5)
        return gm

    with pytest.raises(PassCheckError, match="after pass 'silently_scales': outputs changed") as info:
        PassManager([silently_scales], example(), check_numerics=True).run(trace(Small()))
    assert info.value.pass_name == "silently_scales"
    # Without the check, the same pipeline runs.
    PassManager([silently_scales], example()).run(trace(Small()))


def test_lint_catches_a_broken_graph():
    def dangling(gm):
        # Use a node before it is defined: a malformed graph that lint must reject.
        output = next(n for n in gm.graph.nodes if n.op == "output")
        first = next(n for n in gm.graph.nodes if n.op == "call_module")
        with gm.graph.inserting_before(first):
            gm.graph.call_function(operator.add, (output.args[0], 1))
        return gm

    with pytest.raises(PassCheckError, match="after pass 'dangling': the graph is invalid"):
        PassManager([dangling], example()).run(trace(Small()))


def test_shapes_are_propagated_again_after_each_pass():
    def widen_pool(gm):
        gm.pool = nn.AdaptiveAvgPool2d(2)
        gm.fc = nn.Linear(32, 4)
        return gm

    result = PassManager([widen_pool], example()).run(trace(Small()))
    pool = next(n for n in result.graph_module.graph.nodes if n.target == "pool")
    assert output_shape(pool) == (2, 8, 2, 2)


def test_a_pass_must_return_a_graph():
    with pytest.raises(PassCheckError, match="returned NoneType"):
        PassManager([lambda gm: None], example()).run(trace(Small()))


def test_after_pass_runs_between_passes_and_resets_the_reference():
    seen = []

    def nudge(name, gm):  # stands in for fine-tuning: changes the weights
        seen.append(name)
        with torch.no_grad():
            gm.fc.bias.add_(1.0)

    result = PassManager([relu_module_to_function, lambda gm: gm], example(), check_numerics=True,
                         after_pass=nudge).run(trace(Small()))
    assert seen == ["relu_module_to_function", "<lambda>"]
    assert [s.max_abs_diff for s in result.stats[1:]] == [0.0, 0.0]
