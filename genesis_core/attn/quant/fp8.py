"""FP8 (e4m3) quantisation of attention inputs: the PyTorch reference and the fused Triton path.

The FP8 attention kernels (FlashAttention-3's FP8 path, cuDNN's FP8 SDPA) take q, k and v as
``torch.float8_e4m3fn`` plus float32 *descale* factors: a stored element times its descale is the input
value again. Genesis quantises every group of values (one tensor, one (batch, head), or one block of
tokens of a head) with a **power-of-two scale**: ``scale = 2**s`` with ``s`` the largest integer such
that ``amax * 2**s <= 448`` (e4m3's largest finite value), clamped to [-126, 126]; ``descale = 2**-s``.
Powers of two make the scaling itself exact (no rounding in ``x * scale`` nor in the descale), so the
only error is e4m3's own rounding (round to nearest even, 3 mantissa bits: at most 2**-4 relative for
normal values). A group whose maximum is not finite gets a NaN descale, so the attention output is NaN
and the accuracy checks see it. A group whose maximum is 0 gets ``s = 126`` (its values are all 0).

Because e4m3 is a floating-point format, its relative precision does not depend on the scale: the group
size (per tensor, per head, per block) only decides which small values fall below e4m3's normal range.
What does lower the error is **k smoothing**: subtracting from k its per-head mean over the tokens
(``k - mean``). Every score of a query row then changes by the same ``q . mean``, so softmax and the
output are unchanged in exact arithmetic, while a large per-channel offset in k (common in DiT
activations) no longer eats e4m3's precision.

Two implementations, one contract (:class:`FP8QKV`: fp8 q, k, v as contiguous [B, N, H, D] tensors, the
layout both kernels read natively, and descales [3, B, H]):

* :func:`quantize_qkv_reference`: plain PyTorch (several passes; also the "unfused" baseline);
* :func:`quantize_qkv`: Triton kernels (:mod:`._fp8_triton`, imported on first use) reading the caller's
  layout through its strides (BNHD or BHND, any batch/head/token strides, contiguous last dim) and
  writing fp8 in three steps (per-chunk statistics, per-head reduction, scale-and-cast), launched for the
  three tensors at once or, where one tensor fits in L2 and three do not, one tensor after the other.
:func:`quantize_reference` also offers per-block scales (for error studies: neither kernel takes them).
"""
from __future__ import annotations

import importlib
import os
from typing import NamedTuple, Optional, Tuple

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
GRANULARITIES = ("tensor", "head", "block")
KERNEL_GRANULARITIES = ("tensor", "head")  # what FA3 (descale per (batch, kv head)) and cuDNN can consume
MAX_EXPONENT = 126
TRITON_PIP = "pip install triton"


class Quantized(NamedTuple):
    """One quantised tensor (reference path): ``data`` e4m3 shaped like the input, ``descale`` float32
    ([B, H] for ``tensor``/``head``, [B, H, ceil(N / block)] for ``block``), ``mean`` float32 [B, H, D]
    (what was subtracted, or None) and ``block`` (tokens per block, or None)."""

    data: torch.Tensor
    descale: torch.Tensor
    mean: Optional[torch.Tensor]
    block: Optional[int]


