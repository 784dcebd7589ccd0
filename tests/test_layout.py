"""The house rules of docs/architecture.md, checked on the source: no file over 700 lines, no function over 100,
no import circle between scaling_lab modules (function-level imports included), thin entry scripts, and only
tracking.py importing mlflow."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "scaling_lab"


def _modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text()) for p in sorted(PKG.glob("*.py"))}


def _imports(tree: ast.Module) -> set[str]:
    out = set()
    for node in ast.walk(tree):  # every import, at any depth
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("scaling_lab"):
            out |= {node.module.split(".")[1]} if "." in node.module else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("scaling_lab.")}
    return out


def test_sizes_of_files_and_functions():
    for p in PKG.glob("*.py"):
        assert len(p.read_text().splitlines()) <= 700, p.name
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno + 1 <= 100, f"{p.name}:{node.name}"
    for p in (ROOT / "mlproject").glob("*.py"):
        assert len(p.read_text().splitlines()) <= 15, p.name


def test_no_import_circle():
    mods = _modules()
    graph = {m: _imports(t) & set(mods) - {m} for m, t in mods.items()}

    def reach(start: str) -> set[str]:
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo += graph[m]
        return seen

    circles = [m for m in graph if m in reach(m)]
    assert not circles, circles


def test_only_tracking_imports_mlflow():
    for name, tree in _modules().items():
        uses = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        uses |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert "mlflow" not in uses or name == "tracking", name


def test_no_scaling_lab_import_hidden_in_a_function():
    """Imports of the package's own modules sit at the top of each file, so the graph above is the real one."""
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.ImportFrom) and (inner.module or "").startswith("scaling_lab"):
                        raise AssertionError(f"{name}.{node.name} imports {inner.module} inside the function")
                    if isinstance(inner, ast.Import) and any(a.name.startswith("scaling_lab") for a in inner.names):
                        raise AssertionError(f"{name}.{node.name} imports scaling_lab inside the function")
