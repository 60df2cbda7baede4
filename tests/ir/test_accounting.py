import math

import pytest
import torch
from torch import nn

from pyprune.ir import example_input, layer_stats, propagate_shapes, totals, trace
from pyprune.models import available_models, build_model, get_spec

# Published parameter counts (He et al. 2016; Liu et al. 2017, network slimming).
KNOWN_PARAMS = [("resnet20", 0.27e6, 0.01), ("resnet56", 0.85e6, 0.01),
                ("vgg19", 20.04e6, 0.01), ("densenet40", 1.02e6, 0.03)]


def stats_of(arch):
    model = build_model(arch)
    gm = propagate_shapes(trace(model), example_input(get_spec(arch).input_shape))
    return model, layer_stats(gm)


@pytest.mark.parametrize("arch,params,tolerance", KNOWN_PARAMS)
def test_known_parameter_counts(arch, params, tolerance):
    _, rows = stats_of(arch)
    assert totals(rows).params == pytest.approx(params, rel=tolerance)


def hooked_macs(model, x):
    """MACs from forward hooks on the eager model: an independent path from the graph."""
    total = 0

    def hook(m, inputs, out):
        nonlocal total
        if isinstance(m, nn.Conv2d):
            total += out.numel() * m.in_channels // m.groups * math.prod(m.kernel_size)
        elif isinstance(m, nn.Linear):
            total += out.numel() * m.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    return total


@pytest.mark.parametrize("arch", available_models())
def test_totals_match_the_module_and_hooks(arch):
    model, rows = stats_of(arch)
    t = totals(rows)
    assert t.params == sum(p.numel() for p in model.parameters())
    assert t.bytes == sum(v.numel() * v.element_size() for v in model.state_dict().values())
    assert t.macs == hooked_macs(model, example_input(get_spec(arch).input_shape))


def test_resnet20_macs_match_the_literature():
    # 40.55M multiply-accumulates per 32x32 image for conv and linear layers.
    _, rows = stats_of("resnet20")
    assert totals(rows).macs == pytest.approx(40.55e6, rel=0.01)


def test_shared_module_params_counted_once_and_hand_counted_layers():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1, groups=2, bias=True)
            self.fc = nn.Linear(4 * 8 * 8, 5)

        def forward(self, x):
            return self.fc(torch.flatten(self.conv(self.conv(x)), 1))

    gm = propagate_shapes(trace(Twice()), torch.randn(3, 4, 8, 8))
    rows = {(r.name, r.op): r for r in layer_stats(gm)}
    conv_rows = [r for (name, _), r in rows.items() if name == "conv"]
    # Two calls of the same module name collapse in the dict; look at the list instead.
    conv_rows = [r for r in layer_stats(gm) if r.name == "conv"]
    assert [r.params for r in conv_rows] == [4 * 2 * 9 + 4, 0]
    assert [r.macs for r in conv_rows] == [4 * 8 * 8 * 2 * 9] * 2  # per sample, groups=2
    fc = rows[("fc", "Linear")]
    assert (fc.params, fc.macs, fc.output_shape) == (256 * 5 + 5, 256 * 5, (3, 5))
    assert fc.bytes == (256 * 5 + 5) * 4
