"""Before/expected tests of the channel dependency analysis on small hand-built graphs:
each asserts the exact group (node -> channels) that a channel belongs to."""

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyprune.analysis import analyze_channels
from pyprune.ir import propagate_shapes, trace


def analyze(model, shape=(1, 3, 8, 8)):
    gm = propagate_shapes(trace(model.eval()), torch.randn(shape))
    return analyze_channels(gm)


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.relu = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(4, 5, 3, padding=1), nn.BatchNorm2d(5)

    def forward(self, x):
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))


def test_conv_bn_relu_conv_chain():
    a = analyze(Chain())
    g = a.group_of("bn1", 2)
    assert g.members() == {"conv1": [2], "bn1": [2], "relu": [2]}
    assert g.bn_channels == [("bn1", 2)] and g.prunable
    out = a.group_of("bn2", 0)
    assert out.members() == {"conv2": [0], "bn2": [0]}
    assert not out.prunable and out.reason == "graph output"
    assert not a.group_of("x", 0).prunable and a.group_of("x", 0).reason == "graph input"


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_a, self.bn_a = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.conv_b, self.bn_b = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.relu, self.head = nn.ReLU(), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.relu(self.bn_a(self.conv_a(x)) + self.bn_b(self.conv_b(x))))


def test_residual_add_ties_every_operand():
    g = analyze(Residual()).group_of("add", 1)
    assert g.members() == {"conv_a": [1], "bn_a": [1], "conv_b": [1], "bn_b": [1], "add": [1], "relu": [1]}
    assert sorted(g.bn_channels) == [("bn_a", 1), ("bn_b", 1)] and g.prunable


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_a, self.bn_a = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.conv_b, self.bn_b = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)
        self.bn_c, self.relu, self.head = nn.BatchNorm2d(7), nn.ReLU(), nn.Conv2d(7, 2, 1)

    def forward(self, x):
        y = torch.cat([self.bn_a(self.conv_a(x)), self.bn_b(self.conv_b(x))], 1)
        return self.head(self.relu(self.bn_c(y)))


def test_cat_maps_each_source_to_its_offset():
    a = analyze(Concat())
    g = a.group_of("bn_b", 1)
    assert g.members() == {"conv_b": [1], "bn_b": [1], "cat": [5], "bn_c": [5], "relu": [5]}
    assert sorted(g.bn_channels) == [("bn_b", 1), ("bn_c", 5)]
    assert a.group_of("bn_a", 3).members()["cat"] == [3]


class PadShortcut(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv0, self.bn0, self.relu0 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
        self.conv1, self.bn1 = nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8)
        self.relu1, self.head = nn.ReLU(), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = self.relu0(self.bn0(self.conv0(x)))
        shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 2, 2))
        return self.head(self.relu1(self.bn1(self.conv1(x)) + shortcut))


def test_option_a_shortcut_carries_an_offset_and_zero_channels():
    a = analyze(PadShortcut())
    g = a.group_of("bn0", 1)
    assert g.members() == {"conv0": [1], "bn0": [1], "relu0": [1], "getitem": [1], "pad": [3],
                           "conv1": [3], "bn1": [3], "add": [3], "relu1": [3]}
    assert g.prunable
    padded = a.group_of("pad", 0)  # constant zero channel: removable with its add partners
    assert padded.members() == {"pad": [0], "conv1": [0], "bn1": [0], "add": [0], "relu1": [0]}
    assert padded.prunable and padded.bn_channels == [("bn1", 0)]


class FlattenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(3, 2, 3, stride=4, padding=1), nn.BatchNorm2d(2), nn.ReLU()
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.relu(self.bn(self.conv(x))), 1))


def test_flatten_gives_each_channel_a_block_of_features():
    g = analyze(FlattenLinear()).group_of("bn", 1)
    assert g.members() == {"conv": [1], "bn": [1], "relu": [1], "flatten": [4, 5, 6, 7]}
    assert g.prunable


class Depthwise(nn.Module):
    def __init__(self, groups=4):
        super().__init__()
        self.pw, self.bn1, self.relu1 = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU6()
        self.dw, self.bn2, self.relu2 = nn.Conv2d(4, 4, 3, padding=1, groups=groups), nn.BatchNorm2d(4), nn.ReLU6()
        self.head = nn.Conv2d(4, 5, 1)

    def forward(self, x):
        return self.head(self.relu2(self.bn2(self.dw(self.relu1(self.bn1(self.pw(x)))))))


def test_depthwise_ties_in_and_out():
    g = analyze(Depthwise()).group_of("bn1", 2)
    assert g.members() == {"pw": [2], "bn1": [2], "relu1": [2], "dw": [2], "bn2": [2], "relu2": [2]}
    assert sorted(g.bn_channels) == [("bn1", 2), ("bn2", 2)]


def test_grouped_conv_ties_the_same_index_of_every_group():
    a = analyze(Depthwise(groups=2))
    assert a.group_of("bn1", 0).members() == {"pw": [0, 2], "bn1": [0, 2], "relu1": [0, 2]}
    assert a.group_of("bn2", 1).members() == {"dw": [1, 3], "bn2": [1, 3], "relu2": [1, 3]}


class UnknownOp(Chain):
    def forward(self, x):
        return self.bn2(self.conv2(torch.sin(self.bn1(self.conv1(x)))))


def test_unknown_op_is_a_barrier_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="pyprune.analysis"):
        a = analyze(UnknownOp())
    g = a.group_of("bn1", 0)
    assert not g.prunable and "barrier" in g.reason and "sin" in g.reason
    assert "sin" in caplog.text


class ConvOnStream(nn.Module):
    """A stream written by a BN and a bare conv, read by a conv: zeroing the BN's
    gamma and beta does not zero the stream, so removing it would not be exact."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.conv2 = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(3, 4, 1)
        self.conv3 = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.conv3(self.bn1(self.conv1(x)) + self.conv2(x))


def test_inexact_group_is_refused():
    g = analyze(ConvOnStream()).group_of("add", 0)
    assert not g.prunable and g.reason.startswith("read by conv 'conv3'")


def test_needs_shapes():
    gm = trace(Chain())
    with pytest.raises(ValueError, match="propagate_shapes"):
        analyze_channels(gm)


class LayerScale(nn.Module):
    """convnext's layer scale: a (C, 1, 1) parameter broadcast over (N, C, H, W)."""

    def __init__(self, shape):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.scale = nn.Parameter(torch.rand(shape))
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.scale * self.bn1(self.conv1(x)))


@pytest.mark.parametrize("shape", [(4, 1, 1), (1, 4, 1, 1), (1, 1, 8)], ids=["C11", "1C11", "11W"])
def test_broadcast_operand_makes_a_clean_barrier(shape, caplog):
    with caplog.at_level(logging.WARNING, logger="pyprune.analysis"):
        a = analyze(LayerScale(shape))
    g = a.group_of("bn1", 1)
    assert not g.prunable and "barrier" in g.reason and "mul" in g.reason
    assert "broadcast" in caplog.text
