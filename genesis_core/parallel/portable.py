"""Functions named so that another process can find them: ``(module, qualname)`` under ``genesis_core``.

Inside ComfyUI this package is imported under the pack's folder name (``<pack>.genesis_core...``), a name a Ray
worker cannot import; the workers import the same code as top-level ``genesis_core`` (its folder is put on their
``sys.path``). :func:`portable` turns a Genesis function into a ``(module, qualname)`` pair with the canonical
module name; :func:`resolve` turns it back in the worker. Other functions pass through unchanged.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Tuple, Union

__all__ = ["portable", "resolve"]

FnSpec = Union[Callable[..., Any], Tuple[str, str]]


def portable(fn: FnSpec) -> FnSpec:
    """``fn`` as ``("genesis_core.<module>", "name")`` when it lives in genesis_core; otherwise ``fn`` itself."""
    if isinstance(fn, tuple):
        return fn
    module = getattr(fn, "__module__", "") or ""
    qualname = getattr(fn, "__qualname__", "")
    if "<locals>" in qualname:
        return fn
    if module == "genesis_core" or module.startswith("genesis_core."):
        return (module, qualname)
    head, sep, tail = module.partition(".genesis_core")
    if sep and (tail == "" or tail.startswith(".")):
        return ("genesis_core" + tail, qualname)
    return fn


def resolve(spec: FnSpec) -> Callable[..., Any]:
    """The function a :func:`portable` spec names (imported in this process)."""
    if not isinstance(spec, tuple):
        return spec
    module, qualname = spec
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj
