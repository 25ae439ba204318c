"""Making the models a function captures run where its data runs.

The spec's integration example hands the executor a closure, ``process``, that reaches
``self.cross_attn`` through the node object it closes over. The executor moves the *inputs* to the chosen
device; the weights of such captured models must follow, or the first matmul fails with a device mismatch.

How Genesis does it, and why:

1. **Discovery.** :func:`reachable_modules` walks what ``fn`` can reach: ``fn`` itself when it is an
   ``nn.Module``, a bound method's ``self``, closure cells, defaults, ``functools.partial`` arguments, the
   globals its code names (including nested lambdas/comprehensions), and - a few levels down - attributes
   of plain objects and items of lists/dicts. Modules are not walked into (a module carries its children).
   The same walk (:func:`reach`) also collects the plain tensors it passes (and plain tensor attributes of
   the found modules' submodules): the ONNX session cache keys on them, since tracing bakes them in.
2. **Replicas, once per device, on first use.** A parameter or buffer of a discovered module that lives
   on another device is copied to the target device the first time ``fn`` uses it, and cached (keyed
   weakly by module, per device): a reachable model ``fn`` never touches costs nothing. A cached replica is
   refreshed when the source changes in place (``load_state_dict``, optimizer steps: the tensor version
   counter moves) or is re-pointed (``.data = ...``).
3. **Substitution while ``fn`` runs.** A thread-local ``TorchFunctionMode`` swaps a source parameter for
   its replica whenever a torch function receives it (``F.linear(x, self.weight)``, ``self.weight.dtype``).

Why not simpler mechanisms:

* Moving the user's module in place (``module.to(device)``) breaks concurrency: ``parallel_execute`` may run
  the *same* closure on CPU and CUDA at once, and one module cannot be in two places. It also changes,
  behind the caller's back, where their other code finds the model. (For a single device, the explicit
  :meth:`HeterogeneousExecutor.place` does exactly this, on request, and then costs nothing per call.)
* Rebuilding the closure with copied objects changes semantics (writes to ``self.x`` inside ``fn`` would
  land on a copy) and misses paths the rebuild does not know about.

The mode is thread-local, so concurrent calls on different devices do not see each other's replicas.
Cost: one Python hook per torch call inside ``fn``, only while some reachable module lives on another device.
Limits: replicas are detached (inference, no gradients to the source); in-place updates the model makes to
its own buffers during the call (BatchNorm running stats in training mode) land on the replica.
"""
from __future__ import annotations

import functools
import threading
import types
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Tuple

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from .._log import log_once

MAX_DEPTH = 3
MAX_VISITS = 5000

_SKIP_TYPES = (str, bytes, int, float, complex, bool, type(None), torch.Tensor, torch.device, torch.dtype,
               type, types.ModuleType, types.BuiltinFunctionType, types.CodeType)