class FP8QKV(NamedTuple):
    """Quantised q, k, v for an FP8 attention kernel.

    q, k, v: ``float8_e4m3fn`` contiguous [B, N, H, D] (BNHD); ``.transpose(1, 2)`` is the BHND view.
    descale: float32 [3, B, H] (q, k, v); ``descale[i]`` is a contiguous [B, H] tensor, what FA3 takes.
    k_mean: float32 [B, H, D] subtracted from k (smoothing), or None.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    descale: torch.Tensor
    k_mean: Optional[torch.Tensor]


# ---------------------------------------------------------------- the reference (PyTorch)


def scale_exponents(amax: torch.Tensor) -> torch.Tensor:
    """int32 ``s``: the largest integer with ``amax * 2**s <= 448``, clamped to [-126, 126] (126 where
    ``amax`` is 0 or below float32's normal range). Computed from ``frexp`` (amax = m * 2**e, m in [0.5, 1)):
    ``448 = 0.875 * 2**9``, so ``s = 9 - e - (m > 0.875)``."""
    a = amax.float()
    m, e = torch.frexp(a)
    s = 9 - e.to(torch.int32) - (m > 0.875).to(torch.int32)
    s = torch.where(a < torch.finfo(torch.float32).tiny, torch.full_like(s, MAX_EXPONENT), s)
    return s.clamp(-MAX_EXPONENT, MAX_EXPONENT)


def _scales(amax: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scale, descale) float32 powers of two for ``amax``; the descale is NaN where amax is not finite."""
    s = scale_exponents(amax)
    one = torch.ones_like(amax, dtype=torch.float32)
    scale = torch.ldexp(one, s)
    descale = torch.ldexp(one, -s)
    descale = torch.where(torch.isfinite(amax.float()), descale, torch.full_like(descale, float("nan")))
    return scale, descale


def _cast(y: torch.Tensor) -> torch.Tensor:
    """Clamp to e4m3's finite range (NaN stays NaN) and round to nearest even."""
    return y.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def _check_4d(x: torch.Tensor, name: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D [B, H, N, D] (BHND); got shape {tuple(x.shape)}")
    if not x.is_floating_point() or x.dtype in (E4M3, torch.float8_e5m2):
        raise TypeError(f"{name} must be float16, bfloat16 or float32; got {x.dtype}")


def quantize_reference(x: torch.Tensor, granularity: str = "head", smooth: bool = False, block: int = 128,
                       mean: Optional[torch.Tensor] = None) -> Quantized:
    """Quantise ``x`` ([B, H, N, D], BHND, any strides) to e4m3 in PyTorch.

    granularity: ``tensor`` (one scale), ``head`` (one per (batch, head)) or ``block`` (one per ``block``
    tokens of a head). smooth: subtract the per-head mean over tokens first (``mean`` overrides the mean
    computed here, float32 [B, H, D]). ValueError/TypeError for a bad argument.
    """
    _check_4d(x, "x")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}; got {granularity!r}")
    if granularity == "block" and (not isinstance(block, int) or block < 1):
        raise ValueError(f"block must be a positive int (tokens per scale block); got {block!r}")
    B, H, N, D = x.shape
    xf = x.float()
    if smooth:
        mean = xf.mean(dim=2) if mean is None else mean.float().reshape(B, H, D)
        xf = xf - mean[:, :, None, :]
    else:
        mean = None
    if granularity == "tensor":
        amax = xf.abs().amax().expand(B, H) if xf.numel() else torch.zeros(B, H, device=x.device)
        scale, descale = _scales(amax.contiguous())
        data = _cast(xf * scale[:, :, None, None])
        return Quantized(data, descale, mean, None)
    if granularity == "head":
        amax = xf.abs().amax(dim=(2, 3)) if xf.numel() else torch.zeros(B, H, device=x.device)
        scale, descale = _scales(amax)
        return Quantized(_cast(xf * scale[:, :, None, None]), descale, mean, None)
    nb = -(-N // block)
    padded = torch.zeros(B, H, nb * block, D, device=x.device, dtype=torch.float32)
    padded[:, :, :N] = xf
    blocks = padded.view(B, H, nb, block, D)
    scale, descale = _scales(blocks.abs().amax(dim=(3, 4)))
    data = _cast(blocks * scale[:, :, :, None, None]).view(B, H, nb * block, D)[:, :, :N]
    return Quantized(data, descale, mean, block)


def dequantize(t: Quantized, add_mean: bool = False) -> torch.Tensor:
    """float32 values of a :class:`Quantized` tensor ([B, H, N, D]); ``add_mean`` adds back what smoothing
    subtracted (leave it off to get what the attention kernel computes with)."""
    x = t.data.float()
    if t.block is None:
        x = x * t.descale[:, :, None, None]
    else:
        n = x.shape[2]
        x = x * t.descale.repeat_interleave(t.block, dim=2)[:, :, :n, None]
    if add_mean and t.mean is not None:
        x = x + t.mean[:, :, None, :]
    return x


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, granularity: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_4d(t, name)
    if granularity not in KERNEL_GRANULARITIES:
        raise ValueError(f"granularity must be one of {', '.join(KERNEL_GRANULARITIES)} for q/k/v quantisation "
                         f"(the FP8 kernels take no per-block scales); got {granularity!r}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device; got {q.device}, {k.device}, {v.device}")
    if q.shape[:2] != k.shape[:2] or k.shape != v.shape or q.shape[3] != k.shape[3]:
        raise ValueError("q [B, H, Nq, D], k and v [B, H, Nk, D] must share B, H and D (no grouped-query heads, "
                         f"equal head dims); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")


def quantize_qkv_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, granularity: str = "head",
                           smooth_k: bool = True, k_mean: Optional[torch.Tensor] = None) -> FP8QKV:
    """:func:`quantize_qkv` in plain PyTorch (the unfused baseline and the tests' reference)."""
    _check_qkv(q, k, v, granularity)
    parts = [quantize_reference(q, granularity),
             quantize_reference(k, granularity, smooth=smooth_k, mean=k_mean),
             quantize_reference(v, granularity)]
    data = [p.data.transpose(1, 2).contiguous() for p in parts]
    return FP8QKV(data[0], data[1], data[2], torch.stack([p.descale for p in parts]), parts[1].mean)


# ---------------------------------------------------------------- the Triton path

_kernels_mod = None
_missing: Optional[str] = None


def interpreting() -> bool:
    """Whether Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kernels():
    """The Triton kernel module (imports triton on first use); ImportError saying why it cannot."""
    global _kernels_mod, _missing
    if _kernels_mod is None:
        if _missing is not None:
            raise ImportError(_missing)
        try:
            _kernels_mod = importlib.import_module(f"{__package__}._fp8_triton")
        except ImportError as exc:
            _missing = (f"Triton is not installed or does not import ({type(exc).__name__}: {exc}); Genesis's fused "
                        f"FP8 quantisation kernels need it ({TRITON_PIP})")
            raise ImportError(_missing) from None
    return _kernels_mod


def _kernels_reason() -> Optional[str]:
    try:
        _kernels()
    except ImportError as exc:
        return str(exc)
    return None


def triton_missing() -> Optional[str]:
    """None when the Triton kernels can be used, else a sentence saying why (with the pip line)."""
    return _kernels_reason()


def _triton_device_check(x: torch.Tensor) -> None:
    if x.device.type != "cuda" and not interpreting():
        raise ValueError(f"the Triton FP8 quantisation runs on CUDA tensors (or under TRITON_INTERPRET=1); "
                         f"got a tensor on {x.device}")


LAUNCHES = ("auto", "fused", "per_tensor")
L2_SHARE = 0.6  # the part of the L2 cache a tensor may fill and still be read back from it


def launch_order(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """``fused`` (q, k, v in each of 3 launches) unless q, k and v together overflow the L2 cache while each
    one alone fits: then ``per_tensor`` (9 launches, each tensor's second read served from L2)."""
    if q.device.type != "cuda":
        return "fused"
    l2 = getattr(torch.cuda.get_device_properties(q.device), "L2_cache_size", 0)
    return order_for([t.numel() * t.element_size() for t in (q, k, v)], l2)


def order_for(sizes, l2_bytes: int) -> str:
    """:func:`launch_order` from the three tensors' sizes and the L2 size (bytes)."""
    room = l2_bytes * L2_SHARE
    return "per_tensor" if sum(sizes) > room >= max(sizes) else "fused"


def quantize_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, granularity: str = "head",
                 smooth_k: bool = True, exact_round: Optional[bool] = None, launches: str = "auto") -> FP8QKV:
    """Quantise q, k, v ([B, H, N, D] BHND views, e.g. of contiguous [B, N, H, D] tensors) to e4m3 with the
    fused Triton kernels; same result as :func:`quantize_qkv_reference` (bit for bit, given the same k mean).

    granularity: ``head`` (one scale per (batch, head), what FA3 takes) or ``tensor``. smooth_k: subtract k's
    per-head mean first (softmax is unchanged). exact_round: round to e4m3 in float32 arithmetic before the
    cast instead of the hardware cast (same result; default: only under the interpreter, whose own cast
    is not round-to-nearest-even). launches: ``fused``, ``per_tensor`` or ``auto`` (:func:`launch_order`); the
    result is the same. ImportError without Triton; ValueError/TypeError for bad inputs.
    """
    _check_qkv(q, k, v, granularity)
    if launches not in LAUNCHES:
        raise ValueError(f"launches must be one of {', '.join(LAUNCHES)}; got {launches!r}")
    _triton_device_check(q)
    kern = _kernels()
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    exact = interpreting() if exact_round is None else bool(exact_round)
    order = launch_order(q, k, v) if launches == "auto" else launches
    return FP8QKV(*kern.quantize_qkv(q, k, v, granularity == "tensor", bool(smooth_k), exact, order))


def dequantize_output(o8: torch.Tensor, descale: torch.Tensor, factor: float, dtype: torch.dtype) -> torch.Tensor:
    """``o8`` (e4m3 [B, N, H, D], contiguous) times ``factor * descale[b, h]`` (float32 [B, H]) in ``dtype``,
    one fused pass (Triton on CUDA; PyTorch elsewhere). Used to turn an FP8 attention output back into the
    caller's precision."""
    if o8.dim() != 4 or not o8.is_contiguous():
        raise ValueError(f"o8 must be a contiguous 4-D [B, N, H, D] tensor; got shape {tuple(o8.shape)}")
    B, _, H, _ = o8.shape
    if tuple(descale.shape) != (B, H):
        raise ValueError(f"descale must be [B, H] = {(B, H)}; got {tuple(descale.shape)}")
    if o8.device.type == "cuda" or (interpreting() and _kernels_reason() is None):
        kern = _kernels()
        return kern.dequantize(o8, descale.contiguous(), float(factor), dtype)
    return (o8.float() * (descale.float() * factor)[:, None, :, None]).to(dtype)


__all__ = [
    "E4M3", "E4M3_MAX", "FP8QKV", "GRANULARITIES", "KERNEL_GRANULARITIES", "Quantized", "dequantize",
    "dequantize_output", "interpreting", "LAUNCHES", "launch_order", "order_for", "quantize_qkv",
    "quantize_qkv_reference", "quantize_reference", "scale_exponents", "triton_missing",
]
