"""The op declarations of pyprune.ops and the three registries they fill (channel
handlers, serialization allowlists, MAC rules) must agree: every registered entry
comes from exactly one declaration, and every declaration's claims hold."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch
from torch import fx, nn

from pyprune.analysis import CHANNEL_HANDLERS, ChannelHandler, analyze_channels, handler_for
from pyprune.analysis.registry import module_handler
from pyprune.encode import FUNCTIONS, METHODS, MODULE_TYPES, GraphFormatError, graph_from_json, graph_state_dict, \
    graph_to_json
from pyprune.ir import layer_stats, propagate_shapes, trace
from pyprune.ir.accounting import MAC_COUNTERS
from pyprune.ops import BARRIER, DEFERRED, FAMILIES, INHERITED, OpSupport, Rewriter, declared, function, method, \
    module, register, register_deferred, registered, unregister
from pyprune.ops.identity import PassThrough

# The deferred families (third-party packages' ops) too: registered now, after the
# eager ones, as the first trace in a process with that package imported would.
register_deferred([f"{package}." for package in DEFERRED])
DECLARATIONS = [op for family in FAMILIES for op in family.OPS] + \
    [op for family in DEFERRED.values() for op in importlib.import_module(f"pyprune.ops.{family}").OPS]


def family_id(family) -> str:
    return family.__name__.rpartition(".")[2]


def snapshot() -> tuple:
    return ({k: dict(v) for k, v in CHANNEL_HANDLERS.items()}, dict(MODULE_TYPES), dict(FUNCTIONS), set(METHODS),
            dict(MAC_COUNTERS), declared())


@pytest.fixture(autouse=True)
def no_leaked_registrations():
    before = snapshot()
    yield
    assert snapshot() == before, "a test left a registration behind"


def declarations_of(kind: str, target) -> list[OpSupport]:
    return [op for op in DECLARATIONS if op.kind == kind and op.target is target or
            (op.kind == kind == "method" and op.target == target)]


# ---------------------------------------------------------------------------
# Registry -> declaration: nothing is registered that no family declared.

REGISTERED = {
    "handler:module": lambda: [("module", t) for t in CHANNEL_HANDLERS["module"]],
    "handler:function": lambda: [("function", f) for f in CHANNEL_HANDLERS["function"]],
    "handler:method": lambda: [("method", n) for n in CHANNEL_HANDLERS["method"]],
    "allowlist:module": lambda: [("module", cls) for cls in MODULE_TYPES.values()],
    "allowlist:function": lambda: [("function", fn) for fn in FUNCTIONS.values()],
    "allowlist:method": lambda: [("method", n) for n in METHODS],
    "macs": lambda: [("module", t) for t in MAC_COUNTERS],
}


@pytest.mark.parametrize("table", sorted(REGISTERED))
def test_every_registered_entry_is_declared_by_exactly_one_family(table):
    entries = REGISTERED[table]()
    assert entries, f"{table} is empty: pyprune.ops did not register"
    problems = [f"{kind} {target!r}: {len(found)} declarations" for kind, target in entries
                if len(found := declarations_of(kind, target)) != 1]
    assert not problems


def test_registered_declarations_are_the_families_own():
    assert declared() == tuple(DECLARATIONS)
    assert len({op.key for op in DECLARATIONS}) == len(DECLARATIONS)


# ---------------------------------------------------------------------------
# Declaration -> registry: each claim holds.

def resolve(name: str):
    """The object a stable name such as 'torch.nn.functional.relu' refers to."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise LookupError(name)


def claim_problems(op: OpSupport) -> list[str]:
    problems = []
    table = CHANNEL_HANDLERS[op.kind]
    if isinstance(op.handler, ChannelHandler):
        if table.get(op.target) is not op.handler:
            problems.append(f"handler is {table.get(op.target)!r}, declared {op.handler!r}")
    elif op.target in table:
        problems.append(f"declared {op.handler} but has handler {table[op.target]!r}")
    elif op.handler == BARRIER and op.kind == "module" and module_handler(op.target) is not None:
        problems.append(f"declared a barrier but a base class's handler {module_handler(op.target)!r} applies")
    elif op.handler == INHERITED:
        base_handlers = [d.handler for d in DECLARATIONS if d.kind == "module" and d.target is not op.target
                         and issubclass(op.target, d.target) and isinstance(d.handler, ChannelHandler)]
        if module_handler(op.target) is None or module_handler(op.target) not in base_handlers:
            problems.append("declared INHERITED but no declared base class's handler applies")

    if op.kind == "module":
        allowed = MODULE_TYPES.get(op.name) is op.target
    elif op.kind == "function":
        allowed = any(fn is op.target for fn in FUNCTIONS.values())
        if allowed and FUNCTIONS.get(op.name) is not op.target:
            problems.append(f"allowlisted under another name than {op.name!r}")
        if resolve(op.name) is not op.target:
            problems.append(f"stable name {op.name!r} refers to {resolve(op.name)!r}, not the declared callable")
    else:
        allowed = op.name in METHODS
    if allowed != op.serializable:
        problems.append(f"declared serializable={op.serializable}, allowlisted={allowed}")

    if op.kind == "module" and MAC_COUNTERS.get(op.target) is not op.macs:
        problems.append(f"MAC rule is {MAC_COUNTERS.get(op.target)!r}, declared {op.macs!r}")
    return problems


