"""FP8 (e4m3) quantisation of attention inputs: the PyTorch reference and the fused Triton path.

The FP8 attention kernels (FlashAttention-3's FP8 path, cuDNN's FP8 SDPA) take q, k and v as
``torch.float8_e4m3fn`` plus float32 *descale* factors: a stored element times its descale is the input
value again. Genesis quantises every group of values (one tensor, one (batch, head), or one block of
tokens of a head) with a **power-of-two scale**: ``scale = 2**s`` with ``s`` the largest integer such
that ``amax * 2**s <= 448`` (e4m3's largest finite value), clamped to [-60, 60]; ``descale = 2**-s``.
Powers of two make the scaling itself exact (no rounding in ``x * scale`` nor in the descale), so the
only error is e4m3's own rounding (round to nearest even, 3 mantissa bits: at most 2**-4 relative for
normal values).

Groups that carry no scale information get ``s = 0`` (scale and descale 1): a group whose maximum is 0
(an all-zero head, or k after smoothing when it has one key or all keys equal) is stored as exact zeros
with descale 1, and a group whose maximum is not finite gets scale 1 and a NaN descale, so the attention
output is NaN and the accuracy checks see it. Why the clamp at 60: the kernels multiply the q and k
descales together with the softmax scale (and log2 e); with descales in [2**-60, 2**60] that product stays
a normal float32 (>= 2**-126) for softmax scales down to 2**-6. With the old clamp at 126 an all-zero k
(one key, smoothed) had descale 2**-126 and that product flushed to 0; FA3 and cuDNN returned NaN for such
calls, most likely from 0 times the -inf of a masked (padding) key column. A group quieter than
448 * 2**-60 (about 4e-16) simply lands below 448 in e4m3.

Because e4m3 is a floating-point format, its relative precision does not depend on the scale: the group
size (per tensor, per head, per block) only decides which small values fall below e4m3's normal range.
What does lower the error is **k smoothing**: subtracting from k its per-head mean over the tokens
(``k - mean``). Every score of a query row then changes by the same ``q . mean``, so softmax and the
output are unchanged in exact arithmetic, while a large per-channel offset in k (common in DiT
activations) no longer eats e4m3's precision.

Two implementations, one contract (:class:`FP8QKV`: fp8 q, k, v as contiguous [B, N, H, D] tensors, the
layout both kernels read natively, descales [3, B, H], and per tensor the spread of its heads' scales):

* :func:`quantize_qkv_reference`: plain PyTorch (several passes; also the "unfused" baseline);
* :func:`quantize_qkv`: two Triton launches for q, k and v together (:mod:`._fp8_triton`, imported on first
  use) reading the caller's layout through its strides (BNHD or BHND, any batch/head/token strides,
  contiguous last dim): statistics per chunk of tokens, where the last chunk of each head to finish also
  reduces the head (and the last head of each tensor the tensor), then scale-and-cast.
:func:`quantize_reference` also offers per-block scales (for error studies: neither kernel takes them).
Granularity is ``head``, ``tensor`` or a (q, k, v) triple of those (cuDNN on Hopper takes one q and one k
descale but applies v's per head after the kernel: ``("tensor", "tensor", "head")``).
"""
from __future__ import annotations

import importlib
import os
import threading
from typing import Dict, NamedTuple, Optional, Sequence, Tuple, Union

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
GRANULARITIES = ("tensor", "head", "block")
KERNEL_GRANULARITIES = ("tensor", "head")  # what FA3 (descale per (batch, kv head)) and cuDNN can consume
MAX_EXPONENT = 60  # |s| <= 60: the product of a q and a k descale stays in [2**-120, 2**120] (see above)
TRITON_PIP = "pip install triton"
Granularity = Union[str, Sequence[str]]


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
    spread: float32 [3]: per tensor, how many binades (powers of two) lie between the per-head scales of its
    loudest and its quietest head (all-zero and non-finite heads left out; 0 with fewer than two heads);
    what one shared scale would cost the quietest head (see ``fp8_cudnn``).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    descale: torch.Tensor
    k_mean: Optional[torch.Tensor]
    spread: Optional[torch.Tensor] = None


# ---------------------------------------------------------------- the reference (PyTorch)


def scale_exponents(amax: torch.Tensor) -> torch.Tensor:
    """int32 ``s``: the largest integer with ``amax * 2**s <= 448``, clamped to [-60, 60]; 0 where ``amax``
    is 0 or not finite (nothing to scale). Computed from ``frexp`` (amax = m * 2**e, m in [0.5, 1)):
    ``448 = 0.875 * 2**9``, so ``s = 9 - e - (m > 0.875)``."""
    a = amax.float()
    m, e = torch.frexp(a)
    s = (9 - e.to(torch.int32) - (m > 0.875).to(torch.int32)).clamp(-MAX_EXPONENT, MAX_EXPONENT)
    return torch.where(torch.isfinite(a) & (a > 0), s, torch.zeros_like(s))