def _code_names(code: types.CodeType) -> List[str]:
    names = list(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names.extend(_code_names(const))
    return names


@dataclass
class Reach:
    """What :func:`reach` found behind a callable.

    ``modules``: the ``nn.Module`` objects, outermost first. ``tensors``: plain tensors reachable outside
    module parameters and buffers (closure cells, defaults, attributes of captured objects, globals,
    tensor attributes of the found modules' submodules), in a stable walk order. ``unkeyed``: short notes on
    what the walk could not see into (too deep, too many objects); state there is invisible to caches.
    """

    modules: List[nn.Module] = field(default_factory=list)
    tensors: List[torch.Tensor] = field(default_factory=list)
    unkeyed: List[str] = field(default_factory=list)


def reach(fn: Any, tensors: bool = True) -> Reach:
    """Walk what ``fn`` can reach (see the module docstring); modules are not walked into, but with
    ``tensors`` their submodules' plain tensor attributes (not parameters/buffers) are collected."""
    found: Dict[int, nn.Module] = {}
    plain: Dict[int, torch.Tensor] = {}
    notes: List[str] = []
    seen: set = set()
    budget = [MAX_VISITS]

    def visit(obj: Any, depth: int, home: str = "") -> None:
        if isinstance(obj, torch.Tensor):
            if tensors:
                plain.setdefault(id(obj), obj)
            return
        if isinstance(obj, _SKIP_TYPES) or id(obj) in seen or getattr(type(obj), "_genesis_opaque", False):
            return
        if budget[0] <= 0:
            if not any(n.startswith("stopped after") for n in notes):
                notes.append(f"stopped after {MAX_VISITS} objects")
            log_once(("placement-budget", home), f"stopped looking for models captured by {home or 'fn'} after "
                                                 f"{MAX_VISITS} objects; use executor.place(module, backend)")
            return
        budget[0] -= 1
        seen.add(id(obj))
        if isinstance(obj, nn.Module):
            found.setdefault(id(obj), obj)
            return
        if depth > MAX_DEPTH:
            if tensors and (isinstance(obj, (list, tuple, dict, set, frozenset))
                            or isinstance(getattr(obj, "__dict__", None), dict)):
                note = f"objects nested more than {MAX_DEPTH} levels deep (first: {type(obj).__name__})"
                if not any(n.startswith("objects nested") for n in notes):
                    notes.append(note)
            return
        if isinstance(obj, functools.partial):
            visit(obj.func, depth, home)
            for a in obj.args:
                visit(a, depth + 1, home)
            for a in (obj.keywords or {}).values():
                visit(a, depth + 1, home)
        elif isinstance(obj, types.MethodType):
            visit(obj.__self__, depth, home)
            visit(obj.__func__, depth, home)
        elif isinstance(obj, types.FunctionType):
            for cell in obj.__closure__ or ():
                try:
                    visit(cell.cell_contents, depth + 1, obj.__qualname__)
                except ValueError:  # empty cell
                    pass
            for a in obj.__defaults__ or ():
                visit(a, depth + 1, obj.__qualname__)
            for a in (obj.__kwdefaults__ or {}).values():
                visit(a, depth + 1, obj.__qualname__)
            g = obj.__globals__
            for name in _code_names(obj.__code__):
                if name in g:
                    value = g[name]
                    # global models and containers; global functions only from the same source module
                    if isinstance(value, types.FunctionType) and value.__module__ != obj.__module__:
                        continue
                    visit(value, depth + 1, obj.__qualname__)
        elif isinstance(obj, (list, tuple, set, frozenset)):
            for x in list(obj)[:1000]:
                visit(x, depth + 1, home)
        elif isinstance(obj, dict):
            for x in list(obj.values())[:1000]:
                visit(x, depth + 1, home)
        else:
            attrs = getattr(obj, "__dict__", None)
            if isinstance(attrs, dict):
                for x in list(attrs.values()):
                    visit(x, depth + 1, home)

    visit(fn, 0)
    modules = list(found.values())
    if tensors:
        for m in modules:
            for sub in m.modules():  # plain tensor attributes (caches, masks) live in the instance dict
                for value in vars(sub).values():
                    if isinstance(value, torch.Tensor):
                        plain.setdefault(id(value), value)
    return Reach(modules, list(plain.values()), notes)


def reachable_modules(fn: Any) -> List[nn.Module]:
    """The ``nn.Module`` objects ``fn`` can reach (see the module docstring), outermost first, no duplicates."""
    return reach(fn, tensors=False).modules


def tensor_fingerprint(tensors: Iterable[torch.Tensor]) -> Tuple[tuple, List[str]]:
    """``(fingerprint, problems)``: per tensor ``(id, version, data pointer, shape, dtype)``, which changes when
    the tensor is modified in place or re-pointed; ``problems`` names tensors that cannot be fingerprinted
    (no storage pointer: sparse, nested or some subclasses) - those are left out of the fingerprint."""
    out, problems = [], []
    for t in tensors:
        try:
            out.append((id(t), t._version, t.data_ptr(), tuple(t.shape), t.dtype))
        except Exception as exc:  # noqa: BLE001 - any tensor kind without a plain storage
            problems.append(f"{type(t).__name__} {tuple(t.shape)} ({type(exc).__name__})")
    return tuple(out), problems


def _module_tensors(module: nn.Module) -> List[torch.Tensor]:
    out: Dict[int, torch.Tensor] = {}
    for t in module.parameters():
        out.setdefault(id(t), t)
    for t in module.buffers():
        out.setdefault(id(t), t)
    return list(out.values())


class ReplicaView:
    """The replicas one call may use: source tensors not on ``device``, copied there on first use.

    Copies are lazy, so a model that is reachable but unused (a node holding several models, fn using
    one) costs nothing on the target device.
    """

    __slots__ = ("_cache", "_device", "_sources")

    def __init__(self, cache: "ReplicaCache", device: torch.device,
                 sources: Dict[int, Any]) -> None:
        self._cache, self._device, self._sources = cache, device, sources

    def __bool__(self) -> bool:
        return bool(self._sources)

    def lookup(self, tensor: torch.Tensor) -> torch.Tensor:
        """The replica of ``tensor`` when it is one of the sources, else ``tensor`` itself."""
        hit = self._sources.get(id(tensor))
        if hit is None or hit[1] is not tensor:
            return tensor
        store, source = hit
        replica = store.get(id(source))
        if replica is None:
            with self._cache._lock:
                replica = store.get(id(source))
                if replica is None:
                    with torch.no_grad():
                        replica = source.detach().to(self._device)
                    store[id(source)] = replica
                    self._cache.copies += 1
        return replica


class ReplicaCache:
    """Per-device copies of module parameters and buffers, made on first use, refreshed when the source changes."""

    _genesis_opaque = True  # never searched for models (it holds other calls' state)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._store: "weakref.WeakKeyDictionary[nn.Module, Dict[torch.device, Any]]" = weakref.WeakKeyDictionary()
        self.copies = 0  # tensors copied so far (telemetry, tests)

    def view(self, modules: Iterable[nn.Module], device: torch.device) -> ReplicaView:
        """The replicas ``modules`` may need on ``device`` (only tensors not already there)."""
        sources: Dict[int, Any] = {}
        for module in modules:
            away = [t for t in _module_tensors(module) if t.device != device]
            if not away:
                continue
            fingerprint = tuple((id(t), t._version, t.data_ptr()) for t in away)
            with self._lock:
                per_device = self._store.setdefault(module, {})
                entry = per_device.get(device)
                if entry is None or entry[0] != fingerprint:  # new, or changed in place / re-pointed
                    entry = (fingerprint, {})
                    per_device[device] = entry
            for t in away:
                sources[id(t)] = (entry[1], t)
        return ReplicaView(self, device, sources)

    def clear(self, module: nn.Module = None) -> None:
        """Drop cached replicas (of one module, or all)."""
        with self._lock:
            if module is None:
                self._store = weakref.WeakKeyDictionary()
            else:
                self._store.pop(module, None)


def _swap(value: Any, view: ReplicaView) -> Any:
    if isinstance(value, torch.Tensor):
        return view.lookup(value)
    if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value):
        swapped = [view.lookup(v) if isinstance(v, torch.Tensor) else v for v in value]
        return swapped if isinstance(value, list) else tuple(swapped)
    return value


