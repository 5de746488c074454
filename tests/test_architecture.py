"""The library's structure: no import cycles between its modules (function-local imports included),
and registries that reach mcomp's own units the way they reach plug-ins' (entry points)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {
    "mcomp": "mcomp",
    "encoders": "mcomp.encoders",
    "benchmarks": "mcomp.benchmarks",
    "configs": "mcomp.configs",
}  # source folder -> installed package (pyproject's package-dir)


def library_modules() -> dict[str, Path]:
    modules = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the library modules it imports anywhere in its body. `from package import name`
    counts as importing the submodule when `name` is one, else the package; the implicit import of a
    parent package's __init__ by any submodule import is Python's, not an edge."""

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in modules.items():
        edges = set()
        here = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            edges |= {
                target for name in names if name.startswith("mcomp") and (target := owner(name)) not in (None, module)
            }
        graph[module] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    graph = import_graph(library_modules())
    assert len(graph) > 80 and "mcomp.model" in graph["mcomp.train"] | graph["mcomp.compose"] | graph["mcomp"]
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(
        " -> ".join(c) + "\n    " + "; ".join(f"{m} imports {sorted(graph[m] & set(c))}" for m in c) for c in found
    )


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize(
    "group,registry",
    [
        ("mcomp.modalities", "mcomp.modality:available_adapters"),
        ("mcomp.merge_methods", "mcomp.merge:available_methods"),
        ("mcomp.merge_accelerations", "mcomp.merge.acceleration:available_accelerations"),
    ],
)
def test_registries_hold_every_entry_point(group, registry):
    """mcomp's own units come through the entry points it declares, as a plug-in's would."""
    import importlib
    from importlib.metadata import entry_points

    module, function = registry.split(":")
    names = set(getattr(importlib.import_module(module), function)())
    declared = {ep.name for ep in entry_points(group=group) if ep.dist is not None and ep.dist.name == "mcomp"}
    assert declared and declared <= names


def test_task_functions_come_through_their_entry_point():
    from importlib.metadata import entry_points

    from mcomp.benchmarks.mcub.registry import registered

    assert "mcomp.benchmarks.mcub.scoring" in {ep.value for ep in entry_points(group="mcomp.task_functions")}
    assert {"first_letter", "exact"} <= set(registered("scorer"))


def test_the_modality_table_reads_without_torch_and_the_adapters_follow_it():
    import subprocess
    import sys

    code = (
        "import sys, mcomp.modalities as m; assert 'torch' not in sys.modules, 'torch imported'; "
        "print(','.join(f'{n}={t.placeholder}={t.published_key}' for n, t in m.MODALITIES.items()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "image=<image>=vision,audio=<audio>=audio,video=<video>=video,point=<point>=point"
    from mcomp.modalities import MODALITIES
    from mcomp.modality import available_adapters

    for name, cls in available_adapters().items():
        if cls.modality in MODALITIES and cls.__module__.startswith("mcomp."):
            assert cls.placeholder == MODALITIES[cls.modality].placeholder, name
