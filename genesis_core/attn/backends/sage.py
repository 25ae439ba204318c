"""``sage`` backend: SageAttention (``sageattention.sageattn``), INT8 QK with fp16 PV.

1.x (Triton, verified with 1.0.6): CUDA, float16/bfloat16, head_dim 64/96/128, no mask.
2.x (CUDA kernels): same API; its head_dim limits are taken from its documentation (64/96/128 here,
not verified on hardware in this repository). Quantised: accuracy is checked by the autotuner,
and SageAttention is never picked by AUTO without a measurement.

SageAttention 1.0.6 subtracts the key mean *in place* (``k -= km``) when ``smooth_k=True``, which
would modify the caller's key tensor; Genesis passes a smoothed copy and ``smooth_k=False`` instead
(the same function: softmax is invariant to a per-row constant).
"""
from __future__ import annotations

import functools
import importlib
from typing import Optional

import torch

from ..._log import first_line
from ..registry import Backend, register
from ..types import AttentionCall
from ..limits import HALF, Limits
from ._common import module_present, package_version

HEAD_DIMS = (64, 96, 128)
# SageAttention 1.0.6 is wrong when the key length is not a multiple of its 64-key block: measured on an
# H100 (torch 2.11, 2026-11-25, max-abs error over max-abs reference) 19-27% at Nk=77 (SDXL cross-attention),
# 13% at Nk=96, 11% at Nk=200, 2% at Nk=4097 (the bad block is diluted), against 1-3% at Nk=64, 128, 192,
# 320, 4096 and 4608. Genesis refuses those calls rather than return them.
KEY_BLOCK_1X = 64
_sageattn = None


@functools.lru_cache(maxsize=None)
def _major() -> int:
    ver = package_version("sageattention") or "0"
    try:
        return int(ver.split(".")[0])
    except ValueError:
        return 0


def _probe() -> Optional[str]:
    global _sageattn
    if not module_present("sageattention"):
        return "not installed (pip install sageattention; needs CUDA and Triton)"
    if not torch.cuda.is_available():
        return "no CUDA device: SageAttention runs on CUDA only"
    try:
        fn = importlib.import_module("sageattention").sageattn
    except Exception as exc:
        return f"import failed: {type(exc).__name__}: {exc}"
    try:
        x = torch.randn(1, 1, 128, 64, device="cuda", dtype=torch.float16)
        out = fn(x, x.clone(), x, tensor_layout="HND", is_causal=False)
        torch.cuda.synchronize()
        if not torch.isfinite(out).all():
            return "probe call returned non-finite values"
    except Exception as exc:
        return f"probe call failed: {first_line(exc)}"
    _sageattn = fn
    return None


LIMITS = Limits(devices=("cuda",), dtypes=HALF, head_dims=HEAD_DIMS, equal_v_head_dim=True, mask=False,
                autograd=False)


def _unsupported(call: AttentionCall) -> Optional[str]:
    """What depends on the installed version: 1.x is wrong unless the key length fills its 64-key blocks."""
    if _major() == 1 and call.kv_len % KEY_BLOCK_1X:
        return (f"key length {call.kv_len} not supported: needs a multiple of {KEY_BLOCK_1X} (SageAttention 1.x "
                "returns up to 27% relative error there, measured on H100)")
    return None


def run(call: AttentionCall) -> torch.Tensor:
    k = call.k - call.k.mean(dim=2, keepdim=True)
    return _sageattn(call.q, k, call.v, tensor_layout="HND", is_causal=False, sm_scale=call.scale, smooth_k=False)


def _description() -> str:
    major = _major()
    kind = {1: "1.x Triton INT8-QK kernels", 2: "2.x CUDA INT8-QK/FP8-PV kernels"}.get(major, "unknown major version")
    return f"sageattention.sageattn ({kind})"


backend = register(
    Backend(
        name="sage",
        probe=_probe,
        limits=LIMITS,
        unsupported=_unsupported,
        precision="int8",
        run=run,
        description=_description,
        version=lambda: package_version("sageattention"),
    ),
    rank=20,
)
