"""Running a PyTorch function in ONNX Runtime: export once per input signature, cache the session, bind I/O.

:class:`OnnxRunner` backs the executor's ONNX and WEBGPU backends. On the first call for a given
``(fn, input shapes and dtypes, non-tensor arguments, weights, globals fn reads)`` it exports ``fn`` (a function
or an ``nn.Module``; captured models included) with ``torch.onnx.export`` and builds an
``onnxruntime.InferenceSession``; later calls with the same signature reuse the session without exporting.

Exporter choice. ``exporter="torchscript"`` (default) is the tracing exporter (``dynamo=False``): on this
project's CPU box it exported a small SDPA cross-attention module in ~0.3 s, against ~2.75 s for the dynamo
exporter, and it needs no ``onnxscript``, which the dynamo exporter requires. PyTorch 2.13 still ships it
(with a deprecation warning that we silence). ``"dynamo"`` uses ``torch.export``; ``"auto"`` tries the
tracing exporter and falls back to dynamo when tracing fails or is refused (below), or the tracer is gone in a
future PyTorch. Tracing bakes Python control flow and non-tensor arguments into the graph, which is why they
are part of the cache key.

What a served graph is guaranteed to be (each point is checked, not assumed):

* **No input-dependent Python values.** While tracing, a ``TorchFunctionMode`` (:class:`_Guard`) follows which
  tensors are computed from the inputs' *data*, and which have a data-dependent *size* (``x[x > 0]``,
  ``nonzero``, ``unique``, ...). Turning such a tensor into a Python value (``if t.sum() > 0``, ``.item()``,
  ``float(t)``, ``.tolist()``, NumPy, ``len``/iteration of a data-sized tensor) would freeze that value, and
  the branch taken on it, into the graph, so the export is refused with :class:`OnnxDataDependentError`, which
  names the function and the line and says what to write instead (``torch.where``, tensor arithmetic) or to
  use the cpu backend. Python values derived from shapes, weights or other keyed state are exact for the
  cached key and stay allowed (``if x.shape[0] > 3``, ``head_dim ** -0.5``, ``if self.gate.item() > 0``).
  Library functions written in Python (``F.multi_head_attention_forward``, ...), whose inner torch calls a
  ``TorchFunctionMode`` does not see, are followed op by op with a ``TorchDispatchMode`` (:class:`_Nested`).
  Not seen: values a C++ kernel reads from the data by itself (``F.one_hot`` without ``num_classes``); the
  check below catches them on the export inputs only. (The dynamo exporter refuses data-dependent branches
  itself, through ``torch.export``.)
* **The caller's tensors are not touched by the export.** The trace runs on copies of the inputs. A function
  that modifies its inputs in place gets the eager result; the caller's tensors stay unchanged (logged once:
  an ONNX graph cannot write into its inputs). Captured tensors modified in place during the export's single
  run of ``fn`` are logged, and refused when the graph then disagrees with ``fn``.
* **Every new graph reproduces fn.** The new session runs on the export inputs and must match what ``fn``
  returned on them while being traced (no extra call of ``fn``; that run is the first call's result):
  float outputs to 1e-3 of their largest value (2e-2 for 16-bit types), others exactly. A mismatch refuses the
  export (:class:`OnnxExportError`). Functions that draw random numbers can only be checked for structure.
* Graphs with data-dependent output sizes run through ONNX Runtime's own output allocation, not
  preallocated buffers.

The graph is exported in the module's current mode (``TrainingMode.PRESERVE``): ONNX computes what ``fn``
computes now. Weights, and any other tensor ``fn`` can reach (closure cells, defaults, attributes of
captured objects, globals; see :func:`~genesis_core.compute.placement.reach`), are constants of the graph,
so the in-memory key fingerprints them (identity, version counter, data pointer, shape, dtype): a tensor
changed in place or an attribute re-pointed to a new tensor gives a new export rather than stale numbers.
Simple constants among the globals fn's code reads (``S = 2``; also through same-module helper functions)
are in the key by value. What the walk cannot key (too deep, tensors without a storage pointer) is logged
once as baked in. Non-tensor attributes of captured objects (``self.mode = "fast"``) are not in the in-memory
key: after changing one, call ``runner.clear()`` (a disk hit is re-checked against fn, which catches them).

I/O. Inputs are bound by pointer (``IOBinding``) from contiguous torch tensors on the runner's device, and
outputs are written straight into preallocated torch tensors (their shapes are known from the trace), so
CPU and CUDA calls copy nothing. Providers without pointer binding (WebGPU, DirectML, ...) and graphs with
data-dependent output sizes go through numpy.

Disk cache (opt-in, ``cache_dir=``): ``<cache_dir>/<name>-<sha256>.onnx`` plus a JSON sidecar holding the full
key, the sha256 of the ``.onnx`` file and the outputs' structure. The key covers fn's code (and that of
same-module helpers it calls), the classes and architecture of captured models, the *contents* of their
weights and of every other reachable tensor, simple captured constants (closure cells, defaults, partial
arguments, globals the code reads), the input signature, opset, exporter and torch version. A cached entry
is used only when the sidecar parses, names this key, and the file's hash matches; then, once per process
(per session), the graph is run on the call's inputs and compared with one eager run of the current ``fn`` on
CPU copies of them (that run is the price of a disk hit), which catches state the key cannot see (non-tensor
attributes of captured objects) and a foreign file that came with its own sidecar. Any
failure is logged and the entry is rebuilt and rewritten, so the next process gets a good hit. Files are
written atomically (temporary file + rename), and the temporary file is removed when writing fails.
"""
from __future__ import annotations

import enum
import functools
import hashlib
import inspect
import io
import json
import os
import sys
import threading
import time
import types
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

from .._log import first_line, log_once, logger
from ._tree import Slot, flatten, unflatten
from .placement import ReplicaCache, ReplicaMode, callable_key, reach, tensor_fingerprint, weights_fingerprint

EXPORTERS = ("torchscript", "dynamo", "auto")

_TORCH_TO_NUMPY = {
    torch.float32: "float32", torch.float16: "float16", torch.float64: "float64", torch.int64: "int64",
    torch.int32: "int32", torch.int16: "int16", torch.int8: "int8", torch.uint8: "uint8", torch.bool: "bool",
}
_ORT_TYPE_TO_TORCH = {
    "tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(double)": torch.float64,
    "tensor(int64)": torch.int64, "tensor(int32)": torch.int32, "tensor(int16)": torch.int16,
    "tensor(int8)": torch.int8, "tensor(uint8)": torch.uint8, "tensor(bool)": torch.bool,
    "tensor(bfloat16)": torch.bfloat16,
}
# providers whose memory torch can point at directly, and the torch device type they use
_BINDABLE = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda"}


class OnnxExportError(RuntimeError):
    """``fn`` could not be exported to ONNX, or its graph does not reproduce it (the message says why)."""


class OnnxDataDependentError(OnnxExportError):
    """``fn`` turns a tensor computed from its inputs into a Python value, which tracing would freeze."""


# -- the tracing guard: which Python values come from the inputs' data ------------------------------------
_DATA, _SIZE = 1, 2  # flags: the values depend on the inputs' data / the shape depends on it

