"""The layout's rules, read from the source: who may import whom, and how large a file or a function may grow."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("proto", "stage", "coordinator", "cluster")
# The composition root wires everything together, so it alone may import across the rules.
# (supervisor.py starts pipelines anew: it opens them from the config.)
COMPOSITION_ROOT = {"coordinator/cli.py", "coordinator/serve.py", "coordinator/compose.py", "coordinator/supervisor.py"}
ALLOWED = {
    "proto": {"proto", "errors"},
    "stage": {"stage", "proto", "errors"},
    "coordinator": {"coordinator", "proto", "errors"},
    "cluster": {"cluster", "proto", "stage", "coordinator", "errors"},
}
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


def sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if "_pb2" not in p.name)


def project_imports(path: Path) -> list[tuple[int, str]]:
    """(line, first part below `stagecoach`) of every import of the project, those inside functions included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            names = [node.module or ""]
        for name in names:
            parts = name.split(".")
            if parts[0] == "stagecoach" and len(parts) > 1:
                out.append((node.lineno, parts[1]))
    return out


def test_the_rules_see_every_module_and_every_lazy_import():
    assert len(sources()) > 30
    lazy = ast.parse("def f():\n    from stagecoach.cluster.config import ClusterConfig\n")
    assert any(isinstance(n, ast.ImportFrom) for n in ast.walk(lazy))
    assert "stage" in {target for _, target in project_imports(ROOT / "cluster" / "backends.py")}


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_follow_the_layout(path):
    rel = str(path.relative_to(ROOT))
    if rel in COMPOSITION_ROOT:
        return
    package = rel.split("/")[0]
    bad = [(line, target) for line, target in project_imports(path) if target not in ALLOWED[package]]
    assert not bad, (
        f"{rel} imports {', '.join(f'stagecoach.{t} (line {n})' for n, t in bad)}; {package}/ may import only {sorted(ALLOWED[package])}"
    )


def test_proto_init_imports_nothing():
    tree = ast.parse((ROOT / "proto" / "__init__.py").read_text())
    assert all(isinstance(n, ast.Expr) for n in tree.body), "proto/__init__.py holds more than its docstring"


def test_the_composition_root_is_small():
    # 700 formatted lines (ruff format) for the four modules: 600 before formatting and before supervisor.py joined.
    assert sum(len((ROOT / p).read_text().splitlines()) for p in COMPOSITION_ROOT) < 700


def test_model_config_and_the_wire_types_do_not_import_torch():
    code = (
        "import sys\nimport stagecoach.proto.model_config, stagecoach.proto.types, stagecoach.errors\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def function_lengths(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.lineno, node.end_lineno - node.lineno + 1


def test_no_file_over_the_limit():
    long = {str(p.relative_to(ROOT)): n for p in sources() if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES}
    assert not long, f"files over {MAX_FILE_LINES} lines: {long}"


def test_no_function_over_the_limit():
    long = [
        f"{p.relative_to(ROOT)}:{line} {name} ({n} lines)"
        for p in sources()
        for name, line, n in function_lengths(p)
        if n > MAX_FUNCTION_LINES
    ]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines, from def to last line: {long}"


def test_the_size_check_counts_nested_definitions(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text("def outer():\n" + "    x = 1\n" * 30 + "    def inner():\n" + "        y = 2\n" * 40)
    assert {name: n for name, _, n in function_lengths(path)} == {"outer": 72, "inner": 41}
