"""``sdpa`` backend: ``torch.nn.functional.scaled_dot_product_attention``.

``sdpa`` lets PyTorch pick its sub-kernel. The pinned variants ``sdpa_flash``, ``sdpa_efficient``,
``sdpa_cudnn`` and ``sdpa_math`` run one sub-kernel through ``torch.nn.attention.sdpa_kernel``
so the autotuner and users can choose (on an H100, cuDNN and FlashAttention-2 differ ~1.9x).
A pinned kernel that PyTorch refuses raises, and dispatch falls back along its chain, logging why.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..._memory import scores_refusal
from ..limits import Limits, check
from ..registry import Backend, register
from ..types import AttentionCall
from ._common import HALF_DTYPES, expand_kv, zero_dead_rows

_TORCH = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
SDPA_GQA = _TORCH >= (2, 5)  # enable_gqa= exists from torch 2.5

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # torch < 2.3
    SDPBackend = None
    sdpa_kernel = None


def _probe() -> Optional[str]:
    if not hasattr(F, "scaled_dot_product_attention"):
        return f"torch {torch.__version__} has no scaled_dot_product_attention (needs torch >= 2.0)"
    return None


def _mask_for_sdpa(call: AttentionCall) -> Optional[torch.Tensor]:
    mask = call.mask
    if mask is not None and mask.dtype != torch.bool and mask.dtype != call.dtype:
        mask = mask.to(call.dtype)
    return mask


def sdpa(call: AttentionCall, native_gqa: bool = True) -> torch.Tensor:
    """Run SDPA on the call (BHND in, BHND out), using native GQA where torch has it and ``native_gqa``.

    Fully masked query rows are 0 (PyTorch's CPU kernels already return 0 there; its cuDNN kernel returned other
    values on an H200, 2026-12-01, so the rows are zeroed after every masked call)."""
    if call.mask is None and call.q.shape[1] == call.k.shape[1]:  # the common case, kept short
        return F.scaled_dot_product_attention(call.q, call.k, call.v, scale=call.scale)
    mask = _mask_for_sdpa(call)
    if call.gqa and SDPA_GQA and native_gqa:
        out = F.scaled_dot_product_attention(call.q, call.k, call.v, attn_mask=mask, scale=call.scale, enable_gqa=True)
    else:
        k, v = expand_kv(call)
        out = F.scaled_dot_product_attention(call.q, k, v, attn_mask=mask, scale=call.scale)
    return zero_dead_rows(out, mask)


def _direct(call: AttentionCall) -> Optional[Callable[..., torch.Tensor]]:
    """For unmasked, default-scale calls without GQA: SDPA itself (its default scale is D**-0.5)."""
    if call.mask is None and not call.gqa:
        return F.scaled_dot_product_attention
    return None


def _flash_cuda_limits(call: AttentionCall) -> Optional[str]:
    """PyTorch's FlashAttention kernel: on CUDA the FlashAttention-2 limits; on CPU only equal head dims."""
    if call.device.type == "cuda":
        return check(FLASH_CUDA_LIMITS, call)
    return None


def _math_footprint(call: AttentionCall) -> Optional[str]:
    """The math kernel materialises the [B, H, Nq, Nk] scores and their softmax (float32): refuse what
    would not fit in half the device's free memory (the same guard the autotuner applies)."""
    return scores_refusal(call.batch * call.heads * call.q_len * call.kv_len, 8, call.device)


# PyTorch's enable_gqa is served by its flash and math kernels only (seen on torch 2.11, H100):
# the efficient and cuDNN kernels get k/v with their heads repeated instead.
NATIVE_GQA_KERNELS = ("FLASH_ATTENTION", "MATH")

_CHECKERS = {
    "FLASH_ATTENTION": "can_use_flash_attention",
    "EFFICIENT_ATTENTION": "can_use_efficient_attention",
    "CUDNN_ATTENTION": "can_use_cudnn_attention",
}


