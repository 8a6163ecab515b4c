"""The package's import graph, imports inside functions included: no cycle, config.py a leaf
(of the package it imports only io), no stage imports Ray, one module uses `tarfile`."""

from __future__ import annotations

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "wit_builder")


def _modules() -> dict[str, str]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    root = os.path.dirname(PACKAGE)
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


def _imports(path: str, module: str, modules: dict[str, str]) -> set[str]:
    """Every module this file imports (anywhere in it), resolved to package modules or kept as
    the external top-level name."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in modules else base)
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(p, m, modules) for m, p in modules.items()}


def _internal(graph: dict[str, set[str]], m: str) -> set[str]:
    return {d for d in graph[m] if d in graph and d != m}


@pytest.mark.timeout(60)
def test_no_import_cycle(graph):
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(_internal(graph, m)):
            if state.get(d) == 1:
                cycle = stack[stack.index(d) :] + [d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


@pytest.mark.timeout(60)
def test_config_is_a_leaf(graph):
    assert _internal(graph, "wit_builder.config") <= {"wit_builder.io", "wit_builder"}
    assert _internal(graph, "wit_builder.io") <= {"wit_builder"}


@pytest.mark.timeout(60)
def test_no_stage_imports_ray(graph):
    for m, deps in graph.items():
        if m.startswith("wit_builder.stages"):
            assert not {d for d in deps if d == "ray" or d.startswith("ray.")}, f"{m} imports Ray"
    users = sorted(m for m, deps in graph.items() if any(d == "ray" or d.startswith("ray.") for d in deps))
    assert users == ["wit_builder.parallel"]


@pytest.mark.timeout(60)
def test_one_module_uses_tarfile(graph):
    assert sorted(m for m, deps in graph.items() if "tarfile" in deps) == ["wit_builder.tario"]
