"""The package's structure: its layers only import downwards (the import-linter
contracts in pyproject.toml), and no module outside ``pyprune/passes/`` knows
which passes exist."""

import ast
import io
import os
import shutil
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")
PASS_NAMES = {"slim", "mask", "quant"}
# The one place outside passes/ allowed to name passes: compile's default --order.
DEFAULT_ORDER_FILE = Path("pyprune/compile/config.py")


def lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}  # the package under root, not the installed one
    return subprocess.run([str(LINT), "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)


def copy_package(dest: Path) -> Path:
    shutil.copytree(REPO / "pyprune", dest / "pyprune", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copy(REPO / "pyproject.toml", dest / "pyproject.toml")
    return dest


@pytest.fixture(scope="module")
def linter():
    if not LINT.exists():
        pytest.skip("import-linter is not installed (make test installs it)")
    return lint


def test_the_layers_only_look_down(linter):
    result = linter(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken." in result.stdout


@pytest.mark.parametrize("importer,line,broken", [
    ("ir/trace.py", "from pyprune.cli import main", "Layers only look down"),  # upward, from the bottom
    ("passes/mask.py", "from ..train import fine_tune", "Layers only look down"),  # the import this issue removed
    ("encode/ppz.py", "from ..data import DataSpec", "Layers only look down"),  # sideways, between siblings
    ("cli/info.py", "from ..models import build_model", "The command line calls the API only"),
])
def test_a_planted_import_breaks_the_contract(linter, tmp_path, importer, line, broken):
    root = copy_package(tmp_path)
    assert linter(root).returncode == 0  # the copy itself is clean
    planted = root / "pyprune" / importer
    planted.write_text(planted.read_text() + f"\n{line}  # planted\n")
    result = linter(root)
    assert result.returncode != 0 and f"{broken} BROKEN" in result.stdout
    module = "pyprune." + importer.removesuffix(".py").replace("/", ".")
    assert module in result.stdout


def _names_passes(path: Path) -> list[str]:
    """Where a module names a pass: a string literal that is exactly a pass name,
    or an import of a pass module."""
    src = path.read_text()
    found = []
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.STRING:
            try:
                value = ast.literal_eval(tok.string)
            except (ValueError, SyntaxError):
                continue
            if value in PASS_NAMES:
                found.append(f"{path}:{tok.start[0]} {tok.string}")
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            found += [f"{path}:{node.lineno} import {m}" for m in modules if PASS_NAMES & set(m.split("."))]
    return found


def test_only_the_passes_know_which_passes_exist():
    offenders = []
    for path in sorted((REPO / "pyprune").rglob("*.py")):
        rel = path.relative_to(REPO)
        if rel.parts[1] == "passes":
            continue
        hits = _names_passes(path)
        if rel == DEFAULT_ORDER_FILE:
            line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if text.startswith("DEFAULT_ORDER"))
            assert len([h for h in hits if h.startswith(f"{path}:{line} ")]) == len(PASS_NAMES)
            hits = [h for h in hits if not h.startswith(f"{path}:{line} ")]
        offenders += hits
    assert not offenders, "\n".join(offenders)


def test_the_name_check_finds_a_planted_name(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text('stage = "quant"\nfrom pyprune.passes.slim import plan\nlabel = "quantile"\n')
    assert len(_names_passes(planted)) == 2
