"""Whether a row of the attention bench is right: its output against float64, under its quality level.

Every row is judged on the same float64 reference slice (``autotune.reference_slice``) by relative L2
error *and* cosine similarity (``autotune.errors``), both recorded, against the thresholds of one level
(``quality.thresholds``): a kernel row at the strictest level its precision class allows (``exact`` for
exact kernels, against their own tolerance; ``high`` for INT8 kernels; ``fast`` for FP8 ones), an AUTO
row at the level it ran under (``auto`` = exact, ``auto@high``, ``auto@fast``), the ``comfyui-default``
baseline as an exact SDPA call. ``fits`` lists every level whose thresholds a row meets.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch

from ..attn import quality, registry

LEVEL_ROWS: Dict[str, str] = {"exact": "auto", "high": "auto@high", "fast": "auto@fast"}
ROW_LEVELS: Dict[str, str] = {row: level for level, row in LEVEL_ROWS.items()}


def level_of(name: str, backend: Optional[registry.Backend]) -> str:
    """The level a row is judged at: an AUTO row's own, else the strictest one its precision class allows."""
    if name in ROW_LEVELS:
        return ROW_LEVELS[name]
    return quality.loosest_for(backend.precision) if backend is not None else "exact"


def judge(row: dict, backend: Optional[registry.Backend], dtype: torch.dtype, rel: float,
          cos: Optional[float], level: str) -> None:
    """Fill ``row`` with the errors and the verdict: ``rel_err``, ``cos``, ``level``, ``tolerance`` (max
    relative L2 at that level), ``min_cos`` (None where the level bounds no cosine), ``correct``, ``why``
    (the reason when not correct), ``precision`` and ``fits``. ``backend`` gives the tolerance and the
    precision class (for an AUTO row, the backend it chose)."""
    tol = backend.tolerance.get(dtype) if backend is not None else None
    precision = backend.precision if backend is not None else "exact"
    max_rel, min_cos = quality.thresholds(level, dtype, tol)
    finite = isinstance(rel, float) and math.isfinite(rel)
    why = quality.verdict(level, dtype, rel if finite else float("nan"), cos, tol)
    row.update(rel_err=rel if finite else None, cos=cos if finite else None, level=level, tolerance=max_rel,
               min_cos=min_cos or None, correct=why is None, why=why, precision=precision)
    row["fits"] = [lv for lv in quality.LEVELS if quality.admits(lv, precision) and finite
                   and quality.verdict(lv, dtype, rel, cos, tol) is None]