@pytest.mark.parametrize("family", FAMILIES, ids=family_id)
def test_declarations_match_the_registries(family):
    assert family.__doc__ and family.__doc__.strip()
    assert family.OPS
    problems = {f"{op.kind} {op.name}": p for op in family.OPS if (p := claim_problems(op))}
    assert not problems


def test_the_known_asymmetries_are_declared_as_such():
    # Conv3d is analysed and counted but not in the graph format; ConvTranspose2d
    # is in the graph format but a barrier; BatchNorm's handler sits on its base.
    assert nn.Conv3d in CHANNEL_HANDLERS["module"] and nn.Conv3d in MAC_COUNTERS and "Conv3d" not in MODULE_TYPES
    assert "ConvTranspose2d" in MODULE_TYPES and module_handler(nn.ConvTranspose2d) is None
    assert nn.ConvTranspose2d not in MAC_COUNTERS
    assert nn.BatchNorm2d not in CHANNEL_HANDLERS["module"] and module_handler(nn.BatchNorm2d) is not None
    assert "_BatchNorm" not in MODULE_TYPES


# ---------------------------------------------------------------------------
# MAC rules, through the accounting of a traced layer.

@pytest.mark.parametrize("layer,shape,macs", [
    (nn.Conv2d(16, 32, 3), (1, 16, 10, 10), 8 * 8 * 32 * 16 * 9),
    (nn.Conv2d(16, 32, 3, padding=1, stride=2), (2, 16, 16, 16), 8 * 8 * 32 * 16 * 9),
    (nn.Conv2d(16, 32, 3, groups=4), (1, 16, 10, 10), 8 * 8 * 32 * 4 * 9),
    (nn.Conv1d(8, 4, 5), (1, 8, 20), 16 * 4 * 8 * 5),
    (nn.Linear(20, 10), (3, 20), 10 * 20),
], ids=["conv3x3", "conv-strided-batch2", "conv-grouped", "conv1d", "linear"])
def test_mac_rule_gives_the_known_count(layer, shape, macs):
    gm = propagate_shapes(trace(nn.Sequential(layer)), torch.randn(shape))
    (row,) = [r for r in layer_stats(gm) if r.name == "0"]
    assert row.macs == macs  # per sample


# ---------------------------------------------------------------------------
# A family registered from outside pyprune.

class ChannelScale(nn.Module):
    """y = x * w[c]: a per-channel op pyprune does not know."""

    def __init__(self, num_channels: int) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.view(1, -1, 1, 1)


class ScaleHandler(PassThrough):
    """Channel c in is channel c out, and x * w is zero where x is."""

    def rewrite(self, rw: Rewriter, node: fx.Node) -> None:
        if rw.unchanged(node):
            return
        old, keep = rw.gm.get_submodule(node.target), rw.kept(node)

        def build() -> nn.Module:
            new = ChannelScale(len(keep))
            with torch.no_grad():
                new.weight.copy_(old.weight[keep])
            return new

        rw.replace_module(node, tuple(keep.tolist()), build)


def scale_macs(m: nn.Module, out_shape: tuple[int, ...]) -> int:
    return math.prod(out_shape)


SCALE_OPS = (module(ChannelScale, ScaleHandler(), serializable=True, macs=scale_macs),)


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
        self.scale = ChannelScale(4)
        self.conv2 = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.scale(self.relu(self.bn1(self.conv1(x)))))


def traced_scaled() -> tuple[nn.Module, fx.GraphModule, torch.Tensor]:
    model, x = Scaled().eval(), torch.randn(2, 3, 8, 8)
    return model, propagate_shapes(trace(model, leaf_modules=[ChannelScale]), x), x


def scale_node(gm: fx.GraphModule) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "scale")


def assert_unknown(gm: fx.GraphModule) -> None:
    analysis = analyze_channels(gm)
    assert "'scale' (ChannelScale)" in analysis.ctx.barriers
    assert not analysis.group_of("bn1", 0).prunable
    with pytest.raises(GraphFormatError, match="ChannelScale"):
        graph_to_json(gm)
    assert next(r for r in layer_stats(gm) if r.name == "scale").macs == 0


