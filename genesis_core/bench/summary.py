"""One shape's summary in the attention section: the fastest exact kernel, AUTO at each quality level.

Keys (``summarise``): ``fastest_correct`` / ``fastest_ms`` (the fastest row of an exact-class kernel within
its tolerance: AUTO at exact is judged against it), ``comfy_ms`` (the ``comfyui-default`` row), AUTO at exact
as before (``auto_backend``, ``auto_ms``, ``auto_correct``, ``choice_vs_fastest`` = the chosen kernel's own
row over the fastest, ``auto_over_kernel`` = the AUTO row over its kernel timed alternately,
``auto_vs_fastest`` = their product), ``rejected`` (rows over their level's thresholds, with why) and
``levels``: per level with an AUTO row, what it chose and its time, errors, thresholds, ``over_kernel``,
``vs_comfy`` (ComfyUI's ms / AUTO's, from the rows; ``vs_comfy_paired`` where the two were also timed
alternately) and the fastest kernel row that level admits and fits (``fastest`` / ``fastest_ms``).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from ..attn import quality
from .comfy_default import COMFY_ROW
from .judge import LEVEL_ROWS, ROW_LEVELS
from .shapes import Shape


def _kernel_rows(cells: Dict[str, dict]) -> Dict[str, dict]:
    return {n: c for n, c in cells.items() if n not in ROW_LEVELS and n != COMFY_ROW}


def fastest_fitting(cells: Dict[str, dict], level: str) -> Optional[str]:
    """The fastest timed kernel row whose class ``level`` admits and whose errors fit ``level``."""
    good = {n: c for n, c in _kernel_rows(cells).items() if c["ms"] is not None and c.get("precision")
            and quality.admits(level, c["precision"]) and level in (c.get("fits") or ())}
    return min(good, key=lambda n: good[n]["ms"]) if good else None


def _level_summary(level: str, cells: Dict[str, dict]) -> dict:
    row = cells[LEVEL_ROWS[level]]
    comfy = cells.get(COMFY_ROW)
    out = {"row": row["backend"], "backend": row.get("chosen"), "precision": row.get("precision"),
           "ms": row["ms"], "status": row["status"], "rel_err": row["rel_err"], "cos": row["cos"],
           "max_rel": row["tolerance"], "min_cos": row["min_cos"], "correct": row["correct"],
           "why": row.get("why"), "first_call_ms": row.get("first_call_ms")}
    if row["status"] != "ok":
        out["note"] = row["note"]
    if row["ms"] and row.get("paired_kernel_ms"):
        out["over_kernel"] = row["ms"] / row["paired_kernel_ms"]
    if row["ms"] and comfy is not None and comfy["ms"]:
        out["vs_comfy"] = comfy["ms"] / row["ms"]
    best = fastest_fitting(cells, level)
    out["fastest"], out["fastest_ms"] = best, cells[best]["ms"] if best else None
    return out


def summarise(shape: Shape, cells: Dict[str, dict], layout: str, dtype: torch.dtype) -> dict:
    """The summary of one shape's rows (see the module docstring); pairings and verdicts are added after."""
    good = {n: c for n, c in _kernel_rows(cells).items()
            if c["ms"] is not None and c["correct"] and c.get("precision") == "exact"}
    best = min(good, key=lambda n: good[n]["ms"]) if good else None
    auto = cells.get("auto")
    comfy = cells.get(COMFY_ROW)
    out = {"shape": shape.name, "layout": layout, "dtype": str(dtype).replace("torch.", ""),
           "fastest_correct": best, "fastest_ms": good[best]["ms"] if best else None,
           "comfy_ms": comfy["ms"] if comfy else None,
           "auto_backend": auto.get("chosen") if auto else None, "auto_ms": auto["ms"] if auto else None,
           "auto_correct": auto["correct"] if auto else None,
           "rejected": {n: c.get("why") or "not judged" for n, c in cells.items()
                        if c["correct"] is False and n not in ROW_LEVELS},
           "levels": {lv: _level_summary(lv, cells) for lv in quality.LEVELS if LEVEL_ROWS[lv] in cells}}
    if best and auto and auto["ms"]:
        chosen = cells.get(out["auto_backend"] or "")
        if chosen is not None and chosen["ms"]:
            # the choice's quality alone: the chosen kernel's own row (no dispatch) against the fastest
            out["choice_vs_fastest"] = chosen["ms"] / good[best]["ms"]
        if auto.get("paired_kernel_ms"):
            # Genesis' own cost over the kernel it chose (timed alternately), times the choice's quality
            out["auto_over_kernel"] = auto["ms"] / auto["paired_kernel_ms"]
            out["auto_vs_fastest"] = out["auto_over_kernel"] * out.get("choice_vs_fastest", 1.0)
        else:
            out["auto_vs_fastest"] = auto["ms"] / good[best]["ms"]
    return out