class ReplicaMode(TorchFunctionMode):
    """Thread-local: every torch function call sees the replica instead of the source tensor."""

    def __init__(self, view: ReplicaView) -> None:
        super().__init__()
        self.view = view

    def __torch_function__(self, func, types, args=(), kwargs=None):
        view = self.view
        args = tuple(_swap(a, view) for a in args)
        kwargs = {k: _swap(v, view) for k, v in kwargs.items()} if kwargs else {}
        return func(*args, **kwargs)


def callable_key(fn: Any) -> tuple:
    """``(key, keepalive)``: a hashable identity for ``fn`` that survives re-creating the same closure.

    The spec defines ``process`` inside ``execute``: a new function object per call, closing over the same
    ``self``. Keying on the code object plus the identities of what it captures lets caches (ONNX sessions,
    split calibration) recognise it. ``keepalive`` holds the captured objects so that their ids cannot be
    reused by other objects while a cache entry lives.
    """
    if isinstance(fn, nn.Module):
        return ("module", id(fn)), (fn,)
    if isinstance(fn, types.MethodType):
        inner, keep = callable_key(fn.__func__)
        return ("method", inner, id(fn.__self__)), keep + (fn.__self__,)
    if isinstance(fn, types.FunctionType):
        captured = []
        for cell in fn.__closure__ or ():
            try:
                captured.append(cell.cell_contents)
            except ValueError:
                captured.append(None)
        captured.extend(fn.__defaults__ or ())
        captured.extend((fn.__kwdefaults__ or {}).values())
        return ("function", fn.__code__, tuple(id(c) for c in captured)), (fn.__code__, *captured)
    if isinstance(fn, functools.partial):
        inner, keep = callable_key(fn.func)
        parts = list(fn.args) + list((fn.keywords or {}).values())
        names = tuple((fn.keywords or {}).keys())
        return ("partial", inner, tuple(id(p) for p in parts), names), keep + tuple(parts)
    return ("object", id(fn)), (fn,)


def weights_fingerprint(modules: Iterable[nn.Module]) -> tuple:
    """Changes whenever a parameter or buffer of ``modules`` is modified in place or re-pointed."""
    return tuple((id(t), t._version, t.data_ptr()) for m in modules for t in _module_tensors(m))
