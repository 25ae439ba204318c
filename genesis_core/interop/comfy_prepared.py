"""What a ComfyUI attention override runs for a call signature it has seen before.

The first call with a signature goes the full way (arguments bound and checked, the engine validates and
plans, the autotuner may measure); afterwards :func:`call_key` finds the prepared function in a dict and the
call goes straight to the kernel: :func:`direct_fn` calls the served backend's plain kernel
(``Backend.direct``) between the same views and transposes ComfyUI's ``attention_pytorch`` uses, and
:func:`engine_fn` (backends without one) calls the engine, whose plan for the signature is cached. Prepared
functions are keyed by the registry's change counter, so a registry or autotuner change rebuilds them.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch

from ..attn import registry as _registry
from ..attn.call import make_call
from .comfy_call import _engine

__all__ = ["Prepared", "call_key", "direct_fn", "engine_fn"]


class Prepared:
    """What a call signature seen before runs: ``fn(q, k, v)``, the run-table row it counts into, and the
    backend it runs (None: ask the engine after each call)."""

    __slots__ = ("fn", "counts", "served")

    def __init__(self, fn: Callable[..., torch.Tensor], counts: Dict[str, int], served: Optional[str]):
        self.fn = fn
        self.counts = counts
        self.served = served


_MAX_PREPARED = 1024
_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None) or (lambda: False)
_grad_enabled = torch.is_grad_enabled
# Bumped whenever the registry says decisions made from it may be stale (a backend added, removed or
# re-probed, the autotuner cleared, re-tuned or switched): prepared functions are keyed by it.
_generation = [0]


def _registry_changed() -> None:
    _generation[0] += 1


_registry.on_change(_registry_changed)


def call_key(args: Tuple[Any, ...], kwargs: Dict[str, Any], level: Optional[str], context: Any) -> Optional[tuple]:
    """What a prepared function is keyed by: the shapes and strides of q, k, v (what the views depend on),
    q's dtype and device, heads, attn_precision, the two reshape flags, the level, whether autograd will need a
    backward (grad enabled and an input that requires grad: a forward-only kernel cannot serve then), the
    registry generation and ``context`` (what ``auto`` resolves to); None for calls that always take the full
    path (a mask, positional arguments beyond ComfyUI's, something that is not a tensor). k's and v's dtypes
    and devices are left out: a call where they differ from q's fails in the kernel, and the full path then
    checks it and says why."""
    n = len(args)
    if n < 3 or n > 8:
        return None
    get = kwargs.get
    if (args[4] if n > 4 else get("mask")) is not None:
        return None
    q, k, v = args[0], args[1], args[2]
    try:
        return (q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(), q.dtype, q.device,
                args[3] if n > 3 else get("heads"), args[5] if n > 5 else get("attn_precision"),
                args[6] if n > 6 else get("skip_reshape", False),
                args[7] if n > 7 else get("skip_output_reshape", False), level,
                _grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad), _generation[0],
                context)
    except (AttributeError, TypeError):
        return None


def _viewable(t: torch.Tensor, shape: tuple) -> bool:
    try:
        t.view(shape)
        return True
    except RuntimeError:
        return False


def engine_fn(q, k, v, heads: int, skip_reshape: bool, skip_output_reshape: bool, backend, level):
    """``fn(q, k, v)`` for calls shaped like these: views -> the engine (its plan for this signature is
    cached) -> ComfyUI's output layout. Shapes are fixed here; they are passed unpacked (``view(*shape)``
    parses faster than ``view(shape)``)."""
    eager = _engine().eager_attention
    if skip_reshape:
        b, h, nq, _ = q.shape
        out = (b, nq, h * v.shape[3])
        if skip_output_reshape:
            def fn(q, k, v):
                return eager(q, k, v, None, backend, "BHND", None, level)
        else:
            def fn(q, k, v):
                return eager(q, k, v, None, backend, "BHND", None, level).transpose(1, 2).reshape(*out)
        return fn
    qs = (q.shape[0], q.shape[1], heads, q.shape[2] // heads)
    ks = (k.shape[0], k.shape[1], heads, k.shape[2] // heads)
    vs = (v.shape[0], v.shape[1], heads, v.shape[2] // heads)
    out = (qs[0], qs[1], heads * vs[3])
    if not (_viewable(q, qs) and _viewable(k, ks) and _viewable(v, vs)):  # rare: inputs a view cannot split
        def fn(q, k, v):
            o = eager(q.reshape(*qs), k.reshape(*ks), v.reshape(*vs), None, backend, "BNHD", None, level)
            return o.transpose(1, 2) if skip_output_reshape else o.reshape(*out)
        return fn
    if skip_output_reshape:
        def fn(q, k, v):
            return eager(q.view(*qs), k.view(*ks), v.view(*vs), None, backend, "BNHD", None, level).transpose(1, 2)
    else:
        def fn(q, k, v):
            return eager(q.view(*qs), k.view(*ks), v.view(*vs), None, backend, "BNHD", None, level).reshape(*out)
    return fn


def direct_fn(q, k, v, heads: int, skip_reshape: bool, skip_output_reshape: bool, served: str):
    """``fn(q, k, v)`` calling the served backend's plain kernel (``Backend.direct``: unmasked, default
    scale) between ComfyUI's own views, the way ``attention_pytorch`` calls SDPA: ``[B, N, H*D]`` ->
    view [B, N, H, D] -> transpose to [B, H, N, D] -> kernel -> transpose -> reshape. None when the
    backend has no such kernel for these inputs, or a view cannot split them."""
    try:
        backend = _registry.get(served)
    except KeyError:
        return None
    if backend.direct is None:
        return None
    if skip_reshape:
        call = make_call(q, k, v, None, None, "BHND", None)
    else:
        qs = (q.shape[0], q.shape[1], heads, q.shape[2] // heads)
        ks = (k.shape[0], k.shape[1], heads, k.shape[2] // heads)
        vs = (v.shape[0], v.shape[1], heads, v.shape[2] // heads)
        if not (_viewable(q, qs) and _viewable(k, ks) and _viewable(v, vs)):
            return None
        call = make_call(q.view(qs), k.view(ks), v.view(vs), None, None, "BNHD", None)
    kernel = backend.direct(call)
    if kernel is None:
        return None
    if skip_reshape:
        b, h, nq, _ = q.shape
        out = (b, nq, h * v.shape[3])
        if skip_output_reshape:
            return kernel
        def fn(q, k, v):
            return kernel(q, k, v).transpose(1, 2).reshape(*out)
        return fn
    out = (qs[0], qs[1], heads * vs[3])
    if skip_output_reshape:
        def fn(q, k, v):
            return kernel(q.view(*qs).transpose(1, 2), k.view(*ks).transpose(1, 2), v.view(*vs).transpose(1, 2))
    else:
        def fn(q, k, v):
            return kernel(q.view(*qs).transpose(1, 2), k.view(*ks).transpose(1, 2),
                          v.view(*vs).transpose(1, 2)).transpose(1, 2).reshape(*out)
    return fn
