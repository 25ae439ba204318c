"""The export guard: refuses a trace that turns values computed from the inputs' data into Python values.

Tracing bakes Python control flow and Python values into the graph. While the tracer runs ``fn``, a
``TorchFunctionMode`` (:class:`Guard`) follows which tensors are computed from the inputs' *data*, and which
have a data-dependent *size* (``x[x > 0]``, ``nonzero``, ``unique``, ...). Turning such a tensor into a Python
value (``if t.sum() > 0``, ``.item()``, ``float(t)``, ``.tolist()``, NumPy, ``len``/iteration of a data-sized
tensor) would freeze that value, and the branch taken on it, into the graph; :func:`judge` then refuses the
export with :class:`~genesis_core.compute.onnx_errors.OnnxDataDependentError`, which names the function and the
line and says what to write instead (``torch.where``, tensor arithmetic) or to use the cpu backend. Python
values derived from shapes, weights or other keyed state are exact for the cached key and stay allowed
(``if x.shape[0] > 3``, ``head_dim ** -0.5``, ``if self.gate.item() > 0``). Library functions written in Python
(``F.multi_head_attention_forward``, ...), whose inner torch calls a ``TorchFunctionMode`` does not see, are
followed op by op with a ``TorchDispatchMode`` (:class:`_Nested`). Not seen: values a C++ kernel reads from
the data by itself (``F.one_hot`` without ``num_classes``); the reference check of the new graph
(:mod:`~genesis_core.compute.onnx_export`) catches them on the export inputs only. (The dynamo exporter refuses
data-dependent branches itself, through ``torch.export``.) The guard also notes random ops: their graphs can
only be checked for structure.

The op tables below say which torch functions are metadata, which report sizes, which size their output from
the data or from an integer argument, which draw random numbers, and how each conversion reads in an error.
"""
from __future__ import annotations

import os
import sys
import types
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

from .._log import log_once
from .onnx_errors import OnnxDataDependentError

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

    def __init__(self, guard: "Guard") -> None:
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


class Guard(TorchFunctionMode):
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

    def mark_inputs(self, inputs: Sequence[torch.Tensor]) -> None:
        """Flag the traced function's input tensors as the data everything else is followed from."""
        for t in inputs:
            self.mark(t, _DATA)

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


def judge(label: str, guard: Guard, caught: List[warnings.WarningMessage]) -> None:
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