def _scales(amax: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scale, descale) float32 powers of two for ``amax``; the descale is NaN where amax is not finite."""
    s = scale_exponents(amax)
    one = torch.ones_like(amax, dtype=torch.float32)
    scale = torch.ldexp(one, s)
    descale = torch.ldexp(one, -s)
    descale = torch.where(torch.isfinite(amax.float()), descale, torch.full_like(descale, float("nan")))
    return scale, descale


def head_spread(amax: torch.Tensor) -> float:
    """Binades between the scale exponents of the loudest and the quietest head (``amax`` per head, any
    shape); heads whose maximum is 0 or not finite are left out; 0.0 with fewer than two such heads."""
    a = amax.float().flatten()
    s = scale_exponents(a)[torch.isfinite(a) & (a > 0)]
    return float(s.max() - s.min()) if s.numel() > 1 else 0.0


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


def granularities(granularity: Granularity) -> Tuple[str, str, str]:
    """(q, k, v) granularities from ``head``, ``tensor`` or a triple of those; ValueError otherwise."""
    g = (granularity,) * 3 if isinstance(granularity, str) else tuple(granularity)
    if len(g) != 3 or any(x not in KERNEL_GRANULARITIES for x in g):
        raise ValueError(f"granularity must be one of {', '.join(KERNEL_GRANULARITIES)} or a (q, k, v) triple of them "
                         f"for q/k/v quantisation (the FP8 kernels take no per-block scales); got {granularity!r}")
    return g  # type: ignore[return-value]


_GRANULARITY_OF = {g: (g, g, g) for g in KERNEL_GRANULARITIES}
_GRANULARITY_OF[("tensor", "tensor", "head")] = ("tensor", "tensor", "head")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, granularity: Granularity) -> Tuple[str, str, str]:
    try:
        g = _GRANULARITY_OF[granularity]
    except (KeyError, TypeError):
        g = None
    qs, ks = q.shape, k.shape
    if (g is not None and len(qs) == 4 and len(ks) == 4 and ks == v.shape and qs[:2] == ks[:2] and qs[3] == ks[3]
            and q.dtype == k.dtype == v.dtype and q.dtype in _FLOATS and q.device == k.device == v.device):
        return g  # the common, valid call: a handful of comparisons
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_4d(t, name)
    g = granularities(granularity)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device; got {q.device}, {k.device}, {v.device}")
    if q.shape[:2] != k.shape[:2] or k.shape != v.shape or q.shape[3] != k.shape[3]:
        raise ValueError("q [B, H, Nq, D], k and v [B, H, Nk, D] must share B, H and D (no grouped-query heads, "
                         f"equal head dims); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    return g


def quantize_qkv_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, granularity: Granularity = "head",
                           smooth_k: bool = True, k_mean: Optional[torch.Tensor] = None) -> FP8QKV:
    """:func:`quantize_qkv` in plain PyTorch (the unfused baseline and the tests' reference)."""
    g = _check_qkv(q, k, v, granularity)
    parts, spread = [], []
    for i, (t, gi) in enumerate(zip((q, k, v), g)):
        smooth = smooth_k and i == 1
        parts.append(quantize_reference(t, gi, smooth=smooth, mean=k_mean if smooth else None))
        xf = t.float() - (parts[-1].mean[:, :, None, :] if smooth else 0.0)
        amax = xf.abs().amax(dim=(2, 3)) if xf.numel() else torch.zeros(t.shape[:2], device=t.device)
        spread.append(head_spread(amax))
    data = [p.data.transpose(1, 2).contiguous() for p in parts]
    return FP8QKV(data[0], data[1], data[2], torch.stack([p.descale for p in parts]), parts[1].mean,
                  torch.tensor(spread, dtype=torch.float32, device=q.device))


# ---------------------------------------------------------------- the Triton path

_kernels_mod = None
_missing: Optional[str] = None
_interp: Optional[bool] = None


def interpreting() -> bool:
    """Whether Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``): as the kernels were decorated once
    they are loaded (Triton reads the variable then), before that the environment's."""
    if _interp is not None:
        return _interp
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kernels():
    """The Triton kernel module (imports triton on first use); ImportError saying why it cannot."""
    global _kernels_mod, _missing, _interp
    if _kernels_mod is None:
        if _missing is not None:
            raise ImportError(_missing)
        try:
            interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
            _kernels_mod = importlib.import_module(f"{__package__}._fp8_triton")
            _interp = interp
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


# ---------------------------------------------------------------- the counters the statistics launch uses
#
# The statistics launch finds "the last chunk of a head" and "the last head of a tensor" with int32 atomic
# counters that must read 0 when it starts. The program that sees a counter reach its total sets it back to
# 0 before the launch ends, so a buffer that starts zeroed is zeroed again after every launch. One buffer per
# (device, stream): launches on one stream run one after the other, so they never share a counter while it
# counts; two streams never share a buffer. While a CUDA graph is being captured each call gets a fresh
# zeroed buffer instead (the graph may be replayed on any stream). Nothing else is cached between calls:
# the fp8 outputs, descales, means and spreads are allocated fresh for every call.

_counters: Dict[Tuple[str, int, int], torch.Tensor] = {}
_counters_lock = threading.Lock()
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _stream_id(device: torch.device) -> int:
    if _raw_stream is not None:
        return int(_raw_stream(device.index))
    return int(torch.cuda.current_stream(device).cuda_stream)


def counters(device: torch.device, n: int) -> torch.Tensor:
    """An int32 buffer of at least ``n`` zeros for the statistics launch on ``device``'s current stream."""
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return torch.zeros(n, dtype=torch.int32, device=device)
        key = ("cuda", device.index, _stream_id(device))
    else:
        key = (device.type, -1, 0)
    buf = _counters.get(key)
    if buf is None or buf.numel() < n:
        with _counters_lock:
            buf = _counters.get(key)
            if buf is None or buf.numel() < n:
                buf = torch.zeros(max(n, 256, 2 * (0 if buf is None else buf.numel())), dtype=torch.int32,
                                  device=device)
                _counters[key] = buf
    return buf


def quantize_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, granularity: Granularity = "head",
                 smooth_k: bool = True, exact_round: Optional[bool] = None) -> FP8QKV:
    """Quantise q, k, v ([B, H, N, D] BHND views, e.g. of contiguous [B, N, H, D] tensors) to e4m3 with the
    fused Triton kernels (two launches for the three tensors); same result as :func:`quantize_qkv_reference`
    (bit for bit, given the same k mean).

    granularity: ``head`` (one scale per (batch, head), what FA3 takes), ``tensor``, or a (q, k, v) triple.
    smooth_k: subtract k's per-head mean first (softmax is unchanged). exact_round: round to e4m3 in float32
    arithmetic before the cast instead of the hardware cast (same result; default: only under the
    interpreter, whose own cast is not round-to-nearest-even). ImportError without Triton; ValueError or
    TypeError for bad inputs.
    """
    g = _check_qkv(q, k, v, granularity)
    _triton_device_check(q)
    kern = _kernels()
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    exact = interpreting() if exact_round is None else bool(exact_round)
    mask = (g[0] == "tensor") | (g[1] == "tensor") << 1 | (g[2] == "tensor") << 2
    device = q.device
    return FP8QKV(*kern.quantize_qkv(q, k, v, mask, bool(smooth_k), exact, lambda n: counters(device, n)))


