"""``fa2`` backend: FlashAttention-2, the ``flash_attn`` package (``flash_attn.flash_attn_func``).

Limits, from the package's own checks (csrc/flash_attn/flash_api.cpp of Dao-AILab/flash-attention 2.8):
float16/bfloat16 only, head_dim <= 256 and a multiple of 8 (its Python wrapper pads other head dims with a
copy of q, k and v; Genesis refuses them instead), v's head_dim equal to q's, compute capability 8.0 or
newer ("FlashAttention only supports Ampere GPUs or newer"), no arbitrary mask, grouped-query attention
native (query heads a multiple of key/value heads), a backward pass. The kernel takes [B, N, H, D] tensors
whose last dim is contiguous: the call's BHND views are handed over transposed, never copied.

When only FlashAttention-4 is installed, ``flash_attn`` is its namespace package and has no
``flash_attn_func``: that is "not installed" here.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..._log import first_line
from ..limits import HALF, Limits
from ..registry import Backend, register
from ..types import AttentionCall
from . import _flash_pkg as pkg

PIP = "pip install flash-attn --no-build-isolation (needs CUDA and an Ampere or newer GPU)"
LIMITS = Limits(dtypes=HALF, devices=("cuda",), max_head_dim=256, head_dim_multiple=8, equal_v_head_dim=True,
                mask=False, min_capability=(8, 0))
TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 2e-2}

_fn: Optional[Callable] = None


def _load() -> Callable:
    mod = pkg.import_module("flash_attn")
    fn = getattr(mod, "flash_attn_func", None)
    if fn is None:
        raise ImportError("flash_attn has no flash_attn_func (only FlashAttention-4's flash_attn.cute is installed?)")
    return fn


def _probe() -> Optional[str]:
    global _fn
    _fn = None
    if not pkg.installed("flash_attn"):
        return f"not installed ({PIP})"
    device = pkg.probe_device()
    if device is None:
        return "installed, but no CUDA device: FlashAttention-2 runs on CUDA only"
    try:
        fn = _load()
    except Exception as exc:
        return f"import failed: {first_line(exc)} ({PIP})"
    _fn = fn
    why = pkg.probe_call(run, device, torch.bfloat16, TOLERANCE[torch.bfloat16], refusal=backend.refusal)
    if why is not None:
        _fn = None
    return why


def run(call: AttentionCall) -> torch.Tensor:
    return pkg.run_bnhd(_fn, call)


def _direct(call: AttentionCall) -> Optional[Callable[..., torch.Tensor]]:
    return pkg.direct_bnhd(_fn) if _fn is not None and call.mask is None else None


def _version() -> Optional[str]:
    return pkg.dist_version("flash-attn", "flash_attn")


backend = register(
    Backend(
        name="fa2",
        probe=_probe,
        run=run,
        description=lambda: "FlashAttention-2 (flash_attn.flash_attn_func), [B, N, H, D] views in and out",
        version=_version,
        limits=LIMITS,
        precision="exact",
        tolerance=dict(TOLERANCE),
        direct=_direct,
    ),
    rank=13,
)