def torch_refusal(kernel_name: str, call: AttentionCall, native_gqa: bool) -> Optional[str]:
    """Ask PyTorch's own SDPA checker whether ``kernel_name`` takes this CUDA call; its reasons if not.

    PyTorch's limits (cuDNN's especially) are more than shape rules Genesis could restate, so the
    pinned CUDA kernels defer to ``torch.backends.cuda.can_use_*`` with ``debug=True`` and quote it.
    """
    checker = getattr(torch.backends.cuda, _CHECKERS.get(kernel_name, ""), None)
    params_cls = getattr(torch.backends.cuda, "SDPAParams", None)
    if checker is None or params_cls is None or call.device.type != "cuda":
        return None
    gqa = call.gqa and SDPA_GQA and native_gqa
    k, v = (call.k, call.v) if gqa or not call.gqa else expand_kv(call)
    mask = _mask_for_sdpa(call)
    try:
        try:
            params = params_cls(call.q, k, v, mask, 0.0, False, gqa)
        except TypeError:  # torch < 2.5: no enable_gqa argument
            params = params_cls(call.q, k, v, mask, 0.0, False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ok = checker(params, True)
    except Exception:  # the checker's own signature moved: let the run decide (and fall back if refused)
        return None
    if ok:
        return None
    said = "; ".join(str(w.message).strip() for w in caught if str(w.message).strip()) or "no reason given"
    return f"PyTorch's {kernel_name.lower()} kernel refuses this call: {said}"


def _pinned(kernel_name: str) -> Callable[[AttentionCall], torch.Tensor]:
    kernel = getattr(SDPBackend, kernel_name)
    native_gqa = kernel_name in NATIVE_GQA_KERNELS

    def run(call: AttentionCall) -> torch.Tensor:
        with sdpa_kernel(kernel):
            return sdpa(call, native_gqa)

    return run


def _version() -> str:
    return torch.__version__


_TOL = {torch.float32: 1e-3, torch.float64: 1e-9, torch.float16: 1e-2, torch.bfloat16: 2e-2}
# FlashAttention-2 (PyTorch's built-in CUDA kernel) and every FlashAttention package: no mask, fp16/bf16,
# equal q/k/v head_dim <= 256, compute capability 8.0 or newer.
FLASH_CUDA_LIMITS = Limits(dtypes=HALF_DTYPES, max_head_dim=256, equal_v_head_dim=True, mask=False,
                           min_capability=(8, 0))

backend = register(
    Backend(
        name="sdpa",
        probe=_probe,
        run=sdpa,
        description=lambda: "torch.nn.functional.scaled_dot_product_attention (PyTorch chooses the sub-kernel)",
        version=_version,
        tolerance=dict(_TOL),
        direct=_direct,
    ),
    rank=40,
)

# name: (SDPBackend member, limits as data, what data cannot say, description)
PINNED = {
    "sdpa_flash": ("FLASH_ATTENTION", Limits(devices=("cuda", "cpu"), mask=False, equal_v_head_dim=True),
                   _flash_cuda_limits, "SDPA pinned to PyTorch's FlashAttention kernel (FA2 on CUDA, its CPU kernel)"),
    "sdpa_efficient": ("EFFICIENT_ATTENTION", Limits(devices=("cuda",)), None,
                       "SDPA pinned to the memory-efficient (xformers-derived) kernel"),
    "sdpa_cudnn": ("CUDNN_ATTENTION", Limits(devices=("cuda",), dtypes=HALF_DTYPES, max_head_dim=256,
                                             head_dim_multiple=8, min_capability=(8, 0)), None,
                   "SDPA pinned to cuDNN fused attention"),
    "sdpa_math": ("MATH", Limits(), _math_footprint, "SDPA pinned to PyTorch's math reference kernel"),
}


def _pinned_probe(cuda_only: bool = False) -> Optional[str]:
    if sdpa_kernel is None:
        return f"torch {torch.__version__} lacks torch.nn.attention.sdpa_kernel"
    if cuda_only and not torch.cuda.is_available():
        return "no CUDA device: this SDPA sub-kernel runs on CUDA only"
    return _probe()


def _with_torch_check(kernel_name: str, extra: Optional[Callable[[AttentionCall], Optional[str]]]):
    native_gqa = kernel_name in NATIVE_GQA_KERNELS

    def unsupported(call: AttentionCall) -> Optional[str]:
        return (extra(call) if extra else None) or torch_refusal(kernel_name, call, native_gqa)

    return unsupported


for _rank, (_name, (_kernel, _limits, _extra, _desc)) in enumerate(PINNED.items()):
    if SDPBackend is None or not hasattr(SDPBackend, _kernel):
        register(Backend(name=_name, probe=lambda k=_kernel: f"torch {torch.__version__} has no SDPBackend.{k}",
                         limits=_limits, run=lambda call: None, description=lambda d=_desc: d, version=_version),
                 rank=41 + _rank)
        continue
    register(
        Backend(
            name=_name,
            probe=lambda c=_limits.devices == ("cuda",): _pinned_probe(c),
            limits=_limits,
            unsupported=_with_torch_check(_kernel, _extra),
            run=_pinned(_kernel),
            description=lambda d=_desc: d,
            version=_version,
            tolerance=dict(_TOL),
        ),
        rank=41 + _rank,
    )

__all__ = ["sdpa", "SDPA_GQA", "HALF_DTYPES", "FLASH_CUDA_LIMITS"]