def test_an_unknown_module_is_a_barrier_not_serializable_and_not_counted():
    assert_unknown(traced_scaled()[1])


def test_registering_a_family_gives_handler_serialization_and_macs():
    model, gm, x = traced_scaled()
    with registered(*SCALE_OPS):
        assert SCALE_OPS[0] in declared()
        assert claim_problems(SCALE_OPS[0]) == []

        analysis = analyze_channels(gm)
        assert analysis.ctx.barriers == []
        group = analysis.group_of("bn1", 1)
        assert group.prunable
        assert group.members() == {"conv1": [1], "bn1": [1], "relu": [1], "scale": [1]}

        rebuilt = graph_from_json(graph_to_json(gm), graph_state_dict(gm))
        assert type(rebuilt.get_submodule("scale")) is ChannelScale
        torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)

        assert next(r for r in layer_stats(gm) if r.name == "scale").macs == 4 * 8 * 8

        rw = Rewriter(gm, {scale_node(gm): np.array([0, 2])})
        handler_for(gm, scale_node(gm)).rewrite(rw, scale_node(gm))
        torch.testing.assert_close(gm.get_submodule("scale").weight, model.scale.weight[[0, 2]])
    # Unregistered: a barrier again, refused by the writer, counted zero.
    assert_unknown(traced_scaled()[1])


# ---------------------------------------------------------------------------
# What register refuses, all or nothing.

def test_a_second_declaration_of_a_declared_op_is_refused():
    with pytest.raises(ValueError, match="already declared"):
        register(module(nn.Conv2d, BARRIER, serializable=True))


def test_a_registration_made_without_a_declaration_is_refused():
    from pyprune.analysis import register_module
    from pyprune.analysis.registry import unregister as unregister_handler
    register_module(ScaleHandler(), ChannelScale)
    try:
        with pytest.raises(ValueError, match="without a pyprune.ops declaration"):
            register(*SCALE_OPS)
    finally:
        unregister_handler("module", ChannelScale)


def test_registration_is_all_or_nothing():
    class Orphan(nn.Module):
        pass

    with pytest.raises(ValueError, match="inherit"):
        register(*SCALE_OPS, method("toy_method", BARRIER, serializable=True),
                 module(Orphan, INHERITED, serializable=False))
    assert SCALE_OPS[0] not in declared() and "toy_method" not in METHODS and "ChannelScale" not in MODULE_TYPES


def test_unregistering_an_undeclared_op_is_refused():
    with pytest.raises(KeyError):
        unregister(*SCALE_OPS)


@pytest.mark.parametrize("make", [
    lambda: function("torch relu", torch.relu, BARRIER, serializable=True),
    lambda: method("view", INHERITED, serializable=True),
    lambda: method("x.y", BARRIER, serializable=True),
    lambda: function("torch.relu", torch.relu, "pass", serializable=True),
    lambda: OpSupport("method", "view", "view", BARRIER, serializable=True, macs=scale_macs),
    lambda: OpSupport("module", ChannelScale, "Scale", BARRIER, serializable=True),
], ids=["bad-name", "inherited-method", "bad-method", "bad-handler", "method-macs", "module-name"])
def test_malformed_declarations_are_refused(make):
    with pytest.raises((TypeError, ValueError)):
        make()


STOCHASTIC_DEPTH_NET = """
import torch
from torch import nn
from torchvision.ops import StochasticDepth

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.drop = StochasticDepth(0.2, "row")  # traced through, to a call of the function

    def forward(self, x):
        return x.mean(1, keepdim=True) + self.drop(self.conv(x))
"""


def test_deferred_family_is_registered_for_a_trace_and_for_a_document(tmp_path):
    """A model calling torchvision.ops.stochastic_depth saves (its package was imported
    to build it), and the file loads in a fresh process that never imported torchvision."""
    import subprocess
    import sys

    (tmp_path / "sdnet.py").write_text(STOCHASTIC_DEPTH_NET)
    save = ("import sys; sys.path.insert(0, sys.argv[1]); from pyprune import api; "
            "m = api.load_model(arch='sdnet:Net'); api.save_model(m, sys.argv[1] + '/m.pt')")
    subprocess.run([sys.executable, "-c", save, str(tmp_path)], check=True, cwd=tmp_path)
    load = ("import sys; from pyprune import api; assert 'torchvision' not in sys.modules; "
            "m = api.load_model(sys.argv[1]); "
            "assert any('stochastic_depth' in str(n.target) for n in m.module.graph.nodes); "
            "assert 'torchvision' in sys.modules")
    subprocess.run([sys.executable, "-c", load, str(tmp_path / "m.pt")], check=True, cwd=tmp_path)
