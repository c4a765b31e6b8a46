"""The shape of the code: layers that import only downwards, variants as tables, small functions.

Complexity (McCabe <= 15) is ruff's C901 (pyproject.toml); these tests check
what ruff cannot: the layer rule over *every* import (module level, inside
functions, and module paths given as strings to ``importlib``), the absence of
cycles at any level, string tests of kinds and layouts outside their tables,
and function length. ARCHITECTURE.md draws the same picture.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PIPELINE = Path(__file__).resolve().parents[1] / "pipeline"
MAX_BODY_LINES = 80
#: Kernels allowed to be as long as their algorithms.
KERNELS = {("coloring.py", "_dsatur"), ("coloring.py", "_kernels"), ("coloring.py", "greedy_star"),
           ("fd.py", "fd_check")}

#: Which layer may import which (besides itself). ARCHITECTURE.md explains each.
ALLOWED = {
    "core": set(),
    "problem": {"core"},
    "maths": {"core", "problem"},
    "sparse": {"core", "problem", "maths"},
    "store": {"core"},
    "runner": {"core", "problem", "maths", "sparse", "store"},
    "analysis": {"core", "problem", "maths", "sparse", "store"},
    "cli": {"core", "problem", "maths", "sparse", "store", "runner", "analysis"},
}
#: Where the kind and layout tables live: the only places that may test their names.
TABLES = {"core/kinds.py", "maths/kinds.py"}
_MODULE_PATH = re.compile(r"^pipeline(\.[A-Za-z_]\w*)+$")


def _modules() -> dict[str, Path]:
    """``pipeline.layer.module`` -> its file, for every module of the package."""
    out = {}
    for path in sorted(PIPELINE.rglob("*.py")):
        parts = path.relative_to(PIPELINE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _command_strings(tree: ast.AST) -> set[int]:
    """ids of string constants that follow ``"-m"`` in a list: a command line, not an import."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.List, ast.Tuple)):
            for before, after in zip(node.elts, node.elts[1:], strict=False):
                if isinstance(before, ast.Constant) and before.value == "-m":
                    skip.add(id(after))
    return skip


def imports(path: Path) -> list[tuple[int, str]]:
    """Every ``pipeline`` module ``path`` imports: statements anywhere, and module-path strings.

    A string that is a dotted ``pipeline.…`` path counts as an import (what
    ``importlib.import_module`` or a lazy table would load), unless it is the
    module of a ``python -m`` command line.
    """
    tree = ast.parse(path.read_text())
    skip = _command_strings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "pipeline":
                found += [(node.lineno, f"pipeline.{a.name}") for a in node.names]
            elif node.module.startswith("pipeline."):
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("pipeline.")]
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
              and _MODULE_PATH.match(node.value) and id(node) not in skip):
            found.append((node.lineno, node.value))
    return found


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else None


def test_every_module_is_in_a_layer() -> None:
    loose = [m for m in _modules() if m != "pipeline" and _layer(m) is None]
    assert not loose, f"modules outside the layers {sorted(ALLOWED)}: {loose}"


def test_layers_import_only_downwards() -> None:
    bad = []
    for module, path in _modules().items():
        layer = _layer(module)
        if layer is None:
            continue  # pipeline/__init__.py: the public face re-exports every layer
        for line, target in imports(path):
            other = _layer(target)
            if other is None:
                bad.append(f"{path.relative_to(PIPELINE)}:{line} imports {target} (no layer)")
            elif other != layer and other not in ALLOWED[layer]:
                bad.append(f"{path.relative_to(PIPELINE)}:{line} {layer} -> {target}")
    assert not bad, bad


def test_the_rule_reads_function_level_imports_and_strings(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import importlib\n"
        "def f():\n"
        "    from pipeline.cli.app import main\n"
        "    return importlib.import_module('pipeline.analysis.compare')\n"
        "CMD = ['python', '-m', 'pipeline.cli']\n"
    )
    assert [t for _, t in imports(probe)] == ["pipeline.cli.app", "pipeline.analysis.compare"]


def test_no_import_cycle_at_any_level() -> None:
    modules = _modules()

    def owner(target: str) -> str | None:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    graph = {
        m: {o for _, t in imports(p) if (o := owner(t)) and o != m and not m.startswith(o + ".")
            and o != "pipeline"}
        for m, p in modules.items() if m != "pipeline"
    }
    cycles: set[str] = set()
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.add(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, sorted(cycles)[:5]


_NAME_TEST = re.compile(
    r"""\b(kind|layout)\s*(==|!=)\s*["'](\w+)["']|["'](\w+)["']\s*(==|!=)\s*\S*\b(kind|layout)\b""")


def test_no_kind_or_layout_string_tests_outside_the_tables() -> None:
    from pipeline.core.kinds import KINDS, LAYOUTS

    names = set(KINDS) | set(LAYOUTS)
    found = []
    for path in sorted(PIPELINE.rglob("*.py")):
        rel = str(path.relative_to(PIPELINE))
        if rel in TABLES:
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            for m in _NAME_TEST.finditer(line):
                if (m.group(3) or m.group(4)) in names:
                    found.append(f"{rel}:{i}: {line.strip()}")
    assert not found, found


def test_the_string_test_counter_sees_a_string_test(tmp_path: Path) -> None:
    line = 'if shapes.kind == "batched" or result.layout != "sparse":'
    assert [m.group(3) for m in _NAME_TEST.finditer(line)] == ["batched", "sparse"]


def _body_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    return 0 if not body else body[-1].end_lineno - body[0].lineno + 1


def test_no_function_body_over_80_lines() -> None:
    long = []
    for path in sorted(PIPELINE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = _body_lines(node)
                if lines > MAX_BODY_LINES and (path.name, node.name) not in KERNELS:
                    long.append(f"{path.relative_to(PIPELINE)}:{node.lineno} {node.name} "
                                f"({lines} lines)")
    assert not long, long


def test_the_core_imports_no_heavy_library_at_module_level() -> None:
    heavy = {"torch", "ray", "pyarrow", "numpy", "scipy", "pandas", "matplotlib"}
    bad = []
    for path in sorted((PIPELINE / "core").rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad += [f"{path.name}: {n}" for n in names if n.split(".")[0] in heavy]
    assert not bad, bad


def test_cluster_process_management_is_not_in_the_library() -> None:
    assert not (PIPELINE / "localcluster.py").exists()
    assert "localcluster" not in " ".join(p.read_text() for p in PIPELINE.rglob("*.py"))
