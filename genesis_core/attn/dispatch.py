"""``attention(q, k, v, ...)``: validate → choose → run → fall back.

The first call with a given signature (shapes, strides, dtypes, devices, mask shape, layout, backend,
quality) is validated in full and resolved to a *plan*: the chain of backends to try, with the reasons the
skipped ones could not serve it. Later calls with the same signature look the plan up in a dict and go
straight to the kernel, so dispatch costs microseconds.

Chains: an explicit backend ``X`` resolves to ``[X, sdpa, pytorch]``; ``auto`` to ``[<the chooser's choice
or the default order>, sdpa, pytorch]``. A skipped backend is logged once per (backend, reason) with the
reason. A backend that raises at run time is logged, dropped from that plan, and the next one runs.

Quality: every call has a budget (:mod:`.quality`). AUTO only considers backends whose precision class the
budget admits. An explicit backend implies the level its class needs unless ``quality=`` says otherwise;
a lossy backend that the autotuner has not already checked on this signature is checked once by the
*guard* (its output on the live inputs against a float64 reference) before it is served.

Seams set once by the package's wiring (``attn/__init__``), so this module imports nothing above it:
the AUTO chooser (the autotuner), the guard, and the torch.compile tracer.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Union

import torch

from .._log import first_line, log_once, logger
from . import quality as _quality
from . import registry
from ._trace import is_compiling
from .call import backend_name, check_scale, make_call, normalise_layout, validate
from .types import AttentionCall, AttentionType

BackendArg = Union[AttentionType, str]

FALLBACK_TAIL = registry.FALLBACK_TAIL
DEFAULT_AUTO_ORDER = registry.AUTO_ORDER
_MAX_PLANS = 4096

_plans: Dict[tuple, "_Plan"] = {}
_plans_lock = threading.Lock()
_served: Dict[str, str] = {}


class _ThreadState(threading.local):
    # Class-level defaults: an unset attribute reads these (faster than getattr(local, name, None)).
    override: Optional[str] = None
    last: Optional[str] = None


_tls = _ThreadState()
_default_backend = "auto"
# chooser(call, candidate_names, quality) -> name or None. The autotuner installs itself here.
Chooser = Callable[[AttentionCall, List[str], str], Optional[str]]
_auto_chooser: Optional[Chooser] = None
_auto_peek: Optional[Chooser] = None  # its look-up-only twin (what ``explain`` asks)
# guard(call, backend, quality) -> reason or None: checks a lossy backend's output before it is served.
_guard: Optional[Callable[[AttentionCall, registry.Backend, str], Optional[str]]] = None
# tracer(q, k, v, mask, backend, layout, scale, quality) -> Tensor: attention while Dynamo traces.
_tracer: Optional[Callable[..., torch.Tensor]] = None


class _Plan:
    __slots__ = ("chain", "layout", "mask_view", "signature", "default_scale", "direct", "direct_name")

    def __init__(self, chain: List[registry.Backend], layout: str, mask_view, signature: str, default_scale: float,
                 direct: Optional[Callable[..., torch.Tensor]] = None):
        self.chain = chain
        self.layout = layout
        self.mask_view = mask_view  # the shape the mask is viewed as (4-D), or None
        self.signature = signature
        self.default_scale = default_scale  # head_dim ** -0.5, used when the call gives no scale
        # chain[0]'s plain fn(q, k, v) in the caller's layout (no mask, default scale), or None;
        # dropped together with chain[0] when that backend fails.
        self.direct = direct
        self.direct_name = chain[0].name if chain else None


# ---------------------------------------------------------------- names, defaults, seams


def set_default_backend(backend: BackendArg) -> None:
    """Set the process-wide backend used when a call asks for ``auto`` and no ``use_backend`` is active."""
    global _default_backend
    _default_backend = backend_name(backend)
    clear_plans()


def get_default_backend() -> str:
    """The process-wide backend ``auto`` calls use (see :func:`set_default_backend`)."""
    return _default_backend


def auto_backend() -> str:
    """What a call asking for ``auto`` in *this thread* resolves to now: the ``use_backend`` override, else the
    process-wide default (``"auto"`` itself when neither is set)."""
    return _tls.override or _default_backend


def set_default_quality(level: Optional[str]) -> None:
    """Set the process-wide quality budget for calls that pass none; None re-reads ``$GENESIS_QUALITY``."""
    _quality.set_default(level)
    clear_plans()


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


def set_auto_chooser(chooser: Optional[Chooser], peek: Optional[Chooser] = None) -> None:
    """Install the function AUTO asks for a choice (the autotuner); None restores the default order.

    ``peek`` (optional) answers the same question without measuring; ``explain`` uses it.
    """
    global _auto_chooser, _auto_peek
    _auto_chooser = chooser
    _auto_peek = peek
    registry.changed()  # AUTO's choices are stale: dispatch's plans, and what callers prepared from them


def set_guard(guard) -> None:
    """Install the check a lossy backend passes before an explicit choice of it is served (None: refuse them)."""
    global _guard
    _guard = guard
    clear_plans()


def set_tracer(tracer) -> None:
    """Install what ``attention`` does while torch.compile traces it (the custom op)."""
    global _tracer
    _tracer = tracer


def clear_plans() -> None:
    """Forget every resolved plan (after a backend change, an autotuner reset, or in tests)."""
    with _plans_lock:
        _plans.clear()


registry.on_change(clear_plans)


def last_backend() -> Optional[str]:
    """Name of the backend that served this thread's last ``attention`` call."""
    return _tls.last


