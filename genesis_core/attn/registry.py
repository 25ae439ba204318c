"""The attention backend registry.

A backend is one object (usually a module under ``backends/``) that answers three questions:

* ``available() -> str | None``: why it cannot run at all in this process (probed once, cached), or None.
* ``unsupported(call) -> str | None``: why it cannot serve this particular call, or None.
* ``run(call) -> Tensor``: the attention output in BHND, [B, Hq, Nq, Dv].

plus ``name``, ``description()`` (which kernel really runs) and ``version()``. Optionally,
``direct(call) -> fn | None``: a plain ``fn(q, k, v)`` computing the same as ``run(call)`` for calls like
``call`` that have no mask and the default scale, so dispatch can skip building an ``AttentionCall``
per call (used for the most common call, where every microsecond of dispatch shows).
Adding a backend is writing one file and calling :func:`register` from it.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from .types import AttentionCall


@dataclass
class Backend:
    """A registered attention backend. ``probe`` runs once, lazily, on the first availability question."""

    name: str
    probe: Callable[[], Optional[str]]
    unsupported: Callable[[AttentionCall], Optional[str]]
    run: Callable[[AttentionCall], torch.Tensor]
    description: Callable[[], str]
    version: Callable[[], Optional[str]] = lambda: None
    # Relative-error tolerance against a float32 reference, per dtype; the autotuner rejects worse.
    tolerance: Dict[torch.dtype, float] = field(default_factory=dict)
    # For calls without mask and with the default scale: a plain fn(q, k, v) equal to run(call), or None.
    direct: Optional[Callable[[AttentionCall], Optional[Callable[..., torch.Tensor]]]] = None
    _reason: Optional[str] = field(default=None, init=False, repr=False)
    _probed: bool = field(default=False, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

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

    def reason_for(self, call: AttentionCall) -> Optional[str]:
        """Why this backend cannot serve ``call`` (unavailable, or unsupported), or None."""
        reason = self.available()
        if reason is not None:
            return reason
        return self.unsupported(call)

    def reprobe(self) -> None:
        """Forget the cached availability (after installing a package, or in tests)."""
        with self._lock:
            self._probed = False
            self._reason = None
        from .dispatch import clear_plans  # plans hold what the old probe allowed

        clear_plans()


_REGISTRY: Dict[str, Backend] = {}
_REG_LOCK = threading.Lock()


def register(backend: Backend) -> Backend:
    """Add (or replace) a backend under ``backend.name``."""
    with _REG_LOCK:
        _REGISTRY[backend.name] = backend
    return backend


def unregister(name: str) -> None:
    with _REG_LOCK:
        _REGISTRY.pop(name, None)


def get(name: str) -> Backend:
    """The backend called ``name``; KeyError listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown attention backend {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def names() -> List[str]:
    return list(_REGISTRY)


def all_backends() -> List[Backend]:
    return list(_REGISTRY.values())


def report() -> List[dict]:
    """One row per backend: name, available, reason, version, kernel description (probes if needed)."""
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
            }
        )
    return rows
