"""The shape of the code: layers import downwards only, no import cycles, the kernels never import
the method, small functions and modules, project imports at module top."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lower layers never import higher ones; packages of one layer do not import each other.
LAYERS = {
    "plrd.errors": 0,
    "plrd.core": 1,
    "plrd.io": 2,
    "plrd.family": 3,
    "plrd.deploy": 3,
    "plrd.cli": 4,
}
TOP_LEVEL = {"__init__.py", "__main__.py", "errors.py"}
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 400
REASON = "# long:"


def _modules(package: str) -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules("plrd") | _modules("plrd_kernels")


def _imports(path: Path) -> list[tuple[str, ast.AST, bool]]:
    """``(imported module, node, inside a function)`` for every import in ``path``."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((a.name, child, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                for alias in child.names:  # ``from plrd.family import distributed``: a module
                    sub = f"{child.module}.{alias.name}"
                    found.append((sub if sub in MODULES else child.module, child, in_function))
            visit(child, inner)

    visit(tree, False)
    return found


def _layer(module: str) -> tuple[str, int] | None:
    for package, rank in LAYERS.items():
        if module == package or module.startswith(package + "."):
            return package, rank
    return None


def _project(module: str) -> bool:
    return module.split(".")[0] in ("plrd", "plrd_kernels")


def test_plrd_top_level_holds_only_subpackages_init_main_and_errors():
    files = {p.name for p in (ROOT / "plrd").iterdir() if p.suffix == ".py"}
    assert files == TOP_LEVEL
    for folder in (p for p in (ROOT / "plrd").iterdir() if p.is_dir() and p.name != "__pycache__"):
        init = folder / "__init__.py"
        assert init.is_file(), folder
        assert ast.get_docstring(ast.parse(init.read_text())), f"{init} has no docstring"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_and_kernels_stand_alone(module):
    path = MODULES[module]
    mine = _layer(module)
    for target, node, _ in _imports(path):
        where = f"{path.relative_to(ROOT)}:{node.lineno} imports {target}"
        if module.startswith("plrd_kernels"):
            assert not (target == "plrd" or target.startswith("plrd.")), where
            continue
        theirs = _layer(target)
        if mine is None or theirs is None:
            continue
        assert theirs[1] < mine[1] or theirs[0] == mine[0], where


def test_no_import_cycles():
    graph = {
        m: {t for t, _, _ in _imports(p) if t in MODULES and t != m} for m, p in MODULES.items()
    }
    done: set[str] = set()

    def visit(node: str, stack: list[str]) -> None:
        if node in stack:
            cycle = stack[stack.index(node) :] + [node]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if node in done:
            return
        for nxt in sorted(graph[node]):
            visit(nxt, stack + [node])
        done.add(node)

    for module in sorted(graph):
        visit(module, [])


@pytest.mark.parametrize("module", sorted(MODULES))
def test_project_imports_inside_functions_say_why(module):
    path = MODULES[module]
    lines = path.read_text().splitlines()
    for target, node, in_function in _imports(path):
        if in_function and _project(target):
            here, above = lines[node.lineno - 1], lines[node.lineno - 2]
            assert "#" in here or above.strip().startswith("#"), (
                f"{path.relative_to(ROOT)}:{node.lineno}: import of {target} inside a function "
                "without a comment saying why"
            )


@pytest.mark.parametrize("module", sorted(MODULES))
def test_functions_and_modules_are_small_or_say_why(module):
    path = MODULES[module]
    source = path.read_text()
    lines = source.splitlines()
    if len(lines) > MAX_MODULE_LINES:
        assert any(REASON in line for line in lines[:40]), (
            f"{path.relative_to(ROOT)} has {len(lines)} lines; split it or write why near the top "
            f"({REASON} ...)"
        )
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            first = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
            above = first
            while above > 0 and lines[above - 1].strip().startswith("#"):
                above -= 1  # the comment block right above the definition
            header = lines[above : node.lineno]
            if length > MAX_FUNCTION_LINES:
                assert any(REASON in line for line in header), (
                    f"{path.relative_to(ROOT)}:{node.lineno} {node.name} has {length} lines; "
                    f"split it into named steps or write why above it ({REASON} ...)"
                )