# metadata that does not depend on the data (shape-like ones are handled by _SHAPE_META)
_META = frozenset({
    "dim", "ndimension", "ndim", "dtype", "device", "is_cuda", "is_cpu", "is_meta", "layout", "requires_grad",
    "is_leaf", "grad_fn", "names", "has_names", "is_floating_point", "is_complex", "is_signed", "get_device",
    "data_ptr", "element_size", "itemsize", "is_contiguous", "is_pinned", "is_shared", "is_quantized",
    "is_sparse", "is_mkldnn", "is_nested", "is_inference", "storage_offset", "__hash__", "_version",
    "is_conj", "is_neg", "__repr__", "__str__", "__format__",
})
# metadata that reports sizes: data-dependent exactly when the size is
_SHAPE_META = frozenset({"size", "shape", "numel", "nelement", "__len__", "stride", "is_same_size", "nbytes"})
# ops whose output size depends on the input values
_DATA_SIZED = frozenset({
    "nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "_unique", "_unique2", "bincount",
    "repeat_interleave",
})
# ops that build a size from an integer argument (a 0-dim input-derived int tensor there sizes the output)
_SIZED_BY_ARG = frozenset({
    "arange", "range", "zeros", "ones", "empty", "full", "new_zeros", "new_ones", "new_empty", "new_full",
    "narrow", "view", "reshape", "expand", "repeat", "tile", "linspace", "logspace", "eye", "split",
    "tensor_split", "chunk", "unflatten", "topk", "randn", "rand", "randint",
})
# ops returning as many tensors as a size says (Tensor.__iter__ is unbind(0) and skips __torch_function__)
_COUNTED_BY_SIZE = frozenset({"unbind", "split", "split_with_sizes", "unsafe_split", "chunk", "tensor_split"})
_RANDOM = frozenset({
    "rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "randperm", "normal", "normal_",
    "uniform_", "bernoulli", "bernoulli_", "multinomial", "exponential_", "geometric_", "cauchy_",
    "log_normal_", "random_", "poisson", "binomial", "rrelu", "rrelu_", "gumbel_softmax", "_standard_gamma",
    "_sample_dirichlet",
})
_DROPOUT = frozenset({"dropout", "dropout_", "alpha_dropout", "alpha_dropout_", "feature_alpha_dropout",
                      "feature_alpha_dropout_", "feature_dropout", "feature_dropout_", "dropout1d", "dropout2d",
                      "dropout3d"})
_CONVERSIONS = {
    "__bool__": "a tensor used as a Python bool (if/while/and/or/assert on it)",
    "item": ".item()",
    "__float__": "float() of a tensor",
    "__int__": "int() of a tensor",
    "__index__": "a tensor used as a Python int (index, range, size)",
    "__complex__": "complex() of a tensor",
    "tolist": ".tolist()",
    "numpy": ".numpy()",
    "__array__": "a NumPy conversion",
    "__len__": "len() of a tensor whose size depends on the input data",
    "__iter__": "iterating over a tensor whose length depends on the input data",
    "unbind": "iterating over (or unbinding) a tensor whose length depends on the input data",
    "split": "splitting a tensor whose size depends on the input data",
    "split_with_sizes": "splitting a tensor whose size depends on the input data",
    "unsafe_split": "splitting a tensor whose size depends on the input data",
    "chunk": "chunking a tensor whose size depends on the input data",
    "tensor_split": "splitting a tensor whose size depends on the input data",
}
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_THIS_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _func_name(func: Any) -> str:
    name = getattr(func, "__name__", "") or ""
    if name in ("__get__", "__set__"):  # a Tensor property (shape, T, data, ...): the descriptor has the name
        name = getattr(getattr(func, "__self__", None), "__name__", name) or name
    return name


