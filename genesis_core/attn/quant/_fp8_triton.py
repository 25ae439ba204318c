"""Triton kernels of the fused FP8 quantisation (imported lazily by :mod:`.fp8`, never at package import).

q, k and v are quantised together, program axis 2 picking the tensor, in three launches:

1. ``_stats`` (grid: token chunks x batch*heads x 3): per chunk the absolute maximum, and for k with
   smoothing the per-channel max, min and sum, into a float32 workspace (no atomics: deterministic);
2. ``_finalize`` (grid: batch*heads x 3): the maximum over chunks per (tensor, batch, head); for smoothed k
   the per-channel mean and the exact absolute maximum of ``k - mean``, from the channel extremes
   (``max(max_c - mean_c, mean_c - min_c)``, the same float32 operations the cast performs);
3. ``_cast`` (grid as 1): the power-of-two scale from that maximum (per head, or the maximum over heads),
   then subtract the mean (k), scale, clamp to +-448, round to e4m3 and store as contiguous [B, N, H, D];
   chunk 0 of each head writes the descale.

Inputs are read through their strides (BNHD or BHND views, contiguous last dim), twice, and written once
in fp8: 5 bytes moved per element against a floor of 3 (read once, write once). With ``per_tensor`` launches
the three steps run for one tensor after the other (9 launches), so a tensor that fits in L2 (Flux's 28 MB)
is read the second time from L2. ``_dequant`` turns an
e4m3 [B, N, H, D] attention output back into half precision times a per-head factor (3 bytes per element).
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

TILE = 4096  # elements per [BLOCK_N, BLOCK_D] tile
MAX_CHUNKS = 64  # token chunks per head (bounds the workspace and the reduction in _finalize)
NUM_WARPS = 8  # 16 elements per thread per tile: two 16-byte loads of bf16


@triton.jit
def _pick(t, a, b, c):
    return tl.where(t == 0, a, tl.where(t == 1, b, c))


@triton.jit
def _round_e4m3(y):
    """Round float32 ``y`` (|y| <= 448) to the e4m3 grid, to nearest even, in float32 arithmetic: adding and
    subtracting 1.5 * 2**(e + 20) rounds at e4m3's step 2**(e - 3) (e: the binade, at least -6)."""
    a = tl.abs(y)
    e = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    e = tl.minimum(tl.maximum(e, -6), 8)
    magic = (((e + 147) << 23) | 0x400000).to(tl.float32, bitcast=True)
    r = (a + magic) - magic
    return tl.where(y < 0, -r, r)


@triton.jit
def _abs_stats(base, sn, i, limit, offs_d, dmask, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """max |x| over tokens [i, limit) of one head (NaN if any x is NaN or Inf). Elementwise accumulators in
    the loop, one reduction at the end: no cross-warp traffic while streaming."""
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    bad = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)  # x * 0: NaN where x is NaN or Inf (max drops NaN)
    while i < limit:  # a while loop: Triton 3.6's interpreter cannot take a computed bound in range()
        offs_n = i + tl.arange(0, BLOCK_N)
        m = (offs_n < limit)[:, None] & dmask[None, :]
        x = tl.load(base + offs_n.to(tl.int64)[:, None] * sn + offs_d[None, :], mask=m, other=0.0).to(tl.float32)
        acc = tl.maximum(acc, tl.abs(x))
        bad += x * 0.0
        i += BLOCK_N
    return tl.max(tl.max(acc, axis=1), axis=0) + tl.sum(tl.sum(bad, axis=1), axis=0)