def dequantize_output(o8: torch.Tensor, descale: torch.Tensor, factor: float, dtype: torch.dtype) -> torch.Tensor:
    """``o8`` (e4m3 [B, N, H, D], contiguous) times ``factor * descale[b, h]`` (float32 [B, H]) in ``dtype``,
    one fused pass (Triton on CUDA; PyTorch elsewhere). Used to turn an FP8 attention output back into the
    caller's precision.

    The arithmetic, the same on both paths: ``f = float32(descale[b, h] * float32(factor))``, then each
    element ``float32(e4m3 value) * f`` in float32, rounded once (to nearest even) to ``dtype``; values past
    ``dtype``'s range become +-inf, as a cast does."""
    if o8.dim() != 4 or not o8.is_contiguous():
        raise ValueError(f"o8 must be a contiguous 4-D [B, N, H, D] tensor; got shape {tuple(o8.shape)}")
    B, _, H, _ = o8.shape
    if tuple(descale.shape) != (B, H):
        raise ValueError(f"descale must be [B, H] = {(B, H)}; got {tuple(descale.shape)}")
    if o8.device.type == "cuda" or (interpreting() and _kernels_reason() is None):
        kern = _kernels()
        return kern.dequantize(o8, descale.contiguous(), float(factor), dtype)
    return dequantize_output_reference(o8, descale, factor, dtype)


def dequantize_output_reference(o8: torch.Tensor, descale: torch.Tensor, factor: float,
                                dtype: torch.dtype) -> torch.Tensor:
    """:func:`dequantize_output` in PyTorch (float32 arithmetic, one rounding to ``dtype``)."""
    f = descale.float() * torch.tensor(float(factor), dtype=torch.float32, device=descale.device)
    return (o8.float() * f[:, None, :, None]).to(dtype)


__all__ = [
    "E4M3", "E4M3_MAX", "FP8QKV", "GRANULARITIES", "KERNEL_GRANULARITIES", "MAX_EXPONENT", "Quantized", "counters",
    "dequantize", "dequantize_output", "dequantize_output_reference", "granularities", "head_spread",
    "interpreting", "quantize_qkv", "quantize_qkv_reference", "quantize_reference", "scale_exponents",
    "triton_missing",
]
