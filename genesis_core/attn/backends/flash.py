"""``flash`` backend: FlashAttention.

Uses, in this order, whichever is installed and really runs:
FA4 (``flash_attn.cute``), FA3 (``flash_attn_interface``), FA2 (``flash_attn.flash_attn_func``).
Where none is installed, PyTorch's built-in FlashAttention kernel serves the call through
``torch.nn.attention.sdpa_kernel(SDPBackend.FLASH_ATTENTION)`` (FA2 on CUDA, PyTorch's own
flash-style kernel on CPU); ``description()`` says which one is in use.
No FlashAttention variant takes an arbitrary mask: masked calls fall back along the chain.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Callable, Optional, Tuple

import torch

from ..registry import Backend, get, register
from ..types import AttentionCall
from ._common import module_present, package_version
from .sdpa import FLASH_CUDA_LIMITS, sdpa_kernel

# (label, module to import, attribute, distribution name for the version)
_CANDIDATES = (
    ("FlashAttention-4 (flash_attn.cute)", "flash_attn.cute", "flash_attn_func", "flash-attn-cute"),
    ("FlashAttention-3 (flash_attn_interface)", "flash_attn_interface", "flash_attn_func", "flash_attn_3"),
    ("FlashAttention-2 (flash_attn)", "flash_attn", "flash_attn_func", "flash-attn"),
)

_impl: Optional[Tuple[str, Callable, Optional[str]]] = None  # (label, fn, version) of the package route
_notes: list = []


def _probe_packages() -> None:
    """Find the newest installed FlashAttention package whose kernel really runs (CUDA only)."""
    global _impl
    _impl = None
    _notes.clear()
    for label, mod, attr, dist in _CANDIDATES:
        if not module_present(mod.split(".")[0]) or not module_present(mod):
            continue
        try:
            fn = getattr(importlib.import_module(mod), attr)
        except Exception as exc:  # a broken build imports badly; say so and try the next
            _notes.append(f"{label}: import failed ({type(exc).__name__}: {exc})")
            continue
        if not torch.cuda.is_available():
            _notes.append(f"{label}: installed but no CUDA device")
            continue
        try:
            x = torch.randn(1, 128, 1, 64, device="cuda", dtype=torch.float16)
            out = fn(x, x, x)
            out = out[0] if isinstance(out, tuple) else out
            torch.cuda.synchronize()
            if not torch.isfinite(out).all():
                raise RuntimeError("probe output not finite")
        except Exception as exc:
            _notes.append(f"{label}: probe call failed ({type(exc).__name__}: {exc})")
            continue
        _impl = (label, fn, package_version(dist))
        return


def _probe() -> Optional[str]:
    if not torch.cuda.is_available():
        return "no CUDA device: FlashAttention runs on CUDA only (on CPU, sdpa serves)"
    _probe_packages()
    if _impl is not None:
        return None
    if sdpa_kernel is None:
        why = "; ".join(_notes) or "flash-attn not installed"
        return f"{why}; torch {torch.__version__} lacks sdpa_kernel for its built-in FlashAttention"
    return None  # PyTorch's built-in kernel serves; limits are checked per call


def _unsupported(call: AttentionCall) -> Optional[str]:
    """PyTorch's own refusal when its built-in kernel serves (the limits as data are checked first)."""
    if _impl is None:
        return get("sdpa_flash").reason_for(call)
    return None


def run(call: AttentionCall) -> torch.Tensor:
    if _impl is None:
        return _builtin_run(call)
    # flash-attn wants [B, N, H, D] with a contiguous last dim: transposes of BHND views are free.
    out = _impl[1](call.q.transpose(1, 2), call.k.transpose(1, 2), call.v.transpose(1, 2), softmax_scale=call.scale)
    out = out[0] if isinstance(out, tuple) else out
    return out.transpose(1, 2)


def _description() -> str:
    backend.available()
    if _impl is not None:
        return f"{_impl[0]}, native package"
    note = ("; " + "; ".join(_notes)) if _notes else ""
    return "PyTorch built-in FlashAttention via sdpa_kernel(SDPBackend.FLASH_ATTENTION) (flash-attn not installed" + note + ")"


def _version() -> Optional[str]:
    backend.available()
    return _impl[2] if _impl is not None else f"torch {torch.__version__} built-in"


def _builtin_run(call: AttentionCall) -> torch.Tensor:
    return get("sdpa_flash").run(call)


backend = register(
    Backend(
        name="flash",
        probe=_probe,
        limits=dataclasses.replace(FLASH_CUDA_LIMITS, devices=("cuda",)),
        unsupported=_unsupported,
        run=run,
        description=_description,
        version=_version,
        tolerance={torch.float16: 1e-2, torch.bfloat16: 2e-2, torch.float32: 1e-3},
    ),
    rank=10,
)
