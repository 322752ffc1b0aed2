"""The layout's rules, checked by walking every import of the project's own code.

- ``wbc_ml/`` (the ML engine) imports nothing of Django, DRF or our Django apps;
- TensorFlow, Keras and tf2onnx are imported only inside ``wbc_ml/`` (tests and benchmarks may build models);
- no module imports a ``_private`` name or module from another top-level package;
- the module-level imports of the project's modules form no cycle.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("wbc_ml", "accounts", "classifier", "reports", "adaptation", "audit", "wbcsite")
DJANGO_WORLD = ("django", "rest_framework", "drf_spectacular", "storages", "axes", "simple_history")
ML_FRAMEWORKS = ("tensorflow", "keras", "tf2onnx", "tf_keras")


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, dotted
    target: str  # the imported module, dotted (absolute)
    names: tuple[str, ...]  # names taken with "from target import ..."
    top_level: bool  # executed at import time (not inside a function)
    line: int

    @property
    def where(self) -> str:
        return f"{self.module.replace('.', '/')}.py:{self.line}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_files() -> list[Path]:
    files = [REPO / "manage.py"]
    for package in PACKAGES:
        files += [p for p in (REPO / package).rglob("*.py") if "migrations" not in p.parts]
    return [p for p in files if p.exists()]


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
    return ".".join([*base, node.module] if node.module else base)


def _function_lines(tree: ast.AST) -> set[int]:
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            inside.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    return inside


def imports_of(path: Path) -> list[Import]:
    module = module_name(path)
    tree = ast.parse(path.read_text(), filename=str(path))
    in_functions = _function_lines(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(module, alias.name, (), node.lineno not in in_functions, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            target = _absolute(node, module, path.name == "__init__.py")
            names = tuple(alias.name for alias in node.names)
            found.append(Import(module, target, names, node.lineno not in in_functions, node.lineno))
    return found


ALL_IMPORTS = [imp for path in project_files() for imp in imports_of(path)]
PROJECT_MODULES = {module_name(p) for p in project_files()}


def _root(dotted: str) -> str:
    return dotted.split(".", maxsplit=1)[0]


def test_the_walk_sees_the_project():
    # Guards the rules below against passing on nothing: every package is found and has imports.
    roots = {_root(imp.module) for imp in ALL_IMPORTS}
    assert {"wbc_ml", "accounts", "classifier", "reports", "wbcsite"} <= roots
    assert len(PROJECT_MODULES) > 60


def test_the_ml_engine_imports_no_django_and_none_of_our_apps():
    offending = [
        f"{imp.where} imports {imp.target}"
        for imp in ALL_IMPORTS
        if _root(imp.module) == "wbc_ml"
        and _root(imp.target) in (*DJANGO_WORLD, *[p for p in PACKAGES if p != "wbc_ml"])
    ]
    assert offending == []


def test_tensorflow_and_keras_are_imported_only_in_the_ml_engine():
    offending = [
        f"{imp.where} imports {imp.target}"
        for imp in ALL_IMPORTS
        if _root(imp.target) in ML_FRAMEWORKS and _root(imp.module) != "wbc_ml"
    ]
    assert offending == []
    assert any(_root(imp.target) == "tensorflow" for imp in ALL_IMPORTS), "the walk should see the engine's imports"


def _private_parts(imp: Import) -> list[str]:
    parts = [p for p in imp.target.split(".") if p.startswith("_") and not p.startswith("__")]
    return parts + [n for n in imp.names if n.startswith("_") and not n.startswith("__")]


def test_no_module_imports_a_private_name_from_another_package():
    offending = [
        f"{imp.where} takes {', '.join(_private_parts(imp))} from {imp.target}"
        for imp in ALL_IMPORTS
        if _root(imp.target) in PACKAGES and _root(imp.target) != _root(imp.module) and _private_parts(imp)
    ]
    assert offending == []


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _resolve(imp: Import) -> set[str]:
    """The project modules an import loads: the target, or target.name for 'from package import module'."""
    hits = {imp.target} if imp.target in PROJECT_MODULES else set()
    hits |= {f"{imp.target}.{name}" for name in imp.names if f"{imp.target}.{name}" in PROJECT_MODULES}
    return hits


def module_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {module: set() for module in PROJECT_MODULES}
    for imp in ALL_IMPORTS:
        if imp.top_level:
            graph[imp.module] |= _resolve(imp) - {imp.module}
    return graph


def test_module_level_imports_form_no_cycle():
    assert _cycles(module_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize(
    "source, expected",
    [
        ("from classifier.fetch import _check_url", ["_check_url"]),
        ("from reports._internal import helper", ["_internal"]),
        ("from classifier.fetch import fetch_url", []),
    ],
)
def test_private_import_detection(tmp_path, source, expected):
    imp = Import("reports.views", source.split()[1], tuple(source.split("import ")[1].split(", ")), True, 1)
    assert _private_parts(imp) == expected