@triton.jit
def _channel_stats(base, sn, i, limit, offs_d, dmask, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per channel: max, min and sum over tokens [i, limit) of one head."""
    cmax = tl.full([BLOCK_N, BLOCK_D], float("-inf"), tl.float32)
    cmin = tl.full([BLOCK_N, BLOCK_D], float("inf"), tl.float32)
    csum = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    while i < limit:
        offs_n = i + tl.arange(0, BLOCK_N)
        m = (offs_n < limit)[:, None] & dmask[None, :]
        x = tl.load(base + offs_n.to(tl.int64)[:, None] * sn + offs_d[None, :], mask=m, other=0.0).to(tl.float32)
        cmax = tl.maximum(cmax, tl.where(m, x, float("-inf")))
        cmin = tl.minimum(cmin, tl.where(m, x, float("inf")))
        csum += x
        i += BLOCK_N
    return tl.max(cmax, axis=0), tl.min(cmin, axis=0), tl.sum(csum, axis=0)


@triton.jit
def _stats(q, k, v, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, H, BH, NQ, NK, D, CHQ, CHK, NCQ, NCK, CHMAX,
           ws, OFF_PAMAX, OFF_KSTAT, T0, SMOOTH_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    c = tl.program_id(0)
    bh = tl.program_id(1)
    t = tl.program_id(2) + T0
    nch = tl.where(t == 0, NCQ, NCK)
    if c < nch:  # chunks past this tensor's end write nothing (_finalize reads only c < nch)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        base = _pick(t, q, k, v) + b * _pick(t, sqb, skb, svb).to(tl.int64) + h * _pick(t, sqh, skh, svh).to(tl.int64)
        sn = _pick(t, sqn, skn, svn).to(tl.int64)
        chunk = tl.where(t == 0, CHQ, CHK)
        i = c * chunk
        limit = tl.minimum(i + chunk, tl.where(t == 0, NQ, NK))
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        out = ws + OFF_PAMAX + (t * BH + bh) * CHMAX + c
        if SMOOTH_K:
            if t == 1:  # k: per-channel extremes and sums, for the mean and the exact max of |k - mean|
                cmax, cmin, csum = _channel_stats(base, sn, i, limit, offs_d, dmask, BLOCK_N, BLOCK_D)
                p = ws + OFF_KSTAT + (bh.to(tl.int64) * CHMAX + c) * (3 * BLOCK_D) + offs_d
                tl.store(p, cmax)
                tl.store(p + BLOCK_D, cmin)
                tl.store(p + 2 * BLOCK_D, csum)
            else:
                tl.store(out, _abs_stats(base, sn, i, limit, offs_d, dmask, BLOCK_N, BLOCK_D))
        else:
            tl.store(out, _abs_stats(base, sn, i, limit, offs_d, dmask, BLOCK_N, BLOCK_D))


@triton.jit
def _finalize(ws, BH, NK, D, NCQ, NCK, CHMAX, OFF_HAMAX, OFF_MEAN, OFF_PAMAX, OFF_KSTAT, T0,
              SMOOTH_K: tl.constexpr, CH_P: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)
    t = tl.program_id(1) + T0
    nch = tl.where(t == 0, NCQ, NCK)
    offs_c = tl.arange(0, CH_P)
    cm = offs_c < nch
    if SMOOTH_K:
        if t == 1:
            offs_d = tl.arange(0, BLOCK_D)
            dmask = offs_d < D
            m = cm[:, None] & dmask[None, :]
            p = ws + OFF_KSTAT + (bh.to(tl.int64) * CHMAX + offs_c[:, None]) * (3 * BLOCK_D) + offs_d[None, :]
            mx = tl.max(tl.load(p, mask=m, other=float("-inf")), axis=0)
            mn = tl.min(tl.load(p + BLOCK_D, mask=m, other=float("inf")), axis=0)
            mean = tl.sum(tl.load(p + 2 * BLOCK_D, mask=m, other=0.0), axis=0) / NK
            mean = tl.where(dmask, mean, 0.0)
            dev = tl.where(dmask, tl.maximum(mx - mean, mean - mn), 0.0)
            amax = tl.max(dev, axis=0) + tl.sum(dev * 0.0, axis=0)  # NaN stays NaN
            tl.store(ws + OFF_MEAN + bh * BLOCK_D + offs_d, mean)
        else:
            part = tl.load(ws + OFF_PAMAX + (t * BH + bh) * CHMAX + offs_c, mask=cm, other=0.0)
            amax = tl.max(part, axis=0) + tl.sum(part * 0.0, axis=0)
    else:
        part = tl.load(ws + OFF_PAMAX + (t * BH + bh) * CHMAX + offs_c, mask=cm, other=0.0)
        amax = tl.max(part, axis=0) + tl.sum(part * 0.0, axis=0)
    tl.store(ws + OFF_HAMAX + t * BH + bh, amax)


@triton.jit
def _cast(q, k, v, out, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, H, BH, NQ, NK, D, CHQ, CHK, NCQ, NCK,
          OUT_K, OUT_V, ws, OFF_DESC, OFF_HAMAX, OFF_MEAN, T0, SMOOTH_K: tl.constexpr, PER_TENSOR: tl.constexpr,
          EXACT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BH_P: tl.constexpr):
    c = tl.program_id(0)
    bh = tl.program_id(1)
    t = tl.program_id(2) + T0
    if PER_TENSOR:
        offs_h = tl.arange(0, BH_P)
        heads = tl.load(ws + OFF_HAMAX + t * BH + offs_h, mask=offs_h < BH, other=0.0)
        amax = tl.max(heads, axis=0) + tl.sum(heads * 0.0, axis=0)
    else:
        amax = tl.load(ws + OFF_HAMAX + t * BH + bh)
    bits = amax.to(tl.int32, bitcast=True)
    expo = (bits >> 23) & 0xFF
    s = 8 - (expo - 127) - ((bits & 0x7FFFFF) > 0x600000).to(tl.int32)  # 448 = 1.75 * 2**8
    s = tl.minimum(tl.maximum(s, -126), 126)
    scale = ((s + 127) << 23).to(tl.float32, bitcast=True)
    descale = tl.where(expo != 0xFF, ((127 - s) << 23).to(tl.float32, bitcast=True), float("nan"))
    if c == 0:
        tl.store(ws + OFF_DESC + t * BH + bh, descale)
    nch = tl.where(t == 0, NCQ, NCK)
    if c < nch:
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        base = _pick(t, q, k, v) + b * _pick(t, sqb, skb, svb).to(tl.int64) + h * _pick(t, sqh, skh, svh).to(tl.int64)
        sn = _pick(t, sqn, skn, svn).to(tl.int64)
        n_tok = tl.where(t == 0, NQ, NK)
        chunk = tl.where(t == 0, CHQ, CHK)
        row = (H * D).to(tl.int64)
        obase = out + _pick(t, 0, OUT_K, OUT_V).to(tl.int64) + b * n_tok * row + h * D
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        mean = tl.zeros([BLOCK_D], dtype=tl.float32)
        if SMOOTH_K:
            if t == 1:
                mean = tl.load(ws + OFF_MEAN + bh * BLOCK_D + offs_d)
        i = c * chunk
        limit = tl.minimum(i + chunk, n_tok)
        while i < limit:
            offs_n = (i + tl.arange(0, BLOCK_N)).to(tl.int64)
            m = (offs_n < limit)[:, None] & dmask[None, :]
            x = tl.load(base + offs_n[:, None] * sn + offs_d[None, :], mask=m, other=0.0).to(tl.float32)
            y = (x - mean[None, :]) * scale
            y = tl.maximum(y, -448.0, propagate_nan=tl.PropagateNan.ALL)
            y = tl.minimum(y, 448.0, propagate_nan=tl.PropagateNan.ALL)
            if EXACT:
                y = _round_e4m3(y)
            tl.store(obase + offs_n[:, None] * row + offs_d[None, :], y.to(tl.float8e4nv), mask=m)
            i += BLOCK_N


@triton.jit
def _dequant(o8, out, desc, N, H, D, factor, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pn = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    f = tl.load(desc + bh) * factor
    offs_n = (pn * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    m = (offs_n < N)[:, None] & (offs_d < D)[None, :]
    row = (H * D).to(tl.int64)
    p = b * N * row + h * D + offs_n[:, None] * row + offs_d[None, :]
    x = tl.load(o8 + p, mask=m, other=0.0).to(tl.float32) * f
    tl.store(out + p, x.to(out.dtype.element_ty), mask=m)


def _blocks(d: int) -> Tuple[int, int]:
    block_d = max(16, triton.next_power_of_2(d))
    return max(16, TILE // block_d), block_d


def chunks(n: int, block_n: int) -> Tuple[int, int]:
    """(tokens per program, programs per head) for ``n`` tokens: at most MAX_CHUNKS programs per head,
    each a whole number of ``block_n`` tiles."""
    per = -(-max(n, 1) // MAX_CHUNKS)
    per = -(-per // block_n) * block_n
    return per, -(-max(n, 1) // per)


def quantize_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, per_tensor: bool, smooth_k: bool,
                 exact: bool, launches: str = "fused"):
    """(q8, k8, v8, descale [3, B, H], k_mean or None) for BHND views q [B, H, Nq, D], k/v [B, H, Nk, D]
    (validated by the caller: one dtype and device, equal B/H/D, contiguous last dim). ``launches``:
    ``fused`` (3 launches for the three tensors) or ``per_tensor`` (3 per tensor, one tensor after the other)."""
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    BH = B * H
    block_n, block_d = _blocks(D)
    chq, ncq = chunks(NQ, block_n)
    chk, nck = chunks(NK, block_n)
    chmax = max(ncq, nck)
    off_hamax = 3 * BH
    off_mean = off_hamax + 3 * BH
    off_pamax = off_mean + BH * block_d
    off_kstat = off_pamax + 3 * BH * chmax
    total = off_kstat + (BH * chmax * 3 * block_d if smooth_k else 0)
    ws = torch.empty(total, dtype=torch.float32, device=q.device)
    eq, ek = B * NQ * H * D, B * NK * H * D
    out = torch.empty(eq + 2 * ek, dtype=torch.float8_e4m3fn, device=q.device)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3])
    meta = dict(num_warps=NUM_WARPS)
    # fused: each launch covers q, k and v (3 launches). per_tensor: stats, finalize and cast of one tensor
    # after the other (9 launches), so a tensor that fits in L2 is read the second time from L2.
    groups = ((0, 3),) if launches == "fused" else ((0, 1), (1, 1), (2, 1))
    for t0, n in groups:
        _stats[(chmax, BH, n)](q, k, v, *strides, H, BH, NQ, NK, D, chq, chk, ncq, nck, chmax, ws, off_pamax,
                               off_kstat, t0, SMOOTH_K=smooth_k, BLOCK_N=block_n, BLOCK_D=block_d, **meta)
        _finalize[(BH, n)](ws, BH, NK, D, ncq, nck, chmax, off_hamax, off_mean, off_pamax, off_kstat, t0,
                           SMOOTH_K=smooth_k, CH_P=max(2, triton.next_power_of_2(chmax)), BLOCK_D=block_d, **meta)
        _cast[(chmax, BH, n)](q, k, v, out, *strides, H, BH, NQ, NK, D, chq, chk, ncq, nck, eq, eq + ek, ws, 0,
                              off_hamax, off_mean, t0, SMOOTH_K=smooth_k, PER_TENSOR=per_tensor, EXACT=exact,
                              BLOCK_N=block_n, BLOCK_D=block_d, BH_P=max(2, triton.next_power_of_2(BH)), **meta)
    q8 = out[:eq].view(B, NQ, H, D)
    k8 = out[eq:eq + ek].view(B, NK, H, D)
    v8 = out[eq + ek:].view(B, NK, H, D)
    descale = ws[:3 * BH].view(3, B, H)
    mean = ws[off_mean:off_mean + BH * block_d].view(B, H, block_d)[:, :, :D] if smooth_k else None
    return q8, k8, v8, descale, mean


def dequantize(o8: torch.Tensor, descale: torch.Tensor, factor: float, dtype: torch.dtype) -> torch.Tensor:
    """``o8`` (e4m3 contiguous [B, N, H, D]) times ``factor * descale[b, h]``, in ``dtype``, one pass."""
    B, N, H, D = o8.shape
    out = torch.empty((B, N, H, D), dtype=dtype, device=o8.device)
    block_n, block_d = _blocks(D)
    _dequant[(triton.cdiv(max(N, 1), block_n), B * H)](o8, out, descale, N, H, D, factor,
                                                        BLOCK_N=block_n, BLOCK_D=block_d, num_warps=NUM_WARPS)
    return out
