"""``fa3_fp8`` backend: FlashAttention-3's FP8 forward kernel, fed by Genesis's fused FP8 quantisation.

``run(call)`` is the whole path a user pays for, and what AUTO times: the Triton kernels of
:mod:`..quant.fp8` quantise q, k and v to e4m3 (one power-of-two scale per (batch, head), k smoothed by its
per-head mean over tokens, which leaves softmax unchanged), then FA3 attends and writes bfloat16
[B, N, H, D]; the result is returned as a BHND view (converted once more for float16 inputs, since FA3's
FP8 output is always bfloat16).

Facts from FlashAttention's hopper/flash_api.cpp (``mha_fwd``) and the fa3-fwd 0.0.3 interface:

* q, k, v all ``float8_e4m3fn`` (no e5m2), [B, N, H, D] with a contiguous last dim; Hopper only (the
  FP8 path is refused below compute capability 9.0 and the kernels are built for sm_90a);
* head dims a multiple of 16 ("head_size should be a multiple of 16" for FP8), up to 256;
* ``q_descale``/``k_descale``/``v_descale``: float32 ``(batch, num_heads_k)`` tensors read through their
  strides (``data_ptr<float>()``, ``CHECK_SHAPE(q_descale, batch_size, num_heads_k)``); the scores are
  multiplied by ``q_descale * k_descale * softmax_scale`` and the output by ``v_descale``;
* the output is bfloat16 for FP8 inputs.

Host cost: ``flash_attn_func`` goes through an autograd Function and a ``torch.library.custom_op`` (Python
dispatch, two empty tensors per call) before it reaches the compiled ``fwd`` op. Where the module exposes
that op (``fa3_fwd_cuda.fwd`` / ``flash_attn_3_cuda.fwd``) and its schema names the arguments used here,
``run`` calls it directly with the same arguments the wrapper passes (``num_splits=1``, the rest at their
defaults); the probe checks that path against float64 and falls back to ``flash_attn_func`` when it fails.

Grouped-query heads would need q scales shared by each group of query heads; Genesis's quantiser does
not make those, so such calls are refused. No mask, no backward. Quantised: accuracy is checked by the
autotuner against float64 under the ``fast`` quality level.
"""
from __future__ import annotations

from types import ModuleType
from typing import Callable, Optional, Tuple

import torch

from ..._log import first_line
from ..limits import HALF, Limits
from ..quant import fp8
from ..registry import Backend, register
from ..types import AttentionCall
from . import _flash_pkg as pkg

LIMITS = Limits(dtypes=HALF, devices=("cuda",), head_dim_multiple=16, max_head_dim=256, equal_v_head_dim=True,
                mask=False, gqa=False, min_capability=(9, 0), max_capability=(9, 0), autograd=False)
GRANULARITY = "head"  # FA3 takes one descale per (batch, head)
SMOOTH_K = True
# The probe only tells a working kernel from a broken one: FP8 attention on random inputs is ~5% off float64.
PROBE_REL = 0.15

_impl: Optional[Tuple[ModuleType, str]] = None
_fn: Optional[Callable] = None  # the module's flash_attn_func
_attend: Optional[Callable[[fp8.FP8QKV, float], torch.Tensor]] = None  # what run() calls (set by the probe)
_path = ""  # "direct fwd op" or "flash_attn_func", for the description
_quantize = fp8.quantize_qkv  # the tests substitute the PyTorch reference on CPU


def _wrapper_attend(qkv: fp8.FP8QKV, scale: float) -> torch.Tensor:
    d = qkv.descale
    return pkg.first(_fn(qkv.q, qkv.k, qkv.v, softmax_scale=scale, q_descale=d[0], k_descale=d[1], v_descale=d[2]))


direct_op = pkg.fa3_fwd_op  # the compiled forward op behind flash_attn_func (shared with the fa3 backend)


def _direct_attend(op: Callable) -> Callable[[fp8.FP8QKV, float], torch.Tensor]:
    def attend(qkv: fp8.FP8QKV, scale: float) -> torch.Tensor:
        d = qkv.descale
        return op(qkv.q, qkv.k, qkv.v, q_descale=d[0], k_descale=d[1], v_descale=d[2], softmax_scale=scale,
                  num_splits=1)[0]

    return attend


def attend(qkv: fp8.FP8QKV, scale: float) -> torch.Tensor:
    """FA3's FP8 attention on quantised inputs (the path the probe chose): bfloat16 [B, N, H, D]."""
    return _attend(qkv, scale)


def _probe() -> Optional[str]:
    global _impl, _fn, _attend, _path
    _impl, _fn, _attend, _path = None, None, None, ""
    if not pkg.fa3_installed():
        return f"not installed ({pkg.FA3_PIP})"
    device = pkg.probe_device()
    if device is None:
        return "installed, but no CUDA device: FlashAttention-3's FP8 path runs on CUDA (Hopper) only"
    why = fp8.triton_missing()
    if why is not None:
        return why
    try:
        mod, label = pkg.fa3_module()
    except ImportError as exc:
        return str(exc)
    fn = getattr(mod, "flash_attn_func", None)
    if fn is None:
        return f"{mod.__name__} has no flash_attn_func ({pkg.FA3_PIP})"
    if pkg.fa3_build_flags(mod).get("FLASHATTENTION_DISABLE_FP8"):
        return f"{label}: this build was compiled with FLASHATTENTION_DISABLE_FP8 (no FP8 kernels)"
    _impl, _fn = (mod, label), fn
    op = direct_op(mod)
    paths = ([("direct fwd op", _direct_attend(op))] if op is not None else []) + [("flash_attn_func", _wrapper_attend)]
    failures = []
    for _path, _attend in paths:
        try:
            why = pkg.probe_call(run, device, torch.bfloat16, PROBE_REL, head_dim=128, refusal=backend.refusal)
        except Exception as exc:
            why = f"probe call failed: {first_line(exc)}"
        if why is None:
            return None
        failures.append(f"{_path}: {why}" if len(paths) > 1 else why)
    _impl, _fn, _attend, _path = None, None, None, ""
    return f"{label} FP8: {'; '.join(failures)}"


def run(call: AttentionCall) -> torch.Tensor:
    out = _attend(_quantize(call.q, call.k, call.v, GRANULARITY, SMOOTH_K), call.scale)
    if out.dtype != call.dtype:
        out = out.to(call.dtype)
    return out.transpose(1, 2)


def _description() -> str:
    backend.available()
    if _impl is None:
        return "FlashAttention-3 FP8 forward (flash_attn_interface, else fa3_fwd_interface): none runs here"
    return (f"{_impl[1]} FP8 forward (e4m3 q/k/v, per-head descales; {_path}) after Genesis's fused Triton "
            "quantisation (k smoothed)")


def _version() -> Optional[str]:
    backend.available()
    if _impl is not None:
        return pkg.fa3_version(_impl[0])
    for mod, _label, dists, _config in pkg.FA3_MODULES:
        if pkg.installed(mod):
            return pkg.dist_version(*dists)
    return None


backend = register(
    Backend(
        name="fa3_fp8",
        probe=_probe,
        run=run,
        description=_description,
        version=_version,
        limits=LIMITS,
        precision="fp8",
    ),
    rank=25,
)