def served_signatures() -> Dict[str, str]:
    """{signature: backend name} for every call signature served so far in this process."""
    return dict(_served)


# ---------------------------------------------------------------- planning


def _signature(call: AttentionCall, layout: str, requested: str, level: str) -> str:
    return (
        f"{call.device} {str(call.dtype).replace('torch.', '')} B{call.batch} H{call.heads}/{call.kv_heads} "
        f"Nq{call.q_len} Nk{call.kv_len} D{call.head_dim} mask={call.mask_kind} {layout} requested={requested} "
        f"quality={level}"
    )


def effective_quality(name: str, quality: Optional[str]) -> str:
    """The level a call runs under: ``quality`` if given; else the default for ``auto``, and for an explicit
    backend the strictest level its precision class needs."""
    if quality is not None:
        return _quality.normalise(quality)
    if name == "auto":
        return _quality.default()
    b = registry.get(name)
    b.available()  # a backend's precision class may be known only once probed (SageAttention's umbrella)
    return _quality.loosest_for(b.precision)


def _over_budget(b: registry.Backend, level: str) -> Optional[str]:
    if _quality.admits(level, b.precision):
        return None
    return (f"precision class {b.precision} is outside the quality budget '{level}' "
            f"(allow it with quality='{_quality.loosest_for(b.precision)}')")


def servable(call: AttentionCall, level: str) -> List[str]:
    """Names of the backends that can serve ``call`` under ``level``, in registry order."""
    return [b.name for b in registry.all_backends() if b.reason_for(call) is None and _over_budget(b, level) is None]


def chain_for(name: str, call: AttentionCall, measure: bool = True, level: str = "exact") -> List[str]:
    """The ordered backend names ``name`` resolves to for ``call`` (``auto`` asks the chooser).

    ``measure=False`` only looks up a choice already measured (no kernel runs).
    """
    head: Sequence[str] = (name,)
    if name == "auto":
        head = registry.UNMEASURED_ORDER.get(call.device.type, DEFAULT_AUTO_ORDER)
        chooser = _auto_chooser if measure else _auto_peek
        if chooser is not None:
            choice = chooser(call, servable(call, level), level)
            if choice is not None:
                head = (choice,)
    out: List[str] = []
    for n in list(head) + list(FALLBACK_TAIL):
        if n not in out:
            out.append(n)
    return out


def _resolve(name: str, call: AttentionCall, level: str, measure: bool = True):
    """(servable backends in order, [(name, reason)] for every chain member)."""
    good, reasons = [], []
    chosen_by_autotuner = name == "auto" and (_auto_chooser if measure else _auto_peek) is not None
    for n in chain_for(name, call, measure, level):
        b = registry.get(n)
        reason = b.reason_for(call) or _over_budget(b, level)
        if reason is None and b.precision != "exact" and not chosen_by_autotuner:
            if not measure:
                reason = None  # explain() runs no kernel: the guard decides at the first real call
            elif _guard is None:
                reason = f"precision class {b.precision}: no accuracy guard is installed to check it"
            else:
                reason = _guard(call, b, level)
        reasons.append((n, reason))
        if reason is None:
            good.append(b)
    return good, reasons


