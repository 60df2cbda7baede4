import pytest

from pyprune.passes import PassSpec, PipelineSyntaxError, create_pass, parse_pipeline


@pytest.mark.parametrize("text,expected", [
    ("slim", [PassSpec("slim")]),
    ("slim()", [PassSpec("slim")]),
    ("slim(ratio=0.4)", [PassSpec("slim", {"ratio": 0.4})]),
    (" slim(ratio=0.4) , mask(sparsity=0.8,scope=global),quant(bits=5)",
     [PassSpec("slim", {"ratio": 0.4}), PassSpec("mask", {"sparsity": 0.8, "scope": "global"}),
      PassSpec("quant", {"bits": 5})]),
    ("slim(layer_ratios={'layer1.0.bn1': 0.5, 'bn1': 0.1},combine='sum')",
     [PassSpec("slim", {"layer_ratios": {"layer1.0.bn1": 0.5, "bn1": 0.1}, "combine": "sum"})]),
    ("x(a=(1,2),b=True,c=None,d=-3e-2)", [PassSpec("x", {"a": (1, 2), "b": True, "c": None, "d": -0.03})]),
])
def test_parse(text, expected):
    assert parse_pipeline(text) == expected


@pytest.mark.parametrize("text,column", [
    ("slim(ratio=0.4", 14), ("slim(ratio)", 6), ("(ratio=1)", 1), ("slim,,mask", 6), ("slim(a=1))", 10),
    ("slim x", 6),
])
def test_syntax_errors_point_at_the_column(text, column):
    with pytest.raises(PipelineSyntaxError, match=f"column {column} "):
        parse_pipeline(text)


def test_unknown_pass_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown pass 'nope'"):
        create_pass("nope")
