"""torch.compile support: under Dynamo, ``attention()`` becomes one opaque custom op.

Why one op for the whole dispatch rather than one per kernel: the choice Genesis makes (plan
cache, autotuner, thread-local ``use_backend``, run-time fallback) is Python state that Dynamo
would otherwise have to guard on, and the kernels (flash-attn, SageAttention's Triton kernels,
xformers, SDPA pinned under ``sdpa_kernel``) are not all traceable. Inside a compiled graph the
call is ``genesis::attention(q, k, v, mask, scale, layout, backend)``: its fake implementation
gives the output's shape (symbolic sizes welcome, so dynamic shapes do not recompile), and its
real implementation is the eager ``attention`` — so the autotuner measures on the first *real*
execution with real tensors, never during tracing, and later executions read the choice from the
plan cache. A ``use_backend`` block around a compiled model takes effect without recompiling.

The op returns its result as a contiguous [B, Nq, Hq, Dv] tensor (the memory layout
FlashAttention-style kernels produce, so usually no copy) and the traced wrapper returns a view
in the requested layout. Gradients are defined (recomputed through PyTorch SDPA in backward), so
compiled training works too; the eager path keeps each kernel's own autograd.
"""
from __future__ import annotations

import hashlib
from typing import Optional

import torch
import torch.nn.functional as F

from . import dispatch
from .call import normalise_layout
from .types import AttentionType, mask_4d_shape

from ._trace import is_compiling  # noqa: F401  (re-exported: the autotuner and tests ask it here)


def _namespace() -> str:
    # ComfyUI may import this package under another name, next to a pip-installed copy: one
    # namespace per copy keeps both copies' ops registered without clashing.
    if __name__.startswith("genesis_core."):
        return "genesis"
    return "genesis_" + hashlib.sha1(__name__.encode()).hexdigest()[:8]


NAMESPACE = _namespace()
OP_NAME = f"{NAMESPACE}::attention"
HAS_CUSTOM_OP = hasattr(torch, "library") and hasattr(torch.library, "custom_op")


def _to_bnhd_contiguous(out: torch.Tensor, layout: str) -> torch.Tensor:
    bnhd = out if layout == "BNHD" else out.transpose(1, 2)
    return bnhd.contiguous()


def _real(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
          scale: Optional[float], layout: str, backend: str, quality: Optional[str] = None) -> torch.Tensor:
    out = dispatch.eager_attention(q, k, v, mask, backend, layout, scale, quality)
    return _to_bnhd_contiguous(out, layout)


def _fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
          scale: Optional[float], layout: str, backend: str, quality: Optional[str] = None) -> torch.Tensor:
    if layout == "BNHD":
        b, n, h = q.shape[0], q.shape[1], q.shape[2]
    else:
        b, h, n = q.shape[0], q.shape[1], q.shape[2]
    return q.new_empty((b, n, h, v.shape[-1]))


def _reference_bnhd(q, k, v, mask, scale, layout) -> torch.Tensor:
    """Differentiable attention (PyTorch SDPA) in the op's output format, for the backward pass."""
    if layout == "BNHD":
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if k.shape[1] != q.shape[1]:
        group = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    if mask is not None:
        mask = mask.reshape(mask_4d_shape(mask.shape))  # broadcastable 4-D, as dispatch views it
        if mask.dtype != torch.bool:
            mask = mask.to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, mask, scale, layout, backend, _quality = inputs
    ctx.save_for_backward(q, k, v, mask)
    ctx.scale, ctx.layout = scale, layout


def _backward(ctx, grad):
    q, k, v, mask = ctx.saved_tensors
    with torch.enable_grad():
        qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
        out = _reference_bnhd(qq, kk, vv, mask, ctx.scale, ctx.layout)
        gq, gk, gv = torch.autograd.grad(out, (qq, kk, vv), grad)
    return gq, gk, gv, None, None, None, None, None


attention_op = None  # torch < 2.4 has no custom ops: Dynamo graph-breaks around the eager call instead
if HAS_CUSTOM_OP:
    try:
        attention_op = torch.library.custom_op(OP_NAME, mutates_args=())(_real)
        attention_op.register_fake(_fake)
        attention_op.register_autograd(_backward, setup_context=_setup_context)
    except RuntimeError as exc:  # defined already in this process (this module imported twice under one name)
        from .._log import log_once

        log_once(("custom-op", OP_NAME), f"torch.compile: {OP_NAME} already registered ({exc}); "
                                         "compiled graphs will break around attention instead")
        attention_op = None


def traced_attention(q, k, v, mask, backend, layout: str, scale, quality=None) -> torch.Tensor:
    """What ``attention()`` does while Dynamo traces it: one call of the opaque op."""
    name = backend.value if isinstance(backend, AttentionType) else str(backend)
    layout = normalise_layout(layout)
    if attention_op is None:
        return _graph_break_attention(q, k, v, mask, name, layout, scale, quality)
    out = attention_op(q, k, v, mask, None if scale is None else float(scale), layout, name, quality)
    return out if layout == "BNHD" else out.transpose(1, 2)


def _graph_break_attention(q, k, v, mask, name, layout, scale, quality):
    return dispatch.eager_attention(q, k, v, mask, name, layout, scale, quality)


if attention_op is None and hasattr(torch, "_dynamo"):
    _graph_break_attention = torch._dynamo.disable(_graph_break_attention)
