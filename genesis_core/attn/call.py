"""Checking an attention call's arguments and building the :class:`~.types.AttentionCall` backends see.

Public functions used by dispatch and the autotuner alike:

* :func:`backend_name` — a backend argument (AttentionType or name, any case, a few aliases) as a registry name;
* :func:`normalise_layout` — ``"BHND"`` / ``"BNHD"``, case-insensitive;
* :func:`validate` — every argument checked, with an error that names it, says what was expected and what
  came (and, where the shapes say the layout is swapped or a mask is a [B, Nk] key-padding mask, says so);
  returns the 4-D shape the mask is viewed as;
* :func:`make_call` — BHND views (no copy) of q, k, v and the 4-D mask view.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from . import registry
from .types import LAYOUTS, AttentionCall, AttentionType, mask_4d_shape

_ALIASES = {"flash_attention": "flash", "sage_attention": "sage", "math": "pytorch", "torch": "pytorch",
            "default": "auto"}


def backend_name(backend) -> str:
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


def normalise_layout(layout) -> str:
    """``"BHND"`` or ``"BNHD"`` (any case); ValueError otherwise."""
    if isinstance(layout, str) and layout.strip().upper() in LAYOUTS:
        return layout.strip().upper()
    raise ValueError(f"layout must be 'BHND' or 'BNHD'; got {layout!r} (upper or lower case)")


def check_scale(scale) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number or None; got {scale!r}")


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")


def _heads_tokens(t: torch.Tensor, layout: str) -> Tuple[int, int]:
    return (t.shape[1], t.shape[2]) if layout == "BHND" else (t.shape[2], t.shape[1])


def _shape_problem(q, k, v, layout: str) -> Optional[str]:
    """What is wrong with the q/k/v shapes under ``layout``, or None."""
    hq, _ = _heads_tokens(q, layout)
    hk, nk = _heads_tokens(k, layout)
    hv, nv = _heads_tokens(v, layout)
    if nk != nv:
        return f"key and value must have the same number of tokens; got key {nk}, value {nv}"
    if hk != hv:
        return f"key and value must have the same number of heads; got key {hk}, value {hv}"
    if hq % hk:
        return f"query heads ({hq}) must be a multiple of key/value heads ({hk}) for grouped-query attention"
    return None


def validate(q, k, v, mask, layout: str, scale) -> Optional[tuple]:
    """Check the call; return the 4-D shape the mask is viewed as (or None). Raises with a sentence."""
    layout = normalise_layout(layout)
    dims = "[B, H, N, D]" if layout == "BHND" else "[B, N, H, D]"
    for name, t in (("query", q), ("key", k), ("value", v)):
        _check_tensor(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D {dims} (layout {layout!r}); got shape {tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must have a floating-point dtype; got {t.dtype}")
        if 0 in t.shape:
            raise ValueError(f"{name} must have no empty dimension; got shape {tuple(t.shape)}")
    for name, t in (("key", k), ("value", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} dtype {t.dtype} differs from query dtype {q.dtype}; cast them to one dtype")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but query is on {q.device}; move them to one device")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"batch sizes differ: query {q.shape[0]}, key {k.shape[0]}, value {v.shape[0]}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"key head_dim {k.shape[3]} differs from query head_dim {q.shape[3]}")
    problem = _shape_problem(q, k, v, layout)
    if problem:
        other = "BNHD" if layout == "BHND" else "BHND"
        if _shape_problem(q, k, v, other) is None:
            problem += (f" (with layout={layout!r}; the shapes fit layout={other!r}: axes 1 and 2 look swapped, "
                        f"pass layout={other!r})")
        raise ValueError(problem)
    if scale is not None:
        check_scale(scale)
    if mask is None:
        return None
    return mask_view(mask, q, k, layout)


def mask_view(mask, q: torch.Tensor, k: torch.Tensor, layout: str) -> tuple:
    """The 4-D shape ``mask`` is viewed as for this call; TypeError/ValueError saying how to shape it."""
    _check_tensor("mask", mask)
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        raise TypeError(f"mask must be boolean (True = attend) or an additive float tensor; got dtype {mask.dtype}")
    if mask.device != q.device:
        raise ValueError(f"mask is on {mask.device} but query is on {q.device}; move it to the same device")
    hq, nq = _heads_tokens(q, layout)
    _, nk = _heads_tokens(k, layout)
    b = q.shape[0]
    shape = tuple(mask.shape)
    target = {1: (nk,), 2: (nq, nk), 3: (b, nq, nk), 4: (b, hq, nq, nk)}.get(len(shape))
    if target is None:
        raise ValueError(
            f"mask must be 1-D [Nk], 2-D [Nq, Nk], 3-D [B, Nq, Nk] or 4-D [B, H, Nq, Nk]; got shape {shape}"
        )
    if any(m != t and m != 1 for m, t in zip(shape, target)) or shape[-1] != nk:
        names = {1: "[Nk]", 2: "[Nq, Nk]", 3: "[B, Nq, Nk]", 4: "[B, H, Nq, Nk]"}[len(shape)]
        hint = ""
        if len(shape) == 2 and shape == (b, nk):
            hint = (f"; if it is a [B, Nk] key-padding mask, pass mask[:, None, :] (shape [B, 1, Nk] = "
                    f"({b}, 1, {nk}))")
        raise ValueError(
            f"mask shape {shape} does not broadcast to {names} = {target} "
            f"(each dimension must match or be 1, and the last must be Nk={nk}){hint}"
        )
    return mask_4d_shape(shape)


def make_call(q, k, v, mask, scale, layout: str, view) -> AttentionCall:
    """The BHND :class:`AttentionCall` of a validated call (views, no copies)."""
    if layout == "BNHD":
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if mask is not None:
        mask = mask.view(view) if mask.is_contiguous() else mask.reshape(view)
    return AttentionCall(q, k, v, mask, float(scale) if scale is not None else q.shape[-1] ** -0.5)
