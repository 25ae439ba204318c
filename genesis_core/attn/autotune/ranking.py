"""Choosing from a measured entry: the quality verdict on a candidate's errors, and the fastest survivor.

Pure functions over the autotuner's entries (``{"ms": {...}, "rel_err": {...}, "cos": {...}, "rejected":
{...}}``), used by the measuring loop (to reject what fits no level) and by the policy (to pick per level).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

from .. import quality, registry


def tolerance(backend: registry.Backend, dtype: torch.dtype) -> float:
    """The ``exact`` bound for ``backend`` at ``dtype``: its own tolerance, else the quality default."""
    tol = backend.tolerance.get(dtype)
    return tol if tol is not None else quality.EXACT_REL_L2.get(dtype, 3e-2)


def loosest_level(backend: registry.Backend) -> str:
    return "exact" if backend.precision == "exact" else quality.LEVELS[-1]


def error_verdict(backend: registry.Backend, dtype: torch.dtype, rel: float, cos: Optional[float],
                  level: Optional[str] = None) -> Optional[str]:
    """Why measured errors rule ``backend`` out at ``level`` (default: the loosest level it could serve)."""
    level = level or loosest_level(backend)
    tol = backend.tolerance.get(dtype)
    return quality.verdict(level, dtype, rel, cos, tol)


# On the H100 (2026-11-25) ``sdpa`` and ``sdpa_cudnn`` ran the same cuDNN kernel and their medians still
# swapped places between runs by up to ~10% on Flux/Wan shapes; the pinned variant also pays for the
# ``sdpa_kernel`` context on every call. Ties go to the backend that lets PyTorch choose.
TIE_MARGIN = 0.03


def prefer_default(ms: Dict[str, float], candidates: Sequence[str]) -> Optional[str]:
    """The fastest of ``candidates`` (names with a timing in ``ms``), unless a backend earlier in the
    default order is within ``TIE_MARGIN`` of it; then that one."""
    ranked = sorted((n for n in candidates if n in ms), key=ms.get)
    if not ranked:
        return None
    best = ranked[0]
    for name in registry.AUTO_ORDER:
        if name in ranked and ms[name] <= ms[best] * (1.0 + TIE_MARGIN):
            return name
    return best


def _dtype_of(entry: dict) -> Optional[torch.dtype]:
    shape = entry.get("shape") or ""
    name = shape.rsplit(" ", 1)[-1] if shape else ""
    return getattr(torch, name, None) if name else None


def refused_for(entry: dict, candidates: Sequence[str], level: str) -> Dict[str, str]:
    """{name: why} for measured candidates whose recorded errors do not fit ``level``."""
    dtype = _dtype_of(entry) or torch.bfloat16
    out = {}
    rel, cos = entry.get("rel_err", {}), entry.get("cos", {})
    for n in candidates:
        if n not in entry.get("ms", {}):
            continue
        try:
            b = registry.get(n)
        except KeyError:
            continue
        if b.precision == "exact":
            continue  # exact kernels were held to their tolerance when measured
        e = rel.get(n)
        why = "no error recorded" if e is None else error_verdict(b, dtype, e, cos.get(n), level)
        if why:
            out[n] = why
    return out


def pick(entry: dict, servable: Sequence[str], level: str = "exact") -> Optional[str]:
    """The measured survivor that can serve this call under ``level`` (see :func:`prefer_default`), or None."""
    rejected = entry.get("rejected", {})
    ok = [n for n in servable if n not in rejected and _admitted(n, level)]
    refused = refused_for(entry, ok, level)
    return prefer_default(entry.get("ms", {}), [n for n in ok if n not in refused])


def _admitted(name: str, level: str) -> bool:
    """Whether ``level`` admits the precision class of the backend called ``name`` (a name the registry does not
    know has no class to refuse; dispatch never offers one)."""
    try:
        return quality.admits(level, registry.get(name).precision)
    except KeyError:
        return True
