"""Quality budgets: how far from exact attention a call lets Genesis go for speed.

Every call carries a budget (``attention(..., quality=...)``; default ``exact``, or ``GENESIS_QUALITY``):

* ``exact``: bf16/fp16 rounding level. Only kernels that compute attention in the input precision
  (precision class ``exact``: SDPA and its sub-kernels, FlashAttention 2/3/4, xformers, the math path).
* ``high``: adds SageAttention's kernels (class ``int8``: INT8 Q·Kᵀ of smoothed keys; P·V in FP16, or in FP8
  with FP32 accumulation).
* ``fast``: adds kernels that quantise q, k and v all to FP8 (class ``fp8``: cuDNN and FA3 FP8 attention after
  Genesis's fused quantisation).

A level both *admits* precision classes (a kernel of a class outside the level is never tried) and
*bounds the measured error*: the autotuner compares each candidate with a float64 reference on a slice
of the live inputs, and a candidate over the level's thresholds (relative L2 error, cosine similarity)
is refused, with the numbers remembered. The thresholds of the lower levels were set from measurements
on an H200 (see README, "Quality budgets"). Leaf module.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import torch

ENV_QUALITY = "GENESIS_QUALITY"
LEVELS = ("exact", "high", "fast")
CLASSES = ("exact", "int8", "fp8")  # a backend's precision class, from least to most lossy
_ADMITS = {"exact": ("exact",), "high": ("exact", "int8"), "fast": ("exact", "int8", "fp8")}

# exact: what a correct kernel in the input dtype reaches against float64 (relative L2), with margin.
EXACT_REL_L2: Dict[torch.dtype, float] = {
    torch.float64: 1e-7, torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 2e-2,
}
# Lower levels: (max relative L2, min cosine similarity), independent of dtype (quantisation dominates).
LOSSY: Dict[str, Tuple[float, float]] = {
    "high": (5e-2, 0.999),
    "fast": (8e-2, 0.9965),
}

_default: Optional[str] = None


def normalise(quality, argument: str = "quality") -> str:
    """A level name from user input (case-insensitive); ValueError naming the valid levels otherwise."""
    if isinstance(quality, str):
        name = quality.strip().lower()
        if name in LEVELS:
            return name
    raise ValueError(f"{argument} must be one of {', '.join(LEVELS)}; got {quality!r}")


def default() -> str:
    """The process-wide default level: :func:`set_default`, else ``$GENESIS_QUALITY``, else ``exact``."""
    global _default
    if _default is None:
        raw = os.environ.get(ENV_QUALITY, "").strip()
        _default = normalise(raw, f"${ENV_QUALITY}") if raw else "exact"
    return _default


def set_default(quality: Optional[str]) -> None:
    """Set the default level for calls that pass no ``quality``; None re-reads ``$GENESIS_QUALITY``."""
    global _default
    _default = None if quality is None else normalise(quality)


def admits(level: str, precision: str) -> bool:
    """Whether a kernel of precision class ``precision`` may be tried under ``level``."""
    return precision in _ADMITS[level]


def loosest_for(precision: str) -> str:
    """The strictest level that admits ``precision`` (what an explicitly chosen backend implies)."""
    for level in LEVELS:
        if admits(level, precision):
            return level
    raise ValueError(f"unknown precision class {precision!r}; known: {', '.join(CLASSES)}")


def thresholds(level: str, dtype: torch.dtype, tolerance: Optional[float] = None) -> Tuple[float, float]:
    """(max relative L2, min cosine) a result must meet under ``level`` for inputs of ``dtype``.

    ``tolerance`` is a backend's own bound for the dtype; it replaces the dtype's default at ``exact``.
    """
    exact = EXACT_REL_L2.get(dtype, 3e-2) if tolerance is None else tolerance
    if level == "exact":
        return exact, 0.0
    rel, cos = LOSSY[level]
    return max(rel, exact), cos


def verdict(level: str, dtype: torch.dtype, rel_l2: float, cosine: Optional[float],
            tolerance: Optional[float] = None) -> Optional[str]:
    """Why a measured error does not fit ``level`` (a sentence with the numbers), or None when it does."""
    max_rel, min_cos = thresholds(level, dtype, tolerance)
    if rel_l2 != rel_l2:  # NaN
        return "output has NaN or Inf where the reference is finite"
    if rel_l2 > max_rel:
        dt = str(dtype).replace("torch.", "")
        return f"relative error {rel_l2:.3g} > tolerance {max_rel:.3g} ({dt}, quality '{level}')"
    if cosine is not None and min_cos and cosine < min_cos:
        return f"cosine similarity {cosine:.5f} < {min_cos:.5f} required at quality '{level}'"
    return None
