"""Activations: per-channel ones (ReLU family, ELU, SiLU, GELU, Hardswish, Tanh,
Sigmoid, Hardsigmoid; modules, functions and methods) pass channels through;
PReLU, softmax and clamp are serializable barriers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .identity import PASS_THROUGH, PassThrough
from .registry import BARRIER, OpSupport, function, method, module

# sigmoid(0) = 0.5 and hardsigmoid(0) = 0.5: a removed channel's zero does not stay zero.
NONZERO_AT_ZERO = PassThrough(keeps_zero=False)

OPS: tuple[OpSupport, ...] = (
    module(nn.ReLU, PASS_THROUGH, serializable=True),
    module(nn.ReLU6, PASS_THROUGH, serializable=True),
    module(nn.LeakyReLU, PASS_THROUGH, serializable=True),
    module(nn.ELU, PASS_THROUGH, serializable=True),
    module(nn.SiLU, PASS_THROUGH, serializable=True),
    module(nn.GELU, PASS_THROUGH, serializable=True),
    module(nn.Hardswish, PASS_THROUGH, serializable=True),
    module(nn.Tanh, PASS_THROUGH, serializable=True),
    module(nn.Hardtanh, PASS_THROUGH, serializable=False),
    module(nn.Sigmoid, NONZERO_AT_ZERO, serializable=True),
    module(nn.Hardsigmoid, NONZERO_AT_ZERO, serializable=True),
    # PReLU may hold one weight per channel, which no rule shrinks; softmax may
    # normalise across the channels.
    module(nn.PReLU, BARRIER, serializable=True),
    module(nn.Softmax, BARRIER, serializable=True),

    function("torch.nn.functional.relu", F.relu, PASS_THROUGH, serializable=True),
    function("torch.relu", torch.relu, PASS_THROUGH, serializable=True),
    function("torch.nn.functional.relu6", F.relu6, PASS_THROUGH, serializable=True),
    function("torch.nn.functional.leaky_relu", F.leaky_relu, PASS_THROUGH, serializable=True),
    function("torch.nn.functional.elu", F.elu, PASS_THROUGH, serializable=False),
    function("torch.nn.functional.silu", F.silu, PASS_THROUGH, serializable=True),
    function("torch.nn.functional.gelu", F.gelu, PASS_THROUGH, serializable=True),
    function("torch.nn.functional.hardswish", F.hardswish, PASS_THROUGH, serializable=True),
    function("torch.nn.functional.hardtanh", F.hardtanh, PASS_THROUGH, serializable=False),
    function("torch.tanh", torch.tanh, PASS_THROUGH, serializable=True),
    function("torch.nn.functional.tanh", F.tanh, BARRIER, serializable=True),
    function("torch.sigmoid", torch.sigmoid, NONZERO_AT_ZERO, serializable=True),
    function("torch.nn.functional.sigmoid", F.sigmoid, NONZERO_AT_ZERO, serializable=True),
    function("torch.nn.functional.hardsigmoid", F.hardsigmoid, NONZERO_AT_ZERO, serializable=True),
    function("torch.softmax", torch.softmax, BARRIER, serializable=True),
    function("torch.nn.functional.softmax", F.softmax, BARRIER, serializable=True),
    function("torch.nn.functional.log_softmax", F.log_softmax, BARRIER, serializable=True),
    function("torch.clamp", torch.clamp, BARRIER, serializable=True),

    method("relu", PASS_THROUGH, serializable=True),
    method("relu_", PASS_THROUGH, serializable=True),
    method("tanh", PASS_THROUGH, serializable=True),
    method("sigmoid", BARRIER, serializable=True),
    method("softmax", BARRIER, serializable=True),
    method("clamp", BARRIER, serializable=True),
)
