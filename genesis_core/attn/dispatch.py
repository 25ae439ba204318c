"""``attention(q, k, v, ...)``: validate → choose → run → fall back.

The first call with a given signature (shapes, dtypes, devices, mask shape, layout, backend) is
validated in full and resolved to a *plan*: the chain of backends to try, with the reasons the
skipped ones could not serve it. Later calls with the same signature look the plan up in a dict
and go straight to the kernel, so dispatch costs microseconds.

Chains: an explicit backend ``X`` resolves to ``[X, sdpa, pytorch]``; ``auto`` to
``[<autotuner's choice or the default order>, sdpa, pytorch]``. A skipped backend is logged once
per (backend, reason) with the reason. A backend that raises at run time is logged, dropped from
that plan, and the next one runs.
"""
from __future__ import annotations

import contextlib
import logging
import math
import threading
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Union

import torch

from .._log import first_line, log_once, logger
from . import backends as _backends  # noqa: F401  (registers every backend)
from . import registry
from .types import LAYOUTS, AttentionCall, AttentionType, mask_4d_shape

BackendArg = Union[AttentionType, str]

FALLBACK_TAIL = ("sdpa", "pytorch")
DEFAULT_AUTO_ORDER = ("sdpa", "flash", "xformers", "pytorch")
_ALIASES = {
    "flash_attention": "flash",
    "sage_attention": "sage",
    "math": "pytorch",
    "torch": "pytorch",
    "default": "auto",
}
_MAX_PLANS = 4096

_plans: Dict[tuple, "_Plan"] = {}
_plans_lock = threading.Lock()
_served: Dict[str, str] = {}


class _ThreadState(threading.local):
    # Class-level defaults: reading an unset attribute finds these instead of raising (much faster
    # than getattr(local, name, None) on the per-call path).
    override: Optional[str] = None
    last: Optional[str] = None


_tls = _ThreadState()
_default_backend = "auto"
# The AUTO seam: chooser(call, candidate_names) -> name or None. The autotuner installs itself here.
_auto_chooser: Optional[Callable[[AttentionCall, List[str]], Optional[str]]] = None
# Its look-up-only twin (what ``explain`` asks: a known choice, never a measurement).
_auto_peek: Optional[Callable[[AttentionCall, List[str]], Optional[str]]] = None


class _Plan:
    __slots__ = ("chain", "layout", "mask_view", "signature", "default_scale", "direct", "direct_name")

    def __init__(self, chain: List[registry.Backend], layout: str, mask_view, signature: str, default_scale: float,
                 direct: Optional[Callable[..., torch.Tensor]] = None):
        self.chain = chain
        self.layout = layout
        self.mask_view = mask_view  # the shape the mask is viewed as (4-D), or None
        self.signature = signature
        self.default_scale = default_scale  # head_dim ** -0.5, used when the call gives no scale
        # chain[0]'s plain fn(q, k, v) for this signature (BHND, no mask, default scale), or None;
        # dropped together with chain[0] when that backend fails.
        self.direct = direct
        self.direct_name = chain[0].name if chain else None


# ---------------------------------------------------------------- backend names


def backend_name(backend: BackendArg) -> str:
    """Normalise an AttentionType or string to a registry name (``"auto"`` included)."""
    if isinstance(backend, AttentionType):
        return backend.value
    if not isinstance(backend, str):
        raise TypeError(f"backend must be an AttentionType or a string; got {type(backend).__name__}")
    name = backend.strip().lower()
    name = _ALIASES.get(name, name)
    if name != "auto" and name not in registry.names():
        valid = ", ".join(["auto"] + registry.names())
        raise ValueError(f"unknown attention backend {backend!r}; valid: {valid}")
    return name


def set_default_backend(backend: BackendArg) -> None:
    """Set the process-wide backend used when a call asks for ``auto`` and no ``use_backend`` is active."""
    global _default_backend
    _default_backend = backend_name(backend)


def get_default_backend() -> str:
    return _default_backend


@contextlib.contextmanager
def use_backend(backend: BackendArg) -> Iterator[str]:
    """Within the block, calls in *this thread* that ask for ``auto`` use ``backend`` instead."""
    name = backend_name(backend)
    prev = _tls.override
    _tls.override = name
    try:
        yield name
    finally:
        _tls.override = prev


