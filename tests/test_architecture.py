"""The engine's house rules, checked from the source: no import circle among genesis_core's files, no ComfyUI
import outside the two modules allowed one, one job per file (under ~400 lines, said in its opening docstring),
and no public name that hides a module."""
from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path
from typing import Dict, List, Set

import pytest

import genesis_core

ROOT = Path(genesis_core.__file__).resolve().parent
PACKAGE = "genesis_core"
MAX_LINES = 420
# The only engine modules that may name ComfyUI's package: the adapter for its calling convention and the
# optional end-to-end bench (reads COMFYUI_PATH); both import it lazily, inside functions.
COMFY_ALLOWED = {"genesis_core.interop.comfy_adapter", "genesis_core.interop.comfy_parallel",
                 "genesis_core.bench.comfy_e2e"}


def _modules() -> Dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(module: str, is_package: bool, level: int, name: str) -> str:
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def imports_of(module: str) -> Set[str]:
    """genesis_core modules ``module`` imports (at any depth of its code, functions included)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_package = path.name == "__init__.py"
    found: Set[str] = set()
    for node in ast.walk(tree):
        targets: List[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _resolve(module, is_package, node.level, node.module or "")
            else:
                base = node.module or ""
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in MODULES:
                t = t.rpartition(".")[0]
            if t.startswith(PACKAGE) and t != module:
                found.add(t)
    return found


def _names_comfy(module: str) -> bool:
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "comfy" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "comfy":
            return True
        if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            if node.args and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith("comfy"):
                return True
    return False


def _graph() -> Dict[str, Set[str]]:
    graph = {}
    for m in MODULES:
        deps = imports_of(m)
        # A package's own __init__ importing its children is wiring, and a child importing a *sibling* through
        # the package path is normal; what is a circle is a child importing the package __init__ that imports it.
        graph[m] = deps
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One import circle as a list of modules (first == last), or [] when there is none.

    Edges from a module to the ``__init__`` of a package that contains it are ignored: importing
    ``genesis_core.attn.limits`` runs ``genesis_core.attn`` first by Python's rules, which is not a dependency
    the module chose.
    """
    def deps(m: str) -> Set[str]:
        return {d for d in graph[m] if not m.startswith(d + ".")}

    color: Dict[str, int] = {}
    stack: List[str] = []

    def visit(m: str) -> List[str]:
        color[m] = 1
        stack.append(m)
        for d in sorted(deps(m)):
            if color.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if color.get(d) is None:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        color[m] = 2
        return []

    for m in sorted(graph):
        if color.get(m) is None:
            cycle = visit(m)
            if cycle:
                return cycle
    return []


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    cycle = find_cycle(graph)
    assert cycle[0] == cycle[-1] and set(cycle) == {"a", "b", "c"}
    assert find_cycle({"a": {"b"}, "b": set()}) == []
    assert find_cycle({"p.x": {"p"}, "p": {"p.x"}}) == []  # a package importing its child is not a circle


def test_no_import_cycle_among_genesis_core_modules():
    cycle = find_cycle(_graph())
    assert not cycle, "import circle: " + " -> ".join(cycle)


def test_the_attention_layers_point_down():
    """Leaves import no other attention module above them; dispatch imports neither the autotuner nor compile."""
    leaves = {"genesis_core.attn.types", "genesis_core.attn.limits", "genesis_core.attn.quality",
              "genesis_core.attn._trace", "genesis_core.attn.registry"}
    allowed_in_leaves = leaves | {"genesis_core.attn"}
    for leaf in leaves:
        bad = {d for d in imports_of(leaf) if d.startswith("genesis_core.attn") and d not in allowed_in_leaves}
        assert not bad, f"{leaf} imports {bad}"
    for m in ("genesis_core.attn.dispatch", "genesis_core.attn.call"):
        bad = {d for d in imports_of(m) if d.startswith(("genesis_core.attn.autotune", "genesis_core.attn.compile",
                                                          "genesis_core.attn.backends", "genesis_core.attn.modules"))}
        assert not bad, f"{m} imports {bad}"
    for m in MODULES:
        if m.startswith("genesis_core.attn.backends."):
            bad = {d for d in imports_of(m) if d.startswith(("genesis_core.attn.dispatch", "genesis_core.attn.autotune",
                                                              "genesis_core.attn.compile"))}
            assert not bad, f"{m} imports {bad}"


def test_the_engine_never_imports_comfyui():
    offenders = sorted(m for m in MODULES if m not in COMFY_ALLOWED and _names_comfy(m))
    assert not offenders, f"these genesis_core modules import ComfyUI: {offenders}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_one_job_per_file(module):
    path = MODULES[module]
    text = path.read_text(encoding="utf-8")
    lines = text.count("\n") + 1
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT.parent)} has {lines} lines (limit {MAX_LINES}): split it"
    doc = ast.get_docstring(ast.parse(text))
    assert doc and len(doc.split()) >= 4, f"{path.relative_to(ROOT.parent)} has no opening docstring saying its job"


def test_no_public_name_hides_a_module():
    hidden = []
    for m, path in MODULES.items():
        if path.name != "__init__.py":
            continue
        pkg = importlib.import_module(m)
        for info in pkgutil.iter_modules([str(path.parent)]):
            value = getattr(pkg, info.name, None)
            if value is not None and not hasattr(value, "__path__") and type(value).__name__ != "module":
                hidden.append(f"{m}.{info.name} is a {type(value).__name__}, hiding the module {info.name}.py")
    assert not hidden, "; ".join(hidden)


def test_spec_import_paths_still_work():
    from genesis.core import (AdaptiveAttentionSwitch, ComfyUINodeInterface, CrossAttentionModule,  # noqa: F401
                              HeterogeneousExecutor, create_attention_interface, get_interface_info)
    assert callable(genesis_core.attention)
