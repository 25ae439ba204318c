"""Adapter from ComfyUI's attention calling convention to Genesis :func:`attention`.

ComfyUI's attention functions (``comfy.ldm.modules.attention.attention_*``) share one signature::

    fn(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False, **kwargs)

* ``skip_reshape=False``: q, k, v are ``[B, N, heads * D]``; ``True``: ``[B, heads, N, D]``.
* ``skip_output_reshape=False``: the result is ``[B, Nq, heads * Dv]``; ``True``: ``[B, heads, Nq, Dv]``.
* ``mask``: additive float or boolean (True = attend), 2-D ``[Nq|1, Nk]``, 3-D ``[B|1, Nq|1, Nk]`` or
  4-D ``[B|1, H|1, Nq|1, Nk]``; 2-D and 3-D masks get their missing batch/head dims in front, as
  ``attention_pytorch`` does.
* ``attn_precision``: ``torch.float32`` asks for the score matrix in float32 for half inputs.
* ``kwargs``: ``transformer_options`` and ComfyUI's private ``_inside_attn_wrapper`` flag, plus whatever
  later ComfyUI versions add; they are accepted and handed back untouched when the original function runs.

ComfyUI calls a model's ``transformer_options["optimized_attention_override"]`` as
``override(original_fn, *args, **kwargs)``. :class:`GenesisAttentionOverride` is such an override. This
module never imports ComfyUI.

This module is the calling convention (:func:`comfy_attention`, :func:`call_signature`, argument binding);
:mod:`.comfy_adapter` holds the override, :mod:`.comfy_prepared` what it runs for call signatures it has
seen, and :mod:`.comfy_steps` the sampling step -> quality level bookkeeping.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

from ..attn.types import mask_4d_shape

__all__ = ["comfy_attention", "call_signature", "bind_arguments"]

_HALF = (torch.float16, torch.bfloat16)


_dispatch = None


def _engine():
    # Imported lazily so that importing the adapter (and so the ComfyUI pack) stays cheap.
    # (``genesis_core.attention`` the attribute may be the function re-exported at the top; the module
    # path is unambiguous.)
    global _dispatch
    if _dispatch is None:
        from ..attn import dispatch

        _dispatch = dispatch
    return _dispatch


def _normalise_mask(mask: Optional[torch.Tensor], q_dtype: torch.dtype) -> Optional[torch.Tensor]:
    """ComfyUI mask -> 4-D mask broadcastable to [B, H, Nq, Nk] (what attention_pytorch hands to SDPA)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor or None; got {type(mask).__name__}")
    if not 1 <= mask.ndim <= 4:
        raise ValueError(
            f"mask must be 2-D [Nq, Nk], 3-D [B, Nq, Nk] or 4-D [B, H, Nq, Nk]; got shape {tuple(mask.shape)}"
        )
    mask = mask.reshape(mask_4d_shape(mask.shape))  # what attention_pytorch does: missing dims in front
    if mask.dtype != torch.bool and mask.dtype != q_dtype:
        mask = mask.to(q_dtype)
    return mask