def set_auto_chooser(chooser: Optional[Callable[[AttentionCall, List[str]], Optional[str]]],
                     peek: Optional[Callable[[AttentionCall, List[str]], Optional[str]]] = None) -> None:
    """Install the function AUTO asks for a choice (the autotuner); None restores the default order.

    ``peek`` (optional) answers the same question without measuring; ``explain`` uses it.
    """
    global _auto_chooser, _auto_peek
    _auto_chooser = chooser
    _auto_peek = peek
    clear_plans()


def clear_plans() -> None:
    """Forget every resolved plan (after a backend change, an autotuner reset, or in tests)."""
    with _plans_lock:
        _plans.clear()


def last_backend() -> Optional[str]:
    """Name of the backend that served this thread's last ``attention`` call."""
    return _tls.last


def served_signatures() -> Dict[str, str]:
    """{signature: backend name} for every call signature served so far in this process."""
    return dict(_served)


# ---------------------------------------------------------------- validation


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")


def _check_scale(scale) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number or None; got {scale!r}")


def _validate(q, k, v, mask, layout: str, scale) -> Optional[tuple]:
    """Check the call; return the 4-D shape the mask is viewed as (or None). Raises with a sentence."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'BHND' or 'BNHD'; got {layout!r}")
    dims = "[B, H, N, D]" if layout == "BHND" else "[B, N, H, D]"
    for name, t in (("query", q), ("key", k), ("value", v)):
        _check_tensor(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D {dims} (layout {layout!r}); got shape {_shape(t)}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must have a floating-point dtype; got {t.dtype}")
        if 0 in t.shape:
            raise ValueError(f"{name} must have no empty dimension; got shape {_shape(t)}")
    for name, t in (("key", k), ("value", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} dtype {t.dtype} differs from query dtype {q.dtype}; cast them to one dtype")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but query is on {q.device}; move them to one device")
    hq, nq = (q.shape[1], q.shape[2]) if layout == "BHND" else (q.shape[2], q.shape[1])
    hk, nk = (k.shape[1], k.shape[2]) if layout == "BHND" else (k.shape[2], k.shape[1])
    hv, nv = (v.shape[1], v.shape[2]) if layout == "BHND" else (v.shape[2], v.shape[1])
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"batch sizes differ: query {q.shape[0]}, key {k.shape[0]}, value {v.shape[0]}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"key head_dim {k.shape[3]} differs from query head_dim {q.shape[3]}")
    if nk != nv:
        raise ValueError(f"key and value must have the same number of tokens; got key {nk}, value {nv}")
    if hk != hv:
        raise ValueError(f"key and value must have the same number of heads; got key {hk}, value {hv}")
    if hq % hk:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hk}) for grouped-query attention")
    if scale is not None:
        _check_scale(scale)
    if mask is None:
        return None
    _check_tensor("mask", mask)
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        raise TypeError(f"mask must be boolean (True = attend) or an additive float tensor; got dtype {mask.dtype}")
    if mask.device != q.device:
        raise ValueError(f"mask is on {mask.device} but query is on {q.device}; move it to the same device")
    b = q.shape[0]
    want = {1: (nk,), 2: (nq, nk), 3: (b, nq, nk), 4: (b, hq, nq, nk)}
    if mask.dim() not in want:
        raise ValueError(
            f"mask must be 1-D [Nk], 2-D [Nq, Nk], 3-D [B, Nq, Nk] or 4-D [B, H, Nq, Nk]; got shape {_shape(mask)}"
        )
    target = want[mask.dim()]
    if any(m != t and m != 1 for m, t in zip(mask.shape, target)) or mask.shape[-1] != nk:
        names = {1: "[Nk]", 2: "[Nq, Nk]", 3: "[B, Nq, Nk]", 4: "[B, H, Nq, Nk]"}[mask.dim()]
        raise ValueError(
            f"mask shape {_shape(mask)} does not broadcast to {names} = {target} "
            f"(each dimension must match or be 1, and the last must be Nk={nk})"
        )
    return mask_4d_shape(mask.shape)


# ---------------------------------------------------------------- planning


def _make_call(q, k, v, mask, scale, layout: str, mask_view) -> AttentionCall:
    if layout == "BNHD":
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if mask is not None:
        mask = mask.view(mask_view) if mask.is_contiguous() else mask.reshape(mask_view)
    return AttentionCall(q, k, v, mask, float(scale) if scale is not None else q.shape[-1] ** -0.5)


def _signature(call: AttentionCall, layout: str, requested: str) -> str:
    return (
        f"{call.device} {str(call.dtype).replace('torch.', '')} B{call.batch} H{call.heads}/{call.kv_heads} "
        f"Nq{call.q_len} Nk{call.kv_len} D{call.head_dim} mask={call.mask_kind} {layout} requested={requested}"
    )


def chain_for(name: str, call: AttentionCall, measure: bool = True) -> List[str]:
    """The ordered backend names ``name`` resolves to for ``call`` (``auto`` asks the autotuner).

    ``measure=False`` only looks up a choice already measured (no kernel runs).
    """
    if name == "auto":
        head: Sequence[str] = DEFAULT_AUTO_ORDER
        chooser = _auto_chooser if measure else _auto_peek
        if chooser is not None:
            servable = [b.name for b in registry.all_backends() if b.reason_for(call) is None]
            choice = chooser(call, servable)
            if choice is not None:
                head = (choice,)
    else:
        head = (name,)
    out: List[str] = []
    for n in list(head) + list(FALLBACK_TAIL):
        if n not in out:
            out.append(n)
    return out


def _resolve(name: str, call: AttentionCall, measure: bool = True):
    """(servable backends in order, [(name, reason)] for every chain member)."""
    servable, reasons = [], []
    for n in chain_for(name, call, measure):
        b = registry.get(n)
        reason = b.reason_for(call)
        reasons.append((n, reason))
        if reason is None:
            servable.append(b)
    return servable, reasons


def _plan(name: str, q, k, v, mask, layout: str, scale) -> _Plan:
    mask_view = _validate(q, k, v, mask, layout, scale)
    call = _make_call(q, k, v, mask, scale, layout, mask_view)
    servable, reasons = _resolve(name, call)
    if not servable:  # cannot happen while `pytorch` serves every floating dtype, but say so if it does
        detail = "; ".join(f"{n}: {r}" for n, r in reasons)
        raise RuntimeError(f"no attention backend can serve this call ({detail})")
    for n, r in reasons:  # log what was passed over before the backend that will serve
        if r is None:
            break
        log_once(("skip", n, r), f"attention backend '{n}' skipped: {r}; using '{servable[0].name}'")
    head = servable[0]
    direct = None
    if layout == "BHND" and mask is None and scale is None and head.direct is not None:
        direct = head.direct(call)
    return _Plan(servable, layout, mask_view, _signature(call, layout, name), q.shape[-1] ** -0.5, direct)


# ---------------------------------------------------------------- the call


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    backend: BackendArg = AttentionType.AUTO,
    layout: str = "BHND",
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Scaled dot-product attention through the chosen (or measured) backend.

    Shapes (layout ``"BHND"``): q [B, Hq, Nq, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv], with
    Hq a multiple of Hkv (grouped-query attention). Layout ``"BNHD"`` swaps the H and N axes of all
    three and of the result. ``mask``: boolean (True = attend) or additive float, shaped [Nk],
    [Nq, Nk], [B, Nq, Nk] or [B, H, Nq, Nk] (any dimension may be 1). ``scale`` defaults to D**-0.5.
    Returns [B, Hq, Nq, Dv] (or [B, Nq, Hq, Dv]). Raises TypeError/ValueError naming the bad argument.
    Under ``torch.compile`` the call is traced as one opaque op (see :mod:`.compile`).
    """
    if _compile.is_compiling():
        return _compile.traced_attention(q, k, v, mask, backend, layout, scale)
    return eager_attention(q, k, v, mask, backend, layout, scale)


