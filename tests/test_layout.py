"""The package's layout: no import cycles between mtp_ext's modules, and every head kind in the
registry is one module with one class."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

import mtp_ext

ROOT = Path(mtp_ext.__file__).parent


def _module_name(path: Path) -> str:
    parts = ["mtp_ext", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _is_module(name: str) -> bool:
    """Whether ``name`` is an importable module (e.g. the compiled ``mtp_ext._C``)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def import_graph() -> dict[str, set[str]]:
    """``module -> modules of mtp_ext it imports`` (anywhere in the file, function bodies
    included). ``from pkg import name`` counts as importing ``pkg.name`` when that is a module,
    else ``pkg``; importing ``pkg.sub`` counts as importing ``pkg.sub`` only (not the parent's
    ``__init__``, which Python runs first but which is not a dependency of the importer)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if sub in modules:
                        deps.add(sub)
                    elif _is_module(sub):  # compiled, outside the Python sources
                        continue
                    elif target in modules:
                        deps.add(target)
        deps.discard(name)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
    assert cycles(import_graph()) == []


def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_graph_sees_function_level_imports(tmp_path):
    # the graph must count imports inside functions (the lazy kind that hid cycles before)
    graph = import_graph()
    assert "mtp_ext.tree_tuning" in graph
    assert "mtp_ext.decoding" not in graph["mtp_ext.tree_tuning"]
    assert "mtp_ext.tree_step" in graph["mtp_ext.tree_tuning"]
    # the demo imports the shipped heads inside run_decode_demo only
    assert "mtp_ext.heads.shipped" in graph["mtp_ext.cli.demo"]


@pytest.mark.parametrize("kind", __import__("mtp_ext.heads", fromlist=["KINDS"]).KINDS)
def test_each_kind_is_its_own_module(kind):
    from mtp_ext.heads import MTPHeads, kind_class

    cls = kind_class(kind)
    assert issubclass(cls, MTPHeads) and cls is not MTPHeads
    assert cls.__module__ == f"mtp_ext.heads.{kind}"


# What each part of the package may import (README, "Layout"): the runtime core builds upward from
# the ops; data/ imports nothing of the package; training/ and evaluation/ sit on the heads; cli/
# may use everything and nothing but ``python -m mtp_ext`` imports it. Compatibility modules
# (``mtp_ext.assets``, ``mtp_ext.texts``, ``mtp_ext.train``) only re-export.
_CORE_BASE = {"mtp_ext.ops", "mtp_ext.reference", "mtp_ext.hf_compat", "mtp_ext.growing"}
ALLOWED = {
    "mtp_ext.data": set(),
    "mtp_ext.ops": set(),
    "mtp_ext.reference": set(),
    "mtp_ext.growing": set(),
    "mtp_ext.hf_compat": set(),
    "mtp_ext.settings": set(),
    "mtp_ext.attention_masks": set(),
    "mtp_ext.machine": set(),
    "mtp_ext.linear_choice": {"mtp_ext.ops", "mtp_ext.data", "mtp_ext.machine"},
    "mtp_ext.cpu_linear": {"mtp_ext.ops", "mtp_ext.linear_choice"},
    "mtp_ext.heads": _CORE_BASE | {"mtp_ext.attention_masks", "mtp_ext.data"},
    "mtp_ext.trees": {"mtp_ext.heads"},
    "mtp_ext.tree_step": _CORE_BASE | {"mtp_ext.cpu_linear", "mtp_ext.heads", "mtp_ext.trees"},
    "mtp_ext.tree_tuning": _CORE_BASE | {"mtp_ext.controller", "mtp_ext.heads", "mtp_ext.settings",
                                         "mtp_ext.tree_step", "mtp_ext.trees"},
    "mtp_ext.controller": set(),
    "mtp_ext.step_costs": _CORE_BASE | {"mtp_ext.data", "mtp_ext.heads", "mtp_ext.machine",
                                        "mtp_ext.settings", "mtp_ext.tree_step", "mtp_ext.trees"},
    "mtp_ext.controlled_steps": {"mtp_ext.controller", "mtp_ext.heads", "mtp_ext.step_costs",
                                 "mtp_ext.tree_step", "mtp_ext.trees"},
    "mtp_ext.decoding": _CORE_BASE | {"mtp_ext.controlled_steps", "mtp_ext.heads",
                                      "mtp_ext.settings", "mtp_ext.tree_step", "mtp_ext.trees"},
    "mtp_ext.training": _CORE_BASE | {"mtp_ext.heads", "mtp_ext.data"},
    "mtp_ext.evaluation": _CORE_BASE | {"mtp_ext.heads", "mtp_ext.data", "mtp_ext.training"},
}
_PARTS = ("heads", "training", "data", "cli", "evaluation")


def _part(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 and parts[1] in _PARTS else module


def test_each_part_imports_only_what_the_layout_allows():
    graph = import_graph()
    wrong = {}
    for module, deps in graph.items():
        part = _part(module)
        if part not in ALLOWED:
            continue
        extra = {_part(d) for d in deps} - ALLOWED[part] - {part}
        if extra:
            wrong[module] = sorted(extra)
    assert wrong == {}
    importers = {m for m, deps in graph.items() if any(_part(d) == "mtp_ext.cli" for d in deps)}
    assert {_part(m) for m in importers} <= {"mtp_ext.cli", "mtp_ext.__main__"}


def test_public_names_keep_working_where_the_readme_shows_them():
    import mtp_ext.assets
    import mtp_ext.texts
    import mtp_ext.train
    from mtp_ext.data import assets, texts
    from mtp_ext import training

    assert mtp_ext.assets.load_model is assets.load_model
    assert mtp_ext.texts.load_text is texts.load_text
    assert mtp_ext.texts.prepare_texts is texts.prepare_texts
    assert mtp_ext.train.train_heads is training.train_heads
    assert mtp_ext.load_heads is mtp_ext.heads.shipped.load_heads
    assert mtp_ext.generate is mtp_ext.decoding.generate
