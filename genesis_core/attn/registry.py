"""The attention backend registry: what each backend declares, in what order, and a change signal.

A backend is one :class:`Backend` record, registered from its own file under ``backends/``:

* ``limits``: what it accepts, as data (:class:`~.limits.Limits`), checked by one shared function;
* ``unsupported(call) -> str | None`` (optional): only what data cannot say (PyTorch's own refusals);
* ``probe() -> str | None``: why it cannot run at all in this process, found with a tiny real call where an
  import can lie; run once, lazily, and cached;
* ``run(call) -> Tensor``: the output in BHND, [B, Hq, Nq, Dv];
* ``precision``: its error class (``exact``, ``int8`` or ``fp8``; see :mod:`.quality`);
* ``direct(call) -> fn | None`` (optional): a plain ``fn(q, k, v)`` in the caller's layout computing the
  same as ``run`` for calls like ``call`` with no mask and the default scale, so dispatch can skip building
  an ``AttentionCall`` on the most common call.

Order is data: ``register(backend, rank=...)`` places it in the registry order (what ``explain`` and the
backends table show), and :data:`AUTO_ORDER` (with :data:`UNMEASURED_ORDER` per device type) is the order AUTO
uses before any measurement exists.
Anything that caches decisions made from the registry (dispatch's plans) subscribes with :func:`on_change`;
the registry calls it when a backend is added, removed or re-probed. Leaf module: it imports nothing above
:mod:`.types` and :mod:`.limits`.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .limits import ANY, Limits, checker
from .types import AttentionCall

# AUTO's order before any measurement (and when measuring is off): the backend that lets PyTorch choose
# first; ties within the autotuner's margin go to the earliest one here.
AUTO_ORDER: Tuple[str, ...] = ("sdpa", "flash", "xformers", "pytorch")
# Per device type, the order used instead where nothing was measured. On CUDA, ComfyUI calls SDPA with cuDNN first
# (comfy/ops.py), while PyTorch's default order put FlashAttention-2 first for Wan 1.3B's 12-head 32760-token
# self-attention on an H200 (2026-12-01: 37 ms against cuDNN's 23 ms at batch 2): unmeasured, Genesis runs what
# ComfyUI runs. Ties after a measurement still go to AUTO_ORDER (plain sdpa has the cheaper host path).
UNMEASURED_ORDER: Dict[str, Tuple[str, ...]] = {"cuda": ("sdpa_cudnn",) + AUTO_ORDER}
# What every chain ends with, in this order.
FALLBACK_TAIL: Tuple[str, ...] = ("sdpa", "pytorch")


@dataclass
class Backend:
    """A registered attention backend. ``probe`` runs once, lazily, on the first availability question."""

    name: str
    probe: Callable[[], Optional[str]]
    run: Callable[[AttentionCall], torch.Tensor]
    description: Callable[[], str]
    unsupported: Optional[Callable[[AttentionCall], Optional[str]]] = None
    version: Callable[[], Optional[str]] = lambda: None
    limits: Limits = ANY
    precision: str = "exact"
    # Relative-error bound against the float64 reference per dtype: at ``exact`` it replaces the dtype's default
    # (quality.EXACT_REL_L2), at a lower level the larger of it and the level's bound applies (quality.thresholds).
    tolerance: Dict[torch.dtype, float] = field(default_factory=dict)
    direct: Optional[Callable[[AttentionCall], Optional[Callable[..., torch.Tensor]]]] = None
    # Cost of the first call of a new configuration (a JIT compile), in seconds, once known; for `info`.
    first_call_s: Optional[float] = None
    _reason: Optional[str] = field(default=None, init=False, repr=False)
    _probed: bool = field(default=False, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        self._check = checker(self.limits, self.unsupported)

    def available(self) -> Optional[str]:
        """None when the backend can run here, otherwise the reason it cannot (probed once)."""
        if not self._probed:
            with self._lock:
                if not self._probed:
                    try:
                        self._reason = self.probe()
                    except Exception as exc:  # a probe must never take the process down
                        self._reason = f"probe failed: {type(exc).__name__}: {exc}"
                    self._probed = True
        return self._reason

    def refusal(self, call: AttentionCall) -> Optional[str]:
        """Why ``call`` is outside this backend's limits (or refused by its ``unsupported``), or None.
        Does not probe availability."""
        return self._check(call)

    def reason_for(self, call: AttentionCall) -> Optional[str]:
        """Why this backend cannot serve ``call`` (unavailable, outside its limits, or refused), or None."""
        reason = self.available()
        if reason is not None:
            return reason
        return self._check(call)

    def reprobe(self) -> None:
        """Forget the cached availability (after installing a package, or in tests)."""
        with self._lock:
            self._probed = False
            self._reason = None
        changed()


_REGISTRY: Dict[str, Backend] = {}
_RANKS: Dict[str, float] = {}
_REG_LOCK = threading.Lock()
_listeners: List[Callable[[], None]] = []


def on_change(callback: Callable[[], None]) -> None:
    """Call ``callback()`` whenever a backend is registered, removed or re-probed (or :func:`changed` runs)."""
    if callback not in _listeners:
        _listeners.append(callback)


def changed() -> None:
    """Tell every subscriber that decisions made from the registry may be stale."""
    for callback in list(_listeners):
        callback()


def register(backend: Backend, rank: Optional[float] = None) -> Backend:
    """Add (or replace) a backend under ``backend.name``. ``rank`` orders the registry (lower first);
    a replaced backend keeps its place, a new one without a rank goes last."""
    with _REG_LOCK:
        if rank is not None:
            _RANKS[backend.name] = float(rank)
        elif backend.name not in _RANKS:
            _RANKS[backend.name] = max(_RANKS.values(), default=0.0) + 1.0
        _REGISTRY[backend.name] = backend
    changed()
    return backend


def unregister(name: str) -> None:
    with _REG_LOCK:
        _REGISTRY.pop(name, None)
        _RANKS.pop(name, None)
    changed()


def get(name: str) -> Backend:
    """The backend called ``name``; KeyError listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown attention backend {name!r}; known: {', '.join(names())}") from None


def names() -> List[str]:
    """Registered names in registry order."""
    with _REG_LOCK:
        return sorted(_REGISTRY, key=lambda n: (_RANKS.get(n, 0.0), n))


def all_backends() -> List[Backend]:
    return [_REGISTRY[n] for n in names() if n in _REGISTRY]


def report() -> List[dict]:
    """One row per backend: name, available, reason, version, kernel, precision, limits (probes if needed)."""
    rows = []
    for b in all_backends():
        reason = b.available()
        rows.append(
            {
                "name": b.name,
                "available": reason is None,
                "reason": reason,
                "version": b.version(),
                "kernel": b.description(),
                "precision": b.precision,
                "limits": b.limits.describe(),
                "first_call_s": b.first_call_s,
            }
        )
    return rows