def comfy_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    mask: Optional[torch.Tensor] = None,
    attn_precision: Optional[torch.dtype] = None,
    skip_reshape: bool = False,
    skip_output_reshape: bool = False,
    *,
    backend: Any = "auto",
    quality: Optional[str] = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Genesis attention with ComfyUI's signature and output layout (see the module docstring).

    Args:
        q, k, v: ``[B, N, heads*D]`` (or ``[B, heads, N, D]`` with ``skip_reshape``).
        heads: number of query heads.
        mask: optional additive/boolean mask in one of ComfyUI's shapes.
        attn_precision: ``torch.float32`` computes half-precision inputs in float32 on the ``pytorch``
            (plain math) backend, as ComfyUI's ``attention_basic`` does; fused kernels accumulate in
            float32 anyway.
        backend: a Genesis backend name or ``AttentionType``; ``"auto"`` lets Genesis choose.
        quality: the call's quality budget (``exact``, ``high``, ``fast``; None: the engine's default).
        kwargs: accepted and ignored (``transformer_options`` and future ComfyUI additions).

    Returns:
        ``[B, Nq, heads*Dv]``, or ``[B, heads, Nq, Dv]`` with ``skip_output_reshape``, in q's dtype.

    Raises:
        ValueError: shapes that do not fit ComfyUI's convention (the message names the argument).
    """
    if not isinstance(heads, int) or heads < 1:
        raise ValueError(f"heads must be a positive int; got {heads!r}")
    if skip_reshape:
        if q.ndim != 4:
            raise ValueError(f"q must be 4-D [B, heads, N, D] when skip_reshape=True; got shape {tuple(q.shape)}")
        qq, kk, vv, layout = q, k, v, "BHND"
    else:
        if q.ndim != 3:
            raise ValueError(f"q must be 3-D [B, N, heads*D] when skip_reshape=False; got shape {tuple(q.shape)}")
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.ndim != 3 or t.shape[-1] % heads:
                raise ValueError(
                    f"{name} must be 3-D [B, N, heads*D] with its last dim divisible by heads={heads}; got shape {tuple(t.shape)}"
                )
        b = q.shape[0]
        # [B, N, H*D] -> [B, N, H, D] is a view: Genesis takes the BNHD layout directly, no copy.
        qq = q.view(b, q.shape[1], heads, -1) if q.is_contiguous() else q.reshape(b, q.shape[1], heads, -1)
        kk = k.reshape(k.shape[0], k.shape[1], heads, -1)
        vv = v.reshape(v.shape[0], v.shape[1], heads, -1)
        layout = "BNHD"

    out_dtype = q.dtype
    name = backend.value if hasattr(backend, "value") else str(backend)
    if attn_precision == torch.float32 and q.dtype in _HALF and name == "pytorch":
        qq, kk, vv = qq.float(), kk.float(), vv.float()
    m = _normalise_mask(mask, qq.dtype)

    out = _engine().attention(qq, kk, vv, m, backend=backend, layout=layout, quality=quality)
    if out.dtype != out_dtype:
        out = out.to(out_dtype)

    if layout == "BHND":  # out: [B, H, Nq, Dv]
        if skip_output_reshape:
            return out
        bsz, h, nq, dv = out.shape
        return out.transpose(1, 2).reshape(bsz, nq, h * dv)
    # layout BNHD, out: [B, Nq, H, Dv]
    if skip_output_reshape:
        return out.transpose(1, 2)
    bsz, nq, h, dv = out.shape
    return out.reshape(bsz, nq, h * dv)


def call_signature(q: torch.Tensor, k: torch.Tensor, heads: int, mask: Optional[torch.Tensor], skip_reshape: bool) -> str:
    """A short human-readable key for one ComfyUI attention call shape: what the per-run log groups by."""
    if skip_reshape:
        b, h, nq, d = q.shape
        nk = k.shape[2]
    else:
        b, nq, hd = q.shape
        h, d, nk = heads, hd // heads, k.shape[1]
    mk = "none" if mask is None else ("bool" if mask.dtype == torch.bool else "additive")
    dev = q.device.type
    dt = str(q.dtype).replace("torch.", "")
    return f"{dev} {dt} B={b} H={h} Nq={nq} Nk={nk} D={d} mask={mk}"


_PARAMS = ("q", "k", "v", "heads", "mask", "attn_precision", "skip_reshape", "skip_output_reshape")


def bind_arguments(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Split a ComfyUI call into its named parameters and the remaining kwargs (left untouched)."""
    if len(args) > len(_PARAMS):
        raise TypeError(f"ComfyUI attention takes at most {len(_PARAMS)} positional arguments; got {len(args)}")
    bound = dict(zip(_PARAMS, args))
    rest = {}
    for key, value in kwargs.items():
        if key in _PARAMS:
            if key in bound:
                raise TypeError(f"ComfyUI attention got {key!r} both positionally and by name")
            bound[key] = value
        else:
            rest[key] = value
    missing = [p for p in _PARAMS[:4] if p not in bound]
    if missing:
        raise TypeError(f"ComfyUI attention call is missing {', '.join(missing)}")
    return bound, rest