def _bnhd(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def direct_bnhd(q, k, v):
        return fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    return direct_bnhd


def _plan(name: str, q, k, v, mask, layout: str, scale, quality: Optional[str]) -> _Plan:
    layout = normalise_layout(layout)
    mask_view = validate(q, k, v, mask, layout, scale)
    call = make_call(q, k, v, mask, scale, layout, mask_view)
    level = effective_quality(name, quality)
    good, reasons = _resolve(name, call, level)
    if not good:  # cannot happen while `pytorch` serves every floating dtype, but say so if it does
        detail = "; ".join(f"{n}: {r}" for n, r in reasons)
        raise RuntimeError(f"no attention backend can serve this call ({detail})")
    for n, r in reasons:  # log what was passed over before the backend that will serve
        if r is None:
            break
        msg = f"attention backend '{n}' skipped: {r}; using '{good[0].name}'"
        if name == "auto" and n in registry.UNMEASURED_ORDER.get(call.device.type, ()):
            logger.debug(msg)  # AUTO's unmeasured order trying its first candidate is not news
        else:
            log_once(("skip", n, r), msg)
    head = good[0]
    direct = None
    if mask is None and scale is None and head.direct is not None:
        direct = head.direct(call)
        if direct is not None and layout == "BNHD":
            direct = _bnhd(direct)
    return _Plan(good, layout, mask_view, _signature(call, layout, name, level), q.shape[-1] ** -0.5, direct)


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
    quality: Optional[str] = None,
) -> torch.Tensor:
    """Scaled dot-product attention through the chosen (or measured) backend.

    Shapes (layout ``"BHND"``): q [B, Hq, Nq, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv], with Hq a multiple
    of Hkv (grouped-query attention). Layout ``"BNHD"`` swaps the H and N axes of all three and of the
    result (any case is accepted). ``mask``: boolean (True = attend) or additive float, shaped [Nk],
    [Nq, Nk], [B, Nq, Nk] or [B, H, Nq, Nk] (any dimension may be 1). ``scale`` defaults to D**-0.5.
    ``quality``: ``"exact"`` (default for ``auto``), ``"high"`` or ``"fast"`` (see :mod:`.quality`).
    Returns [B, Hq, Nq, Dv] (or [B, Nq, Hq, Dv]). Raises TypeError/ValueError naming the bad argument.
    Under ``torch.compile`` the call is traced as one opaque op (see :mod:`.compile`).
    """
    if _tracer is not None and is_compiling():
        return _tracer(q, k, v, mask, backend, layout, scale, quality)
    return eager_attention(q, k, v, mask, backend, layout, scale, quality)


def _effective_name(backend: BackendArg) -> str:
    """The registry name a call resolves to: ``auto`` becomes this thread's override or the default."""
    if backend is _AUTO:
        name = "auto"
    elif backend.__class__ is str and backend in _DIRECT:
        name = backend
    else:
        name = backend_name(backend)
    return (_tls.override or _default_backend) if name == "auto" else name


def eager_attention(q, k, v, mask, backend, layout, scale, quality=None) -> torch.Tensor:
    """``attention`` without the torch.compile check (positional arguments; the custom op's body)."""
    name = (_tls.override or _default_backend) if backend is _AUTO else _effective_name(backend)
    try:
        # Everything a backend's refusal or the autotuner's choice can depend on: shapes, strides (kernels
        # need a contiguous last dim; the autotuner keys by memory layout), dtypes, devices, the mask's
        # shape, the budget, and whether autograd will need a backward (SageAttention has none).
        key = (
            name, layout, q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(), q.dtype, k.dtype, v.dtype,
            q.device, k.device, v.device, None if mask is None else (mask.shape, mask.dtype, mask.device),
            scale is None, _grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad), quality,
        )
        plan = _plans.get(key)
    except AttributeError:  # a non-tensor argument: let validation say which
        key, plan = None, None
    if plan is None:
        plan = _plan(name, q, k, v, mask, layout, scale, quality)
        if key is not None:
            with _plans_lock:
                if len(_plans) >= _MAX_PLANS:
                    _plans.clear()
                _plans[key] = plan
        if len(_served) >= _MAX_PLANS:  # telemetry, bounded like the plans
            _served.clear()
        _served[plan.signature] = plan.chain[0].name
    elif scale is not None:  # the cached plan says nothing about this call's scale
        check_scale(scale)
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
    layout = plan.layout
    if layout == "BHND" and mask is None:  # the common case, without make_call's branches
        call = AttentionCall(q, k, v, None, plan.default_scale if scale is None else float(scale))
    else:
        call = make_call(q, k, v, mask, plan.default_scale if scale is None else scale, layout, plan.mask_view)
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


def refresh_names() -> None:
    """Re-read the registry's names for the per-call fast check (the wiring calls it after registering)."""
    global _DIRECT
    _DIRECT = frozenset(registry.names())


registry.on_change(refresh_names)


def explain(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    backend: BackendArg = AttentionType.AUTO,
    layout: str = "BHND",
    scale: Optional[float] = None,
    quality: Optional[str] = None,
) -> List[dict]:
    """The chain ``attention`` would try for these inputs, each with the reason it cannot serve (or None).

    Runs no kernel (availability probes aside). The first entry whose ``reason`` is None is what runs.
    """
    name = _effective_name(backend)
    layout = normalise_layout(layout)
    mask_view = validate(q, k, v, mask, layout, scale)
    call = make_call(q, k, v, mask, scale, layout, mask_view)
    level = effective_quality(name, quality)
    _, reasons = _resolve(name, call, level, measure=False)
    return [{"name": n, "reason": r, "quality": level} for n, r in reasons]