def _effective_name(backend: BackendArg) -> str:
    """The registry name a call resolves to: ``auto`` becomes this thread's override or the default."""
    if backend is _AUTO:
        name = "auto"
    elif backend.__class__ is str and backend in _DIRECT:
        name = backend
    else:
        name = backend_name(backend)
    return (_tls.override or _default_backend) if name == "auto" else name


def eager_attention(q, k, v, mask, backend, layout, scale) -> torch.Tensor:
    """``attention`` without the torch.compile check (positional arguments; the custom op's body)."""
    name = (_tls.override or _default_backend) if backend is _AUTO else _effective_name(backend)
    try:
        # Everything a backend's refusal or the autotuner's choice can depend on: shapes, strides (kernels
        # need a contiguous last dim; the autotuner keys by memory layout), dtypes, devices, the mask's
        # shape, and whether autograd will need a backward (SageAttention has none).
        key = (
            name, layout, q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(), q.dtype, k.dtype, v.dtype,
            q.device, k.device, v.device, None if mask is None else (mask.shape, mask.dtype, mask.device),
            scale is None, _grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad),
        )
        plan = _plans.get(key)
    except AttributeError:  # a non-tensor argument: let validation say which
        key, plan = None, None
    if plan is None:
        plan = _plan(name, q, k, v, mask, layout, scale)
        if key is not None:
            with _plans_lock:
                if len(_plans) >= _MAX_PLANS:
                    _plans.clear()
                _plans[key] = plan
        _served[plan.signature] = plan.chain[0].name
    elif scale is not None:  # the cached plan says nothing about this call's scale
        _check_scale(scale)
    direct = plan.direct
    if direct is not None:  # the common call: no AttentionCall, no wrapper (see registry.Backend.direct)
        try:
            out = direct(q, k, v)
            _tls.last = plan.direct_name
            return out
        except Exception as exc:  # the general path below runs that backend's run(call): it logs and falls back
            transient = isinstance(exc, torch.cuda.OutOfMemoryError)
            if not transient:
                plan.direct = None  # not again for this signature (out of memory can pass)
            log_once(("direct", plan.direct_name, first_line(exc, 300)),
                     f"direct path of attention backend '{plan.direct_name}' failed ({first_line(exc, 300)}); "
                     f"{'this call' if transient else 'this signature from now on'} goes through its run(call) "
                     f"and the usual fallback: {plan.signature}")
    if layout == "BHND" and mask is None:  # the common case, without _make_call's branches
        call = AttentionCall(q, k, v, None, plan.default_scale if scale is None else float(scale))
    else:
        call = _make_call(q, k, v, mask, plan.default_scale if scale is None else scale, layout, plan.mask_view)
    chain = plan.chain
    i = 0
    while True:
        b = chain[i]
        try:
            out = b.run(call)
            break
        except Exception as exc:
            if i == len(chain) - 1:
                raise
            i += 1
            nxt = chain[i].name
            transient = isinstance(exc, torch.cuda.OutOfMemoryError)
            if not transient:
                with _plans_lock:  # never try it again for this signature (other threads may have already)
                    if plan.chain and plan.chain[0] is b:
                        plan.direct = None
                        plan.chain = plan.chain[1:]
                        _served[plan.signature] = plan.chain[0].name
            log_once(("fail", b.name, first_line(exc, 300)),
                     f"attention backend '{b.name}' failed ({first_line(exc, 300)}); falling back to '{nxt}' for "
                     f"{plan.signature}" + (" (this call only: out of memory can pass)" if transient else ""))
    _tls.last = b.name
    return out.transpose(1, 2) if layout == "BNHD" else out


_DIRECT = frozenset(registry.names())
_grad_enabled = torch.is_grad_enabled
_AUTO = AttentionType.AUTO


def explain(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    backend: BackendArg = AttentionType.AUTO,
    layout: str = "BHND",
    scale: Optional[float] = None,
) -> List[dict]:
    """The chain ``attention`` would try for these inputs, each with the reason it cannot serve (or None).

    Runs no kernel (availability probes aside). The first entry whose ``reason`` is None is what runs.
    """
    name = _effective_name(backend)
    mask_view = _validate(q, k, v, mask, layout, scale)
    call = _make_call(q, k, v, mask, scale, layout, mask_view)
    _, reasons = _resolve(name, call, measure=False)
    return [{"name": n, "reason": r} for n, r in reasons]


def backends_report() -> List[dict]:
    """Every registered backend: name, available, reason, version, kernel description."""
    return registry.report()


# ---------------------------------------------------------------- torch.compile and the autotuner

from . import compile as _compile  # noqa: E402  (the custom op calls back into eager_attention)
from . import autotune as _autotune  # noqa: E402

set_auto_chooser(_autotune.choose, _autotune.peek)
