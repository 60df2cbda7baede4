"""Structural comparison of fx graphs, for before/expected pass tests."""

from torch import fx


def graph_signature(gm: fx.GraphModule) -> list[tuple]:
    """(op, target, argument structure) per node, with nodes named by position so
    that two graphs built differently compare equal when they compute the same way."""
    index = {node: i for i, node in enumerate(gm.graph.nodes)}

    def norm(a):
        return fx.node.map_arg(a, lambda n: ("%", index[n]))

    sig = []
    for node in gm.graph.nodes:
        target = node.target
        if node.op == "call_module":
            target = type(gm.get_submodule(node.target)).__name__
        elif node.op in ("placeholder", "output", "get_attr"):
            target = node.op
        sig.append((node.op, target, norm(node.args), norm(node.kwargs)))
    return sig


def assert_graph_equal(actual: fx.GraphModule, expected: fx.GraphModule) -> None:
    a, e = graph_signature(actual), graph_signature(expected)
    assert a == e, "graphs differ:\n  actual:   " + "\n            ".join(map(str, a)) + \
        "\n  expected: " + "\n            ".join(map(str, e))
