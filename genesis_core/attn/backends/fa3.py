"""``fa3`` backend: FlashAttention-3, from ``flash_attn_interface`` (the FA3 builds of hopper/ in
Dao-AILab/flash-attention) where it imports, else ``fa3_fwd_interface`` (PyPI ``fa3-fwd``, forward only).
``description()`` and ``version()`` say which one runs.

Limits, from hopper/flash_api.cpp (mha_fwd): float16/bfloat16 (FP8 is a separate backend), head_dim <= 256
and a multiple of 8, v's head_dim equal to q's (FA3 has a few unequal pairs on Hopper; not offered here),
no arbitrary mask, grouped-query attention native. Compute capability 8.0 (its SM8x kernels, built unless
``FLASHATTENTION_DISABLE_SM8x``) to 9.0: the Hopper kernels are built for sm_90a only, so later GPUs cannot
load them. What a build left out is read from its config module (``flash_attn_config`` or ``fa3_fwd_config``)
and refused per call: fa3-fwd 0.0.3 is built with ``FLASHATTENTION_DISABLE_FP16`` and
``FLASHATTENTION_DISABLE_BACKWARD`` (bfloat16 only, no backward). The kernel takes [B, N, H, D] tensors
whose last dim is contiguous: the call's BHND views are handed over transposed, never copied.

Host cost: ``flash_attn_func`` goes through an autograd Function and a ``torch.library`` custom op before the
compiled ``fwd`` op; where the module exposes that op with the arguments used here, ``run`` calls it directly
(the FP8 backend does the same, see fa3_fp8.py) and the probe checks that path against float64, falling back to
``flash_attn_func`` when it fails. The op records nothing for autograd: calls that need a backward always go
through ``flash_attn_func``.
"""
from __future__ import annotations

from types import ModuleType
from typing import Callable, Dict, Optional, Tuple

import torch

from ..._log import first_line
from ..limits import HALF, Limits, dtype_name, needs_grad
from ..registry import Backend, register
from ..types import AttentionCall
from . import _flash_pkg as pkg

LIMITS = Limits(dtypes=HALF, devices=("cuda",), max_head_dim=256, head_dim_multiple=8, equal_v_head_dim=True,
                mask=False, min_capability=(8, 0), max_capability=(9, 0))
TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 2e-2}
# head dims the kernels are instantiated for; a call rounds up to the next one the build kept
_HDIMS = (64, 96, 128, 192, 256)

_impl: Optional[Tuple[ModuleType, str]] = None  # (interface module, label)
_fn: Optional[Callable] = None  # what serves calls without autograd: the compiled fwd op, else flash_attn_func
_wrapper: Optional[Callable] = None  # flash_attn_func, the module's autograd Function: calls that need a backward
_flags: Dict[str, bool] = {}


def _probe() -> Optional[str]:
    global _impl, _fn, _wrapper, _flags
    _impl, _fn, _wrapper, _flags = None, None, None, {}
    if not pkg.fa3_installed():
        return f"not installed ({pkg.FA3_PIP})"
    device = pkg.probe_device()
    if device is None:
        return "installed, but no CUDA device: FlashAttention-3 runs on CUDA only"
    try:
        mod, label = pkg.fa3_module()
    except ImportError as exc:
        return str(exc)
    fn = getattr(mod, "flash_attn_func", None)
    if fn is None:
        return f"{mod.__name__} has no flash_attn_func ({pkg.FA3_PIP})"
    _impl, _flags = (mod, label), pkg.fa3_build_flags(mod)
    dtype = torch.float16 if not _flags.get("FLASHATTENTION_DISABLE_FP16") else torch.bfloat16
    op = pkg.fa3_fwd_op(mod)
    for _fn in ([_direct_fn(op)] if op is not None else []) + [fn]:
        try:
            why = pkg.probe_call(run, device, dtype, TOLERANCE[dtype], refusal=backend.refusal)
        except Exception as exc:
            why = f"probe call failed: {first_line(exc)}"
        if why is None:
            break
    if why is not None:
        _impl, _fn = None, None
        return f"{label}: {why}"
    _wrapper = fn
    return None


def _direct_fn(op: Callable) -> Callable[..., torch.Tensor]:
    """``flash_attn_func``'s signature on the compiled forward op (no autograd, no custom-op dispatch)."""
    def fwd(q, k, v, softmax_scale=None):
        scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
        return op(q, k, v, softmax_scale=scale, num_splits=1)[0]

    fwd.direct_op = True  # type: ignore[attr-defined]
    return fwd


def _build_refusal(call: AttentionCall) -> Optional[str]:
    """What the installed build left out (its config module's flags), worded like the limits."""
    if not _flags:
        return None
    which = f"this build of {_impl[0].__name__ if _impl else 'FlashAttention-3'}"
    if call.dtype == torch.float16 and _flags.get("FLASHATTENTION_DISABLE_FP16"):
        return (f"dtype {dtype_name(call.dtype)} not supported: needs bfloat16 ({which} was compiled with "
                "FLASHATTENTION_DISABLE_FP16)")
    if _flags.get("FLASHATTENTION_DISABLE_BACKWARD") and needs_grad(call):
        return ("inputs that require grad not supported: needs torch.no_grad() "
                f"({which} was compiled with FLASHATTENTION_DISABLE_BACKWARD)")
    kept = [d for d in _HDIMS if not _flags.get(f"FLASHATTENTION_DISABLE_HDIM{d}")]
    if kept and call.head_dim > max(kept):
        return f"head_dim {call.head_dim} not supported: needs <= {max(kept)} ({which} left out larger head dims)"
    return None


def _kernel(call: AttentionCall) -> Callable:
    """The compiled fwd op has no autograd: a call that needs a backward goes through ``flash_attn_func``."""
    return _wrapper if _wrapper is not None and needs_grad(call) else _fn


def run(call: AttentionCall) -> torch.Tensor:
    return pkg.run_bnhd(_kernel(call), call)


def _direct(call: AttentionCall) -> Optional[Callable[..., torch.Tensor]]:
    return pkg.direct_bnhd(_kernel(call)) if _fn is not None and call.mask is None else None


def _description() -> str:
    backend.available()
    if _impl is None:
        return "FlashAttention-3 (flash_attn_interface, else fa3_fwd_interface): none runs here"
    path = "its compiled fwd op called directly" if getattr(_fn, "direct_op", False) else "flash_attn_func"
    return f"{_impl[1]}, [B, N, H, D] views in and out, through {path}"


def _version() -> Optional[str]:
    """``<version> (<distribution>)`` of the module that runs, else of the first one installed."""
    backend.available()
    for mod, _label, dists, _config in pkg.FA3_MODULES:
        if (_impl is not None and _impl[0].__name__ == mod) or (_impl is None and pkg.installed(mod)):
            ver = pkg.dist_version(*dists)
            if ver is None and _impl is not None:
                ver = getattr(_impl[0], "__version__", None)
            return f"{ver or 'unknown version'} ({dists[0]})"
    return None


def module() -> Optional[ModuleType]:
    """The FA3 interface module that passed the probe (None where fa3 does not run)."""
    backend.available()
    return _impl[0] if _impl is not None else None


backend = register(
    Backend(
        name="fa3",
        probe=_probe,
        run=run,
        description=_description,
        version=_version,
        limits=LIMITS,
        unsupported=_build_refusal,
        precision="exact",
        tolerance=dict(TOLERANCE),
        direct=_direct,
    ),
    rank=12,
)
