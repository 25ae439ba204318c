"""``xformers`` backend: ``xformers.ops.memory_efficient_attention``.

Availability is probed with a tiny real call on CUDA: an xformers wheel built for another torch
imports fine, warns, and then has no operator for any input (seen on an H100 with torch 2.11 and
xformers 0.0.35), so an import proves nothing. Fully masked query rows (every key masked out) return 0, as in
PyTorch's SDPA.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch

from ..._log import first_line
from ..limits import Limits
from ..registry import Backend, register
from ..types import AttentionCall
from ._common import additive_mask, dead_rows, expand_kv, module_present, package_version

_ops = None


def _probe() -> Optional[str]:
    global _ops
    if not module_present("xformers"):
        return "not installed (pip install xformers matching your torch build)"
    try:
        xformers = importlib.import_module("xformers")
        ops = importlib.import_module("xformers.ops")
    except Exception as exc:
        return f"import failed: {type(exc).__name__}: {exc}"
    if not torch.cuda.is_available():
        return "no CUDA device: xformers' memory-efficient kernels run on CUDA only"
    try:
        x = torch.randn(1, 16, 1, 64, device="cuda", dtype=torch.float16)
        out = ops.memory_efficient_attention(x, x, x)
        torch.cuda.synchronize()
        if not torch.isfinite(out).all():
            return "probe call returned non-finite values"
    except Exception as exc:
        if not getattr(xformers, "_has_cpp_library", True):
            built = ""
            try:
                info = importlib.import_module("xformers._cpp_lib")._build_metadata
                built = f" (xformers {package_version('xformers')} was built for torch {info.torch_version}, CUDA {info.cuda_version}; running torch {torch.__version__})"
            except Exception:
                built = f" (running torch {torch.__version__})"
            return "xformers C++ extension not built for this torch" + built
        return f"probe call failed: {first_line(exc)}"
    _ops = ops
    return None


def run(call: AttentionCall) -> torch.Tensor:
    k, v = expand_kv(call)
    bias = dead = None
    if call.mask is not None:
        b, h, nq, nk = call.batch, call.heads, call.q_len, call.kv_len
        # xformers wants a dense bias in q's dtype whose rows are 8-element aligned: pad, then slice.
        padded = torch.empty((b, h, nq, (nk + 7) // 8 * 8), dtype=call.dtype, device=call.device)
        bias = padded[..., :nk]
        bias.copy_(additive_mask(call.mask, call.dtype).expand(b, h, nq, nk))
        # A row that is -inf on every key (in q's dtype) is NaN in a softmax kernel, xformers' too; Genesis' rule,
        # PyTorch SDPA's, is 0. Such rows get a zero bias (a finite softmax, finite gradients) and a zeroed output.
        dead = dead_rows(bias)
        bias.masked_fill_(dead, 0.0)
    out = _ops.memory_efficient_attention(
        call.q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, scale=call.scale
    ).transpose(1, 2)
    if dead is not None:  # out of place where autograd records: xformers' backward reads its own output
        out = out.masked_fill(dead, 0.0) if out.requires_grad else out.masked_fill_(dead, 0.0)
    return out


backend = register(
    Backend(
        name="xformers",
        probe=_probe,
        limits=Limits(dtypes=(torch.float16, torch.bfloat16, torch.float32), devices=("cuda",)),
        run=run,
        description=lambda: "xformers.ops.memory_efficient_attention (CUTLASS / FlashAttention kernels chosen by xformers)",
        version=lambda: package_version("xformers"),
        tolerance={torch.float16: 1e-2, torch.bfloat16: 2e-2, torch.float32: 1e-3},
    ),
    rank=30,
)
