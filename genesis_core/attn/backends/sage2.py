"""SageAttention 2.x kernels as backends of their own, so the autotuner and users can choose among them:

* ``sage2_fp8``: INT8 Q·Kᵀ, FP8 P·V. On compute capability 9.0 the sm90 kernel
  (``sageattn_qk_int8_pv_fp8_cuda_sm90``, ``pv_accum_dtype="fp32+fp32"``, the only one it has); on 8.9 and
  12.x ``sageattn_qk_int8_pv_fp8_cuda`` as ``sageattn`` calls it there. Precision class ``int8`` (see
  :data:`VARIANTS`: its FP8 P·V accumulates in FP32; q, k and v are not all FP8).
* ``sage2_fp16``: INT8 Q·Kᵀ, FP16 P·V with FP32 accumulation (``sageattn_qk_int8_pv_fp16_cuda``,
  ``pv_accum_dtype="fp32"``), compute capability 8.0+. Class ``int8``.
* ``sage2_triton``: the Triton kernel (``sageattn_qk_int8_pv_fp16_triton``), 8.0+. Class ``int8``.

Limits from sageattention/core.py (2.2.0): float16/bfloat16, head_dim <= 128 (the library pads smaller head
dims to 64 or 128, a copy it makes itself; its CUDA kernels are built for 64 and 128 only), no sequence-length
limit (the sm90 path pads v's length to a multiple of 128, another copy of its own, when Nk % 128 != 0),
grouped-query attention native, no backward. Each is called with ``smooth_k=True``, as the library intends
it: 2.x subtracts the key mean out of place inside its quantisation, the caller's k is never modified and
Genesis makes no copy. A 2.x build whose kernel leaves its output unwritten (seen with the 2.2.0 sm90
binding) is refused by the probe, which runs on NaN-poisoned output memory and compares with float64.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch

from ..._log import first_line
from ..limits import HALF, Limits
from ..registry import Backend, register
from ..types import AttentionCall
from . import _flash_pkg as pkg
from . import sage

# name: (precision, min capability, description). Every SageAttention kernel is class int8 (8-bit Q·Kᵀ of smoothed
# keys); the FP8 P·V of sage2_fp8 accumulates in FP32 and measured 3.9e-2 relative L2 / 0.99925 cosine on random
# inputs on an H200 (2026-12-01), against 5.4e-2 / 0.9986 for FA3 FP8 (all of q, k, v in FP8: class fp8).
VARIANTS: Dict[str, Tuple[str, Tuple[int, int], str]] = {
    "sage2_fp8": ("int8", (8, 9), "SageAttention 2 INT8 QK, FP8 PV (CUDA; the sm90 kernel on Hopper)"),
    "sage2_fp16": ("int8", (8, 0), "SageAttention 2 INT8 QK, FP16 PV with FP32 accumulation (CUDA)"),
    "sage2_triton": ("int8", (8, 0), "SageAttention 2 INT8 QK, FP16 PV (Triton)"),
}


# Shortest key sequence each kernel is served for. One smoothed key is all zeros (NaN from every kernel, seen at
# Nq = Nk = 1); sage2_fp16 (sageattn_qk_int8_pv_fp16_cuda) wrote NaN for fewer than 64 keys (see
# sage.FP16_CUDA_MIN_KV_LEN: every Nk from 2 to 32, now and then up to 56) on an H200 (2026-12-02,
# scripts/gpu/sage_edges.py).
MIN_KV_LEN = {"sage2_fp8": 2, "sage2_fp16": sage.FP16_CUDA_MIN_KV_LEN, "sage2_triton": 2}


def kernel_for(name: str, cap: Tuple[int, int]) -> Tuple[str, dict, Optional[str]]:
    """(function in sageattention, keyword arguments, the core.py flag saying its extension loaded) of a variant
    on compute capability ``cap``."""
    if name == "sage2_fp8":
        if cap == (9, 0):
            return "sageattn_qk_int8_pv_fp8_cuda_sm90", {"pv_accum_dtype": "fp32+fp32"}, "SM90_ENABLED"
        extra = {"qk_quant_gran": "per_warp"} if cap[0] == 12 else {}
        return "sageattn_qk_int8_pv_fp8_cuda", {"pv_accum_dtype": "fp32+fp16", **extra}, "SM89_ENABLED"
    if name == "sage2_fp16":
        return "sageattn_qk_int8_pv_fp16_cuda", {"pv_accum_dtype": "fp32"}, "SM80_ENABLED"
    return "sageattn_qk_int8_pv_fp16_triton", {}, None


class _Variant:
    """One 2.x kernel: its probe, run and description (state set by the probe)."""

    def __init__(self, name: str):
        self.name = name
        self.precision, self.min_cap, self.text = VARIANTS[name]
        self.fn: Optional[Callable] = None
        self.fn_name: Optional[str] = None
        self.kwargs: dict = {}

    def probe(self) -> Optional[str]:
        self.fn = None
        if not pkg.installed("sageattention"):
            return f"not installed ({sage.PIP})"
        device = pkg.probe_device()
        if device is None:
            return "installed, but no CUDA device: SageAttention runs on CUDA only"
        try:
            mod = sage.load()
        except Exception as exc:
            return f"import failed: {first_line(exc)}"
        if not hasattr(mod, "sageattn_qk_int8_pv_fp16_cuda"):
            installed = sage.version() or "a version without its kernels"
            return f"needs SageAttention 2.x (installed: {installed}; {sage.PIP})"
        cap = sage._device_cap(device)
        fn_name, kwargs, flag = kernel_for(self.name, cap)
        if cap >= self.min_cap and flag is not None and not getattr(getattr(mod, "core", mod), flag, True):
            return (f"this SageAttention build has no {fn_name} extension ({flag} is False: build it for compute "
                    f"capability {cap[0]}.{cap[1]}, e.g. TORCH_CUDA_ARCH_LIST={cap[0]}.{cap[1]})")
        fn = getattr(mod, fn_name, None)
        if fn is None:
            return f"sageattention has no {fn_name}"
        self.fn, self.fn_name, self.kwargs = fn, fn_name, kwargs
        why = pkg.probe_call(self.run, device, torch.bfloat16, sage.PROBE_MAX_REL, refusal=self.backend.refusal)
        if why is not None:
            self.fn = None
            return f"{fn_name}: {why}"
        return None

    def run(self, call: AttentionCall) -> torch.Tensor:
        q, k, v, layout = sage.layout_args(call)
        out = self.fn(q, k, v, tensor_layout=layout, is_causal=False, sm_scale=call.scale, smooth_k=True,
                      **self.kwargs)
        return sage.as_bhnd(out, layout)

    def description(self) -> str:
        self.backend.available()
        if self.fn_name is None:
            return self.text
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"{self.text}: sageattention.{self.fn_name}({args + ', ' if args else ''}smooth_k=True)"

    def register(self, rank: float) -> Backend:
        self.backend = register(
            Backend(
                name=self.name,
                probe=self.probe,
                run=self.run,
                description=self.description,
                version=sage.version,
                limits=Limits(devices=("cuda",), dtypes=HALF, max_head_dim=sage.MAX_HEAD_DIM_2X, equal_v_head_dim=True,
                              mask=False, autograd=False, min_capability=self.min_cap,
                              min_kv_len=MIN_KV_LEN[self.name]),
                precision=self.precision,
            ),
            rank=rank,
        )
        return self.backend


variants = {name: _Variant(name) for name in VARIANTS}
backends = {name: v.register(21 + i) for i, (name, v) in enumerate(variants.items())}