def _tensors(obj: Any, depth: int = 0) -> List[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    out: List[torch.Tensor] = []
    if depth < 3 and isinstance(obj, (list, tuple)):
        for x in obj:
            out.extend(_tensors(x, depth + 1))
    elif depth < 3 and isinstance(obj, dict):
        for x in obj.values():
            out.extend(_tensors(x, depth + 1))
    elif isinstance(obj, slice):
        out.extend(x for x in (obj.start, obj.stop, obj.step) if isinstance(x, torch.Tensor))
    return out


def _arg(args: Tuple[Any, ...], kwargs: Dict[str, Any], index: int, names: Sequence[str], default: Any) -> Any:
    for n in names:
        if n in kwargs:
            return kwargs[n]
    return args[index] if len(args) > index else default


def _draws_random(name: str, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> bool:
    if name in _RANDOM:
        return True
    try:
        if name in _DROPOUT:
            return bool(_arg(args, kwargs, 2, ("training", "train"), True)) and float(
                _arg(args, kwargs, 1, ("p",), 0.5)) > 0
        if name == "scaled_dot_product_attention":
            return float(_arg(args, kwargs, 4, ("dropout_p",), 0.0)) > 0
    except (TypeError, ValueError, RuntimeError):
        return True  # cannot tell: do not compare values
    return False


def _where_in_user_code() -> str:
    """``file:line (in function)`` of the innermost frame outside torch and this package's compute code."""
    frame = sys._getframe(2)
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if not path.startswith(_TORCH_DIR) and not path.startswith(_THIS_DIR):
            return f"{path}:{frame.f_lineno} (in {frame.f_code.co_name})"
        frame = frame.f_back
    return "an unknown place"


# aten-level names (inside library functions, see _Nested) of the ops above
_ATEN_DATA_SIZED = frozenset({"nonzero", "argwhere", "masked_select", "_unique", "_unique2", "unique_dim",
                              "unique_consecutive", "bincount", "repeat_interleave"})


class _Nested(TorchDispatchMode):
    """Follows the data flag through the ATen ops of one library function written in Python
    (``F.multi_head_attention_forward`` ...), whose own torch calls a ``TorchFunctionMode`` does not see;
    records Python values it takes from flagged tensors (``aten._local_scalar_dense``, ``aten.equal`` ...)."""

    def __init__(self, guard: "_Guard") -> None:
        super().__init__()
        self.guard = guard
        self.found: List[str] = []

    def __torch_dispatch__(self, func, _types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        guard = self.guard
        flags = guard._flags(args) | guard._flags(kwargs)
        if not flags:
            return out
        produced = _tensors(out)
        if produced:
            name = getattr(getattr(func, "overloadpacket", None), "__name__", "")
            new = _DATA | (flags & _SIZE)
            if name in _ATEN_DATA_SIZED or (name in ("index", "_index_put_impl_") and any(
                    t.dtype in (torch.bool, torch.uint8) and guard.flags.get(t, 0) & _DATA
                    for t in _tensors(args[1:]))):
                new |= _SIZE
            for t in produced:
                guard.mark(t, new)
        elif flags & _DATA and isinstance(out, (bool, int, float, complex)):
            self.found.append(_where_in_user_code())
        return out


class _Guard(TorchFunctionMode):
    """Active while the tracer runs ``fn``: follows which tensors come from the inputs' data and records every
    place that turns one into a Python value (those would be frozen into the traced graph).

    Flags per tensor (weakly keyed): ``_DATA`` (values computed from the inputs), ``_SIZE`` (its size depends
    on the input values). Shapes of ordinary tensors, weights, captured tensors and constants carry no flag:
    they are part of the cache key, so Python values taken from them are exact. Library functions written in
    Python that receive flagged tensors are followed op by op (:class:`_Nested`). Also notes random ops (their
    graphs can only be checked for structure).
    """

    def __init__(self) -> None:
        super().__init__()
        self.flags: Any = WeakIdKeyDictionary()
        self.violations: List[Tuple[str, str]] = []  # (what, where)
        self.random: List[str] = []

    def mark(self, t: torch.Tensor, flag: int) -> None:
        self.flags[t] = self.flags.get(t, 0) | flag

    def _flags(self, obj: Any) -> int:
        f = 0
        for t in _tensors(obj):
            f |= self.flags.get(t, 0)
        return f

    def _refuse(self, name: str, where: Optional[str] = None) -> None:
        what = _CONVERSIONS.get(name, f"{name}() returning a Python value")
        where = where or _where_in_user_code()
        if (what, where) not in self.violations:
            self.violations.append((what, where))

    def _sizes_output(self, name: str, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> bool:
        if name in _DATA_SIZED:
            return True
        if name == "where" and len(args) == 1 and not kwargs:
            return True
        if name in ("__getitem__", "index", "index_put", "index_put_"):  # x[mask], x[:n] with data mask / n
            return any(self.flags.get(t, 0) & _DATA and (t.dtype in (torch.bool, torch.uint8) or (
                t.dim() == 0 and not t.is_floating_point() and isinstance(i, slice)))
                for i in (args[1] if len(args) > 1 and isinstance(args[1], tuple) else args[1:])
                for t in _tensors(i))
        if name in _SIZED_BY_ARG:  # torch.arange(n), x.new_zeros(n), x.view(n, -1) with n computed from data
            return any(t.dim() == 0 and not t.is_floating_point() and self.flags.get(t, 0) & _DATA
                       for t in _tensors((args, kwargs)))
        return False

    def __torch_function__(self, func, _types, args=(), kwargs=None):  # noqa: C901 - one dispatch table
        kwargs = kwargs or {}
        name = _func_name(func)
        if _draws_random(name, args, kwargs):
            self.random.append(name)
        flags = self._flags(args) | self._flags(kwargs)
        if not flags:
            return func(*args, **kwargs)
        nested = None
        if isinstance(func, types.FunctionType) and name not in _META and name not in _SHAPE_META \
                and name not in _CONVERSIONS:
            nested = _Nested(self)  # a library function in Python: follow its ATen ops
            with nested:
                out = func(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        refused = False
        if name == "__iter__":  # (Tensor.__iter__ skips __torch_function__ today; unbind below covers it)
            items = list(out)
            for t in items:
                if isinstance(t, torch.Tensor):
                    self.mark(t, _DATA | (flags & _SIZE))
            if flags & _SIZE:
                self._refuse(name)
            return iter(items)
        if name in _SHAPE_META:
            if flags & _SIZE:
                inner = _tensors(out)
                if inner:  # while tracing, sizes are 0-dim tensors: they now carry the data dependence
                    for t in inner:
                        self.mark(t, _DATA)
                elif out is not None:
                    self._refuse(name)
                    refused = True
        elif name in _META or isinstance(out, str):
            pass
        elif name == "__setitem__" and args and isinstance(args[0], torch.Tensor):  # t[i] = data: t holds data now
            self.mark(args[0], _DATA | (flags & _SIZE))
        else:
            produced = _tensors(out)
            if flags & _SIZE and name in _COUNTED_BY_SIZE:
                self._refuse(name)
                refused = True
            if produced:
                new = _DATA | (flags & _SIZE)
                if self._sizes_output(name, args, kwargs):
                    new |= _SIZE
                for t in produced:
                    self.mark(t, new)
            elif flags & _DATA and isinstance(out, (bool, int, float, complex, list)) or (
                    flags & _DATA and type(out).__module__ == "numpy"):
                self._refuse(name)
                refused = True
        if nested is not None and nested.found and not refused:
            for where in nested.found:
                what = f"a tensor turned into a Python value inside {name}()"
                if (what, where) not in self.violations:
                    self.violations.append((what, where))
        return out


def _template_key(template: Any) -> Any:
    """Hashable form of an argument template (tensors already replaced by Slots)."""
    if isinstance(template, Slot):
        return ("T", template.index)
    if isinstance(template, list):
        return ("L",) + tuple(_template_key(x) for x in template)
    if isinstance(template, tuple):
        return ("U", type(template).__qualname__) + tuple(_template_key(x) for x in template)
    if isinstance(template, dict):
        return ("D",) + tuple((k, _template_key(v)) for k, v in template.items())
    try:
        hash(template)
    except TypeError:
        raise TypeError(f"non-tensor arguments of a function run on ONNX are baked into the graph and must be "
                        f"hashable; got {type(template).__name__}") from None
    return ("V", type(template).__qualname__, template)


def _json_template(template: Any) -> Any:
    if isinstance(template, Slot):
        return {"slot": template.index}
    if isinstance(template, list):
        return {"list": [_json_template(x) for x in template]}
    if isinstance(template, tuple):
        return {"tuple": [_json_template(x) for x in template]}
    if isinstance(template, dict) and all(isinstance(k, str) for k in template):
        return {"dict": {k: _json_template(v) for k, v in template.items()}}
    if template is None or isinstance(template, (bool, int, float, str)):
        return {"value": template}
    raise TypeError(f"cannot store {type(template).__name__} in the ONNX cache sidecar")


def _from_json_template(obj: Dict[str, Any]) -> Any:
    if "slot" in obj:
        return Slot(obj["slot"])
    if "list" in obj:
        return [_from_json_template(x) for x in obj["list"]]
    if "tuple" in obj:
        return tuple(_from_json_template(x) for x in obj["tuple"])
    if "dict" in obj:
        return {k: _from_json_template(v) for k, v in obj["dict"].items()}
    return obj["value"]


def _check_template(template: Any, n: int) -> None:
    """Raise ValueError unless ``template`` uses each of the slots ``0..n-1`` exactly once."""
    found: List[int] = []

    def walk(obj: Any) -> None:
        if isinstance(obj, Slot):
            found.append(obj.index)
        elif isinstance(obj, (list, tuple)):
            for x in obj:
                walk(x)
        elif isinstance(obj, dict):
            for x in obj.values():
                walk(x)

    walk(template)
    if sorted(found) != list(range(n)):
        raise ValueError(f"the output template places tensors {sorted(found)}, expected 0..{n - 1}")


def _hash_code(h: "hashlib._Hash", code: types.CodeType) -> None:
    h.update(code.co_code)
    h.update(repr(code.co_names).encode())
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _hash_code(h, const)
        else:
            h.update(repr(const).encode())


def _hash_tensor(h: "hashlib._Hash", t: torch.Tensor) -> None:
    h.update(str((tuple(t.shape), t.dtype)).encode())
    try:
        data = t.detach().to("cpu").contiguous()
        if data.dtype == torch.bfloat16:
            data = data.view(torch.int16)
        h.update(data.numpy().tobytes())
    except Exception as exc:  # noqa: BLE001 - sparse/nested/subclass tensors: type and shape only (logged)
        h.update(f"unreadable:{type(t).__qualname__}:{type(exc).__name__}".encode())


def _hash_captured(h: "hashlib._Hash", value: Any) -> None:
    """Simple constants by value; anything else by type (its tensors are hashed by content elsewhere)."""
    if value is None or isinstance(value, (bool, int, float, str, tuple)):
        h.update(repr(value).encode())
    elif isinstance(value, torch.Tensor):
        _hash_tensor(h, value)
    else:
        h.update(type(value).__qualname__.encode())


_SIMPLE = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, enum.Enum)


def _is_simple(value: Any, depth: int = 0) -> bool:
    if isinstance(value, _SIMPLE):
        return True
    if isinstance(value, (tuple, frozenset)) and depth < 2 and len(value) <= 64:
        return all(_is_simple(v, depth + 1) for v in value)
    return False


@functools.lru_cache(maxsize=4096)
def _names_read(code: types.CodeType) -> Tuple[str, ...]:
    """Global/attribute names a code object (and the code nested in it) uses, in order, once each."""
    names = list(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names.extend(_names_read(const))
    return tuple(dict.fromkeys(names))


def _globals_read(fn: Any, max_depth: int = 3) -> Tuple[Tuple[str, Any], ...]:
    """What fn's code reads from module globals that tracing bakes in without it being a tensor or a model:
    simple constants (``S = 2``; numbers, strings, enums, dtypes, tuples of those) as ``(name, value)``, and
    helper functions of the same module (followed through globals and closure cells) as ``(name, code)``,
    whose own globals are read too. Tensors and models there are found and keyed by :func:`reach`."""
    out: List[Tuple[str, Any]] = []
    seen: set = set()

    def visit(f: Any, depth: int) -> None:
        while isinstance(f, (functools.partial, types.MethodType)):
            f = f.func if isinstance(f, functools.partial) else f.__func__
        if isinstance(f, nn.Module):
            f = getattr(type(f).forward, "__func__", type(f).forward)
        if not isinstance(f, types.FunctionType) or id(f) in seen or depth > max_depth:
            return
        seen.add(id(f))
        module = getattr(f, "__module__", None)
        if depth:
            out.append((f"{module}.{f.__qualname__}", f.__code__))
        g = f.__globals__
        for name in _names_read(f.__code__):
            if name not in g:
                continue
            value = g[name]
            if _is_simple(value):
                out.append((f"{module}.{name}", value))
            elif isinstance(value, types.FunctionType) and value.__module__ == module:
                visit(value, depth + 1)
        for cell in f.__closure__ or ():
            try:
                value = cell.cell_contents
            except ValueError:
                continue
            if isinstance(value, (types.FunctionType, functools.partial, types.MethodType)):
                visit(value, depth + 1)

    visit(fn, 0)
    return tuple(out)


def _globals_key(read: Tuple[Tuple[str, Any], ...]) -> Tuple[Any, ...]:
    """Hashable, equality-safe form of :func:`_globals_read` for the in-memory key (NaN == NaN by repr)."""
    return tuple((name, value) if isinstance(value, types.CodeType) else (name, type(value).__qualname__,
                                                                             repr(value))
                 for name, value in read)


CACHE_FORMAT = "genesis-onnx-cache-2"  # bump when the sidecar or the key changes meaning


def _disk_key(fn: Any, modules: List[nn.Module], signature: Any, extra: Tuple[Any, ...],
              tensors: Sequence[torch.Tensor] = ()) -> Tuple[str, str]:
    """``(readable name, sha256 hex)`` that is stable across processes.

    Covers fn's code, what its closure cells, defaults and partial arguments hold (constants by value,
    other objects by type), the globals its code reads (:func:`_globals_read`: constants by value, helper
    functions by code), the captured models (class, architecture, forward code, mode, weight contents), the
    contents of every other reachable tensor (``tensors``, in walk order), the signature and ``extra``.
    """
    h = hashlib.sha256()
    h.update(CACHE_FORMAT.encode())
    target = fn.forward if isinstance(fn, nn.Module) else fn
    partial_parts: List[Any] = []
    if isinstance(target, functools.partial):
        partial_parts = list(target.args) + sorted((target.keywords or {}).items())
        target = target.func
    inner = getattr(target, "__func__", target)  # bound method
    name = getattr(inner, "__qualname__", type(fn).__name__)
    h.update(f"{getattr(inner, '__module__', '')}.{name}".encode())
    code = getattr(inner, "__code__", None)
    if code is not None:
        _hash_code(h, code)
    for cell in getattr(inner, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:
            continue
        _hash_captured(h, value)
    h.update(b"defaults")
    for value in getattr(inner, "__defaults__", None) or ():
        _hash_captured(h, value)
    for kw, value in sorted((getattr(inner, "__kwdefaults__", None) or {}).items()):
        h.update(kw.encode())
        _hash_captured(h, value)
    h.update(b"partial")
    for value in partial_parts:
        _hash_captured(h, value)
    h.update(b"globals")
    for gname, value in _globals_read(fn):
        h.update(gname.encode())
        if isinstance(value, types.CodeType):
            _hash_code(h, value)
        else:
            h.update(f"{type(value).__qualname__}:{value!r}".encode())
    for m in modules:
        h.update(f"{type(m).__module__}.{type(m).__qualname__}".encode())
        h.update(repr(m).encode())
        fwd = getattr(type(m).forward, "__code__", None)
        if fwd is not None:
            _hash_code(h, fwd)
        h.update(str(m.training).encode())
        for pname, t in list(m.named_parameters()) + list(m.named_buffers()):
            h.update(pname.encode())
            _hash_tensor(h, t)
    h.update(b"tensors")
    for t in tensors:
        _hash_tensor(h, t)
    h.update(repr(signature).encode())
    h.update(repr(extra).encode())
    h.update(torch.__version__.encode())
    safe = "".join(c if c.isalnum() or c in "_-" else "_" for c in name)[:60]
    return safe, h.hexdigest()


def name_of(fn: Any) -> str:
    """A readable name for a callable (for logs and errors)."""
    return getattr(fn, "__qualname__", None) or type(fn).__name__


class _Flat(nn.Module):
    """Export wrapper: flat tensors in, flat tensors out; remembers the output structure and, with a guard, the
    outputs ``fn`` returned while being traced (the reference the new graph is checked against)."""

    def __init__(self, fn: Any, template: Any, guard: Optional[_Guard] = None) -> None:
        super().__init__()
        object.__setattr__(self, "fn", fn)  # not a submodule: export must not touch its training mode
        object.__setattr__(self, "guard", guard)
        self.template = template
        self.out_template: Any = None
        self.out_meta: List[Tuple[Tuple[int, ...], torch.dtype]] = []
        self.traced: Optional[List[torch.Tensor]] = None

    def forward(self, *flat: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        args, kwargs = unflatten(self.template, list(flat))
        guard = self.guard
        if guard is None:
            result = self.fn(*args, **kwargs)
        else:
            for t in flat:
                guard.mark(t, _DATA)
            with guard:
                result = self.fn(*args, **kwargs)
        outs, self.out_template = flatten(result)
        self.out_meta = [(tuple(int(s) for s in t.shape), t.dtype) for t in outs]
        if guard is not None:
            self.traced = list(outs)
        return tuple(outs)


_TOLERANCE = {torch.float16: 2e-2, torch.bfloat16: 2e-2}


def _describe(t: torch.Tensor) -> str:
    return f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}"


def _difference(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor], values: bool = True) -> Optional[str]:
    """None when the graph's outputs ``got`` match fn's ``want``; else a sentence saying where they differ.

    Float outputs may differ by 1e-3 of their largest finite magnitude (2e-2 for 16-bit types), the usual
    kernel-order noise between ONNX Runtime and PyTorch; NaN and infinities must sit in the same places;
    other dtypes must be equal. ``values=False`` compares count, shapes and dtypes only.
    """
    if len(got) != len(want):
        return f"the graph has {len(got)} outputs but the function returned {len(want)} tensors"
    for i, (g, w) in enumerate(zip(got, want)):
        g, w = g.detach().to("cpu"), w.detach().to("cpu")
        if tuple(g.shape) != tuple(w.shape) or g.dtype != w.dtype:
            return f"output {i} is {_describe(g)} from the graph but {_describe(w)} from the function"
        if not values or w.numel() == 0:
            continue
        if not (w.is_floating_point() or w.is_complex()):
            bad = int((g != w).sum())
            if bad:
                return f"output {i} differs in {bad} of {w.numel()} elements"
            continue
        gd, wd = g.double(), w.double()
        if not torch.equal(torch.isnan(gd), torch.isnan(wd)):
            return f"output {i} differs: NaN in {int((torch.isnan(gd) ^ torch.isnan(wd)).sum())} places where the " \
                   f"other has a number"
        finite = torch.isfinite(wd)
        if not torch.equal(torch.isfinite(gd), finite) or not torch.equal(gd[torch.isinf(wd)], wd[torch.isinf(wd)]):
            return f"output {i} differs: infinities in different places"
        if finite.any():
            err = (gd[finite] - wd[finite]).abs().max().item()
            scale = wd[finite].abs().max().item()
            tol = _TOLERANCE.get(w.dtype, 1e-3)
            if not err <= tol * scale + tol * 1e-3:
                return f"output {i} differs by up to {err:.3g} (largest magnitude {scale:.3g}, allowed {tol:g} of it)"
    return None


@dataclass
class _Compiled:
    session: Any
    input_index: List[Tuple[str, int]]  # (session input name, index into the flat inputs)
    output_names: List[str]
    out_template: Any
    out_meta: List[Tuple[Tuple[int, ...], torch.dtype]]
    keepalive: Tuple[Any, ...] = ()
    source: str = "export"
    bindable: bool = True


@dataclass
class OnnxStats:
    """Counters one runner keeps (thread-safe updates under the runner's lock)."""

    exports: int = 0
    export_s: float = 0.0
    disk_hits: int = 0
    session_hits: int = 0
    sessions: int = 0
    last_export_s: float = 0.0
    extra: Dict[str, Any] = field(default_factory=dict)


def default_device_for(providers: Sequence[Union[str, Tuple[str, Dict[str, Any]]]],
                       provider_options: Optional[Sequence[Dict[str, Any]]] = None) -> torch.device:
    """Where torch tensors should live for the first provider: ``cuda:<device_id>`` for CUDA/TensorRT, else CPU."""
    if not providers:
        return torch.device("cpu")
    first = providers[0]
    name = first[0] if isinstance(first, tuple) else first
    opts = first[1] if isinstance(first, tuple) else (provider_options[0] if provider_options else {}) or {}
    if _BINDABLE.get(name) == "cuda":
        return torch.device("cuda", int(opts.get("device_id", 0)))
    return torch.device("cpu")


class OnnxRunner:
    """Exports functions, caches ONNX Runtime sessions, runs them on torch tensors.

    Args:
        providers: ONNX Runtime execution providers in priority order (names, or ``(name, options)``).
        provider_options: per-provider option dicts, parallel to ``providers`` (when given as names).
        device: torch device for inputs/outputs; default from the first provider (CUDA EP → ``cuda:<id>``).
        cache_dir: keep exported ``.onnx`` files here and reuse them across processes (optional).
        opset_version: ONNX opset (default: the exporter's own default).
        exporter: ``"torchscript"`` (default), ``"dynamo"`` or ``"auto"`` (see module docstring).
        max_sessions: in-memory LRU size.
        log_severity: ONNX Runtime log level (3 = errors only).
        session_config: extra ``SessionOptions`` config entries. Default turns intra-op spinning off:
            ONNX Runtime's threads otherwise busy-wait after each run and steal the cores PyTorch work
            running beside them needs (measured on a 2-core box: a PyTorch cross-attention interleaved
            with ORT calls went from 5.6 ms to 9.8 ms with spinning on; ORT's own latency barely moved).
    """

    _genesis_opaque = True  # model discovery does not search runners (their caches hold other models)

    def __init__(self, providers: Sequence[Union[str, Tuple[str, Dict[str, Any]]]] = ("CPUExecutionProvider",),
                 provider_options: Optional[Sequence[Dict[str, Any]]] = None,
                 device: Optional[torch.device] = None, cache_dir: Optional[Union[str, os.PathLike]] = None,
                 opset_version: Optional[int] = None, exporter: str = "torchscript", max_sessions: int = 32,
                 log_severity: int = 3, session_config: Optional[Dict[str, str]] = None) -> None:
        if exporter not in EXPORTERS:
            raise ValueError(f"exporter must be one of {', '.join(EXPORTERS)}; got {exporter!r}")
        if int(max_sessions) < 1:
            raise ValueError(f"max_sessions must be >= 1; got {max_sessions}")
        self.providers = list(providers)
        self.provider_options = list(provider_options) if provider_options is not None else None
        self.device = torch.device(device) if device is not None else default_device_for(self.providers,
                                                                                       self.provider_options)
        self.cache_dir = os.fspath(cache_dir) if cache_dir is not None else None
        self.opset_version = opset_version
        self.exporter = exporter
        self.max_sessions = int(max_sessions)
        self.log_severity = int(log_severity)
        self.session_config = {"session.intra_op.allow_spinning": "0", **(session_config or {})}
        self.stats = OnnxStats()
        self._sessions: "OrderedDict[Any, _Compiled]" = OrderedDict()
        self._lock = threading.Lock()
        self._export_lock = threading.Lock()
        self._replicas = ReplicaCache()
        first = self.providers[0] if self.providers else "CPUExecutionProvider"
        first_name = first[0] if isinstance(first, tuple) else first
        self._bind_device_type = _BINDABLE.get(first_name)
        if self._bind_device_type is not None and self._bind_device_type != self.device.type:
            self._bind_device_type = None

    # -- public -------------------------------------------------------------------------------------
    def run(self, fn: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        """Run ``fn(*args, **kwargs)`` in ONNX Runtime; outputs are torch tensors on ``self.device``."""
        flat, template = flatten((tuple(args), dict(kwargs)))
        compiled, outs = self._compiled(fn, flat, template)
        if outs is None:
            outs = self._run_session(compiled, flat)
        return unflatten(compiled.out_template, outs)

    def clear(self) -> None:
        """Drop every cached session (files in ``cache_dir`` stay)."""
        with self._lock:
            self._sessions.clear()
            self.stats.sessions = 0

    # -- sessions -----------------------------------------------------------------------------------
    def compiled_for(self, fn: Any, flat: List[torch.Tensor], template: Any) -> _Compiled:
        """The cached session for this call signature, exporting (and checking) on a miss.

        The key holds fn's identity, the input signature, the captured models' weights fingerprint, a
        fingerprint of every other tensor fn can reach (closure cells, defaults, attributes of captured
        objects, globals) and the simple constants among the globals fn's code reads: tracing bakes those
        into the graph as constants, so modifying one in place, re-pointing an attribute to a new tensor or
        assigning a new value to a global must give a new export, not the old numbers.
        """
        return self._compiled(fn, flat, template)[0]

    def _compiled(self, fn: Any, flat: List[torch.Tensor], template: Any
                  ) -> Tuple[_Compiled, Optional[List[torch.Tensor]]]:
        """``(session, outputs)``: outputs are this call's results when a new session was checked on them."""
        fkey, keep = callable_key(fn)
        found = reach(fn)
        modules = found.modules
        tensors_fp, unkeyable = tensor_fingerprint(found.tensors)
        signature = (tuple((tuple(t.shape), t.dtype) for t in flat), _template_key(template))
        key = (fkey, signature, weights_fingerprint(modules), tensors_fp, _globals_key(_globals_read(fn)))
        with self._lock:
            hit = self._sessions.get(key)
            if hit is not None:
                self._sessions.move_to_end(key)
                self.stats.session_hits += 1
                return hit, None
        with self._export_lock:  # exports are rare; one at a time, and never twice for one key
            with self._lock:
                hit = self._sessions.get(key)
                if hit is not None:
                    self.stats.session_hits += 1
                    return hit, None
            label = name_of(fn)
            for what in unkeyable:
                log_once(("onnx-unkeyed-tensor", label, what),
                         f"ONNX export of {label}: a captured tensor ({what}) cannot be fingerprinted; its current "
                         f"value is baked into the exported graph and later changes to it are not seen "
                         f"(runner.clear() forces a new export)")
            for what in found.unkeyed:
                log_once(("onnx-unkeyed", label, what),
                         f"ONNX export of {label}: the cache key does not look into {what}; tensors there are baked "
                         f"into the exported graph and later changes to them are not seen (runner.clear() forces "
                         f"a new export)", level=20)
            compiled, outs = self._load_or_export(fn, modules, flat, template, signature, found.tensors)
            # the key holds ids: keep those objects (and the reachable tensors) alive while the entry lives,
            # so a new object cannot reuse an id and hit a stale session
            compiled.keepalive = keep + tuple(found.tensors)
            with self._lock:
                self._sessions[key] = compiled
                while len(self._sessions) > self.max_sessions:
                    self._sessions.popitem(last=False)
                self.stats.sessions = len(self._sessions)
            return compiled, outs

    def _session(self, model: Union[bytes, str]) -> Any:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = self.log_severity
        for key, value in self.session_config.items():
            so.add_session_config_entry(key, str(value))
        kwargs: Dict[str, Any] = {"providers": self.providers}
        if self.provider_options is not None:
            kwargs["provider_options"] = self.provider_options
        session = ort.InferenceSession(model, sess_options=so, **kwargs)
        active = session.get_providers()
        with self._lock:
            self.stats.extra["active_providers"] = active
        wanted = self.providers[0][0] if isinstance(self.providers[0], tuple) else self.providers[0]
        if active and active[0] != wanted:
            log_once(("onnx-provider-fallback", wanted), f"ONNX Runtime could not start {wanted}; this session "
                                                         f"runs on {', '.join(active)}")
        return session

    def _load_or_export(self, fn: Any, modules: List[nn.Module], flat: List[torch.Tensor], template: Any,
                        signature: Any, tensors: Sequence[torch.Tensor] = ()
                        ) -> Tuple[_Compiled, List[torch.Tensor]]:
        """A checked session and its outputs for ``flat``: from the disk cache when a valid entry reproduces
        the current fn, else from a new export (written to the cache)."""
        paths = digest = None
        if self.cache_dir is not None:
            name, digest = _disk_key(fn, modules, signature, (self.opset_version, self.exporter), tensors)
            base = os.path.join(self.cache_dir, f"{name}-{digest[:24]}")
            paths = (base + ".onnx", base + ".json")
            if os.path.exists(paths[0]) or os.path.exists(paths[1]):
                loaded = self._load_cached(fn, modules, flat, template, paths, digest)
                if loaded is not None:
                    with self._lock:
                        self.stats.disk_hits += 1
                    return loaded
        t0 = time.perf_counter()
        model_bytes, wrapper, reference, random_ops = self._export(fn, modules, flat, template, tensors)
        dt = time.perf_counter() - t0
        with self._lock:
            self.stats.exports += 1
            self.stats.export_s += dt
            self.stats.last_export_s = dt
        logger.debug("exported %s to ONNX in %.3f s", name_of(fn), dt)
        try:
            out_template_json = _json_template(wrapper.out_template)
        except TypeError:
            out_template_json = None
        try:
            session = self._session(model_bytes)
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime's own error types
            raise OnnxExportError(f"ONNX Runtime cannot load the graph exported from {name_of(fn)} "
                                  f"({first_line(exc, 300)}); run {name_of(fn)} on the cpu backend") from exc
        compiled = self._compile(session, len(flat), out_template_json, wrapper.out_meta, "export",
                                 raw_template=wrapper.out_template)
        outs = self._run_session(compiled, flat)  # the first call's result, and the check of the new graph
        problem = _difference(outs, reference, values=not random_ops)
        if problem is not None:
            raise OnnxExportError(
                f"the ONNX graph exported from {name_of(fn)} does not reproduce {name_of(fn)} on the inputs it was "
                f"traced with: {problem}. {wrapper.mutation_hint}The graph is not used; run {name_of(fn)} on the "
                f"cpu backend, or make its result depend only on its inputs, weights and constants.")
        for key, note in wrapper.mutation_notes:
            log_once(key, note)
        if random_ops:
            log_once(("onnx-random", name_of(fn)),
                     f"ONNX export of {name_of(fn)}: it draws random numbers ({', '.join(sorted(set(random_ops)))}), "
                     f"so its graph was checked for output shapes and dtypes only, not values", level=20)
        if paths is not None and out_template_json is not None:
            self._write_cache(paths, model_bytes, out_template_json, wrapper.out_meta, digest, bool(random_ops))
        elif paths is not None:
            log_once(("onnx-cache-template", paths[0]), "the function's outputs hold values that cannot be "
                                                        "stored in the ONNX disk cache; caching in memory only")
        return compiled, outs

    def _load_cached(self, fn: Any, modules: List[nn.Module], flat: List[torch.Tensor], template: Any,
                     paths: Tuple[str, str], digest: str) -> Optional[Tuple[_Compiled, List[torch.Tensor]]]:
        """The cached entry's session and outputs, or None (logged) when the entry is unusable or stale."""
        label = name_of(fn)
        try:
            with open(paths[1], "r", encoding="utf-8") as fh:
                meta = json.load(fh)
            if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT or meta.get("key") != digest:
                raise ValueError(f"the sidecar {os.path.basename(paths[1])} does not describe this entry (written "
                                 f"by another Genesis version, or for another key)")
            with open(paths[0], "rb") as fh:
                model_bytes = fh.read()
            if hashlib.sha256(model_bytes).hexdigest() != meta.get("onnx_sha256"):
                raise ValueError(f"the content of {os.path.basename(paths[0])} is not the graph its sidecar "
                                 f"describes (sha256 differs)")
            out_meta = [(tuple(int(d) for d in shape), getattr(torch, dtype)) for shape, dtype in meta["out_meta"]]
            if not all(isinstance(d, torch.dtype) for _, d in out_meta):
                raise ValueError("the sidecar names an unknown dtype")
            compiled = self._compile(self._session(model_bytes), len(flat), meta["out_template"], out_meta, "disk")
            outs = self._run_session(compiled, flat)
        except Exception as exc:  # noqa: BLE001 - a broken cache entry is rebuilt, never fatal
            log_once(("onnx-cache-corrupt", paths[0], type(exc).__name__),
                     f"ignoring unreadable ONNX cache entry {paths[0]} ({type(exc).__name__}: {exc}); exporting "
                     f"{label} again and rewriting it")
            return None
        try:  # once per process and session: the cached graph must reproduce the current fn
            reference, ref_template, random_ops = self._eager_reference(fn, modules, flat, template)
            problem = None
            if _json_template(ref_template) != meta["out_template"]:
                problem = "the function's outputs are structured differently"
            problem = problem or _difference(outs, reference, values=not random_ops)
        except Exception as exc:  # noqa: BLE001 - fn itself failing eagerly: the export will say it again
            problem = f"{label} could not be run to check it ({type(exc).__name__}: {exc})"
        if problem is not None:
            log_once(("onnx-cache-stale", paths[0]),
                     f"the cached ONNX graph {paths[0]} does not reproduce {label} as it is now ({problem}): state "
                     f"the cache key cannot see has changed, or the file belongs to another function; exporting "
                     f"{label} again and rewriting it")
            return None
        if random_ops:
            log_once(("onnx-random-cached", label),
                     f"cached ONNX graph of {label}: it draws random numbers, so the cached graph was checked for "
                     f"output shapes and dtypes only, not values", level=20)
        return compiled, outs

    def _eager_reference(self, fn: Any, modules: List[nn.Module], flat: List[torch.Tensor], template: Any
                         ) -> Tuple[List[torch.Tensor], Any, List[str]]:
        """fn's outputs on CPU copies of ``flat``, run the way the export traces it (no grad, CPU replicas of
        models on other devices): ``(outputs, output template, random ops seen)``."""
        cpu = torch.device("cpu")
        example = tuple(t.detach().to(cpu, copy=True) for t in flat)
        guard = _Guard()
        wrapper = _Flat(fn, template, guard)
        view = self._replicas.view(modules, cpu)
        with torch.no_grad():
            mode = ReplicaMode(view) if view else None
            if mode is not None:
                mode.__enter__()
            try:
                outs = list(wrapper(*example))
            finally:
                if mode is not None:
                    mode.__exit__(None, None, None)
        return outs, wrapper.out_template, guard.random

    def _write_cache(self, paths: Tuple[str, str], model_bytes: bytes, out_template_json: Any,
                     out_meta: List[Tuple[Tuple[int, ...], torch.dtype]], digest: str, random_ops: bool) -> None:
        meta = {"format": CACHE_FORMAT, "key": digest, "onnx_sha256": hashlib.sha256(model_bytes).hexdigest(),
                "out_template": out_template_json, "random": random_ops,
                "out_meta": [[list(s), str(d).replace("torch.", "")] for s, d in out_meta]}
        tmp = None
        try:
            os.makedirs(self.cache_dir, exist_ok=True)
            # the graph first: a reader that sees the new sidecar with the old graph (or the reverse) finds the
            # hashes differ and rebuilds
            for path, data in ((paths[0], model_bytes), (paths[1], json.dumps(meta).encode())):
                tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
                with open(tmp, "wb") as fh:
                    fh.write(data)
                os.replace(tmp, path)  # atomic: readers see the old file or the new one, never half
                tmp = None
        except OSError as exc:
            log_once(("onnx-cache-write", self.cache_dir), f"could not write the ONNX cache in {self.cache_dir}: {exc}")
        finally:
            if tmp is not None:
                try:
                    os.remove(tmp)
                except OSError:
                    pass

    def _compile(self, session: Any, n_inputs: int, out_template_json: Any,
                 out_meta: List[Tuple[Tuple[int, ...], torch.dtype]], source: str,
                 raw_template: Any = None) -> _Compiled:
        input_index = []
        for inp in session.get_inputs():
            if not inp.name.startswith("in") or not inp.name[2:].isdigit() or int(inp.name[2:]) >= n_inputs:
                raise OnnxExportError(f"unexpected ONNX graph input {inp.name!r} (expected in0..in{n_inputs - 1})")
            input_index.append((inp.name, int(inp.name[2:])))
        outputs = session.get_outputs()
        if len(outputs) != len(out_meta):
            raise OnnxExportError(f"the ONNX graph has {len(outputs)} outputs but the function returned "
                                  f"{len(out_meta)} tensors")
        static = []
        for i, (o, (shape, dtype)) in enumerate(zip(outputs, out_meta)):
            if _ORT_TYPE_TO_TORCH.get(o.type, dtype) != dtype:
                raise OnnxExportError(f"ONNX graph output {i} is {o.type}, but the function returned "
                                      f"{str(dtype).replace('torch.', '')}")
            dims = list(o.shape) if o.shape is not None else None
            fixed = dims is not None and all(isinstance(d, int) for d in dims)
            if fixed and tuple(dims) != tuple(shape):
                raise OnnxExportError(f"ONNX graph output {i} has shape {dims}, but the function returned "
                                      f"{list(shape)}")
            static.append(fixed)  # data-dependent sizes (x[x > 0]): let ONNX Runtime allocate the output
        first = self.providers[0][0] if isinstance(self.providers[0], tuple) else self.providers[0]
        bindable = self._bind_device_type is not None and session.get_providers()[:1] == [first] and all(
            _ORT_TYPE_TO_TORCH.get(o.type) == dtype and dtype in _TORCH_TO_NUMPY and all(shape) and fixed
            for o, (shape, dtype), fixed in zip(outputs, out_meta, static))
        template = raw_template if raw_template is not None else _from_json_template(out_template_json)
        _check_template(template, len(out_meta))
        return _Compiled(session, input_index, [o.name for o in outputs], template, list(out_meta),
                         source=source, bindable=bindable)

    def _export(self, fn: Any, modules: List[nn.Module], flat: List[torch.Tensor], template: Any,
                tensors: Sequence[torch.Tensor] = ()) -> Tuple[bytes, _Flat, List[torch.Tensor], List[str]]:
        """``(model bytes, wrapper, reference outputs, random ops)``: fn exported from copies of the inputs,
        refused when it turns input data into Python values (tracing), with the outputs fn returned on them."""
        cpu = torch.device("cpu")
        label = name_of(fn)
        example = tuple(t.detach().to(cpu, copy=True) for t in flat)  # the caller's tensors stay untouched
        view = self._replicas.view(modules, cpu)
        names = [f"in{i}" for i in range(len(example))]
        order = ["torchscript", "dynamo"] if self.exporter == "auto" else [self.exporter]
        errors: List[str] = []
        refusal: Optional[OnnxDataDependentError] = None
        captured = list(tensors) + [t for m in modules for t in list(m.parameters()) + list(m.buffers())]
        for exporter in order:
            pristine = tuple(t.clone() for t in example) if exporter != order[-1] else example
            versions = [t._version for t in pristine]
            captured_versions = [t._version for t in captured]
            try:
                with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    guard = _Guard() if exporter == "torchscript" else None
                    wrapper = self._wrapper(fn, template, modules, guard)
                    mode = ReplicaMode(view) if view else None
                    if mode is not None:
                        mode.__enter__()
                    try:
                        model_bytes = self._export_with(exporter, wrapper, pristine, names)
                    finally:
                        if mode is not None:
                            mode.__exit__(None, None, None)
                if not wrapper.out_meta:
                    raise OnnxExportError(f"{label} returned no tensors; ONNX needs at least one output")
                if guard is not None:
                    self._judge(label, guard, caught)
            except OnnxDataDependentError as exc:
                refusal = exc
                continue
            except OnnxExportError:
                raise
            except Exception as exc:
                text = str(exc)
                text = text if len(text) <= 400 else text[:400] + " ..."
                errors.append(f"{exporter} exporter: {type(exc).__name__}: {text}")
                continue
            wrapper.mutation_hint, wrapper.mutation_notes = self._mutations(label, pristine, versions, captured,
                                                                            captured_versions)
            if guard is not None:
                reference, random_ops = wrapper.traced or [], guard.random
            else:  # dynamo traced fake tensors: take the reference from one eager run
                reference, _, random_ops = self._eager_reference(fn, modules, flat, template)
            return model_bytes, wrapper, reference, random_ops
        if refusal is not None:
            if errors:
                raise OnnxDataDependentError(f"{refusal} (exporter='auto' also tried: {'; '.join(errors)})")
            raise refusal
        raise OnnxExportError(f"could not export {label} to ONNX - " + "; ".join(errors))

    def _wrapper(self, fn: Any, template: Any, modules: List[nn.Module], guard: Optional[_Guard]) -> _Flat:
        cpu = torch.device("cpu")
        wrapper = _Flat(fn, template, guard)
        wrapper.mutation_hint, wrapper.mutation_notes = "", []
        for i, module in enumerate(modules):
            # captured CPU models become submodules so the tracer sees their weights as parameters
            # (initializers); fn still reaches them by its own path. Models on another device are traced
            # through detached CPU replicas instead (see ReplicaMode), which become graph constants.
            if any(t.device != cpu for t in list(module.parameters()) + list(module.buffers())):
                continue
            if module is not fn:
                wrapper.add_module(f"captured{i}", module)
            else:
                wrapper.add_module("fn_module", module)
        return wrapper

    @staticmethod
    def _judge(label: str, guard: _Guard, caught: List[warnings.WarningMessage]) -> None:
        """Refuse a trace that froze input-dependent Python values; log the tracer's warnings (debug)."""
        if guard.violations:
            what, where = guard.violations[0]
            more = f" (and {len(guard.violations) - 1} more place(s))" if len(guard.violations) > 1 else ""
            raise OnnxDataDependentError(
                f"cannot export {label} to ONNX: it turns a tensor computed from its inputs into a Python value - "
                f"{what} at {where}{more}. Tracing would freeze that value, and any branch taken on it, into the "
                f"graph, which would then be wrong for other inputs. Keep the computation in tensors "
                f"(torch.where(cond, a, b) instead of an if on a tensor; tensor arithmetic instead of .item(), "
                f"float(), int() or .tolist() of input-dependent values), or run {label} on the cpu backend.")
        for w in caught:
            if issubclass(w.category, torch.jit.TracerWarning):
                # sizes, weights and other keyed state: exact for this cache key (the guard checked the rest)
                log_once(("onnx-tracer", str(w.message)), f"ONNX export of {label}: {w.message}", level=10)

    @staticmethod
    def _mutations(label: str, inputs: Sequence[torch.Tensor], versions: List[int],
                   captured: Sequence[torch.Tensor], captured_versions: List[int]
                   ) -> Tuple[str, List[Tuple[Any, str]]]:
        """In-place changes fn made during the export: ``(hint for a failed check, log notes for a good one)``."""
        changed_inputs = [i for i, (t, v) in enumerate(zip(inputs, versions)) if t._version != v]
        changed = [t for t, v in zip(captured, captured_versions) if t._version != v]
        hint, notes = "", []
        if changed_inputs:
            which = ", ".join(str(i) for i in changed_inputs)
            notes.append((("onnx-inplace-input", label),
                          f"ONNX export of {label}: it modifies its input tensor(s) in place (tensor argument(s) "
                          f"{which}, counted from 0); the export ran it on copies, and the ONNX graph returns the "
                          f"values {label} computes but leaves the caller's tensors unchanged (an ONNX graph cannot "
                          f"write into its inputs)"))
        if changed:
            shapes = ", ".join(_describe(t) for t in changed[:4]) + (" ..." if len(changed) > 4 else "")
            notes.append((("onnx-inplace-captured", label),
                          f"ONNX export of {label}: it modified {len(changed)} captured tensor(s) in place ({shapes}) "
                          f"during the export's run; an ONNX graph cannot update state, so calls on this backend "
                          f"leave them as they are now"))
            hint = (f"{label} modified {len(changed)} captured tensor(s) in place ({shapes}) while it was traced, "
                    f"which an ONNX graph cannot do. ")
        return hint, notes

    def _export_with(self, exporter: str, wrapper: _Flat, example: Tuple[torch.Tensor, ...],
                     names: List[str]) -> bytes:
        if exporter == "torchscript":
            buf = io.BytesIO()
            # torch < 2.5 has no `dynamo` argument and always traces; newer ones default to dynamo
            extra = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
            torch.onnx.export(wrapper, example, buf, input_names=names, opset_version=self.opset_version,
                              do_constant_folding=True, training=torch.onnx.TrainingMode.PRESERVE, **extra)
            return buf.getvalue()
        import importlib.util

        if importlib.util.find_spec("onnxscript") is None:
            raise ImportError("the dynamo exporter needs onnxscript (pip install onnxscript)")
        program = torch.onnx.export(wrapper, example, dynamo=True, input_names=names,
                                    opset_version=self.opset_version)
        return program.model_proto.SerializeToString()

    # -- running ------------------------------------------------------------------------------------
    def _run_session(self, compiled: _Compiled, flat: List[torch.Tensor]) -> List[torch.Tensor]:
        dev = self.device
        feeds = [(name, flat[i].to(dev).contiguous()) for name, i in compiled.input_index]
        if compiled.bindable and all(t.dtype in _TORCH_TO_NUMPY and t.numel() > 0 for _, t in feeds):
            import numpy as np

            binding = compiled.session.io_binding()
            dev_type, dev_id = self._bind_device_type, (dev.index or 0)
            for name, t in feeds:
                binding.bind_input(name, dev_type, dev_id, np.dtype(_TORCH_TO_NUMPY[t.dtype]), tuple(t.shape),
                                   t.data_ptr())
            outs = [torch.empty(shape, dtype=dtype, device=dev) for shape, dtype in compiled.out_meta]
            for name, o in zip(compiled.output_names, outs):
                binding.bind_output(name, dev_type, dev_id, np.dtype(_TORCH_TO_NUMPY[o.dtype]), tuple(o.shape),
                                    o.data_ptr())
            if dev.type == "cuda":
                torch.cuda.current_stream(dev).synchronize()  # ORT uses its own stream; inputs must be ready
            compiled.session.run_with_iobinding(binding)
            return outs
        feed = {}
        for name, t in feeds:
            if t.dtype == torch.bfloat16:
                raise TypeError(f"ONNX input {name} is bfloat16, which this provider path cannot pass through "
                                "numpy; cast to float16 or float32 first")
            feed[name] = t.detach().cpu().numpy()
        results = compiled.session.run(compiled.output_names, feed)
        return [torch.from_numpy(r).to(dev) for r in results]
