"""Triton kernels of the fused FP8 quantisation (imported lazily by :mod:`.fp8`, never at package import).

q, k and v are quantised together (program axis 2 picks the tensor) in **two launches**:

1. ``_stats`` (grid: token chunks x batch*heads x 3; k's programs first, then q's, then v's): per chunk the
   absolute maximum (for smoothed k the per-channel max, min and sum) into a float32 workspace; then an atomic
   count per (tensor, head). The chunk that completes a head reduces its chunks (amax; for smoothed k the mean and the
   exact amax of ``k - mean`` from the channel extremes, ``max(max_c - mean_c, mean_c - min_c)``, the same
   float32 operations the cast performs) and writes its scale and descale; it then counts the head for its
   tensor, and the head that completes a tensor writes the tensor's spread of head scales and, for a tensor
   quantised per tensor, the shared scale of all its heads. Results do not depend on which program arrives
   last (maxima are order-free; the chunk sums are added in a fixed order), so the output is deterministic.
2. ``_cast`` (the same grid, walked backwards so the chunks ``_stats`` read last, still in L2, are read
   first): subtract the mean (k), scale, clamp to +-448, round to e4m3 and store contiguous [B, N, H, D].

Bytes per element: the input read twice and one fp8 byte written (5 for bf16; the second read partly hits
L2), against a floor of 3. Counters: an int32 buffer that reads 0 when ``_stats`` starts; every counter is
set back to 0 by the program that completes it (see :func:`.fp8.counters`).

``_dequant`` turns an e4m3 [B, N, H, D] attention output back into half precision times a per-head factor
(3 bytes per element, one launch).

Launching: :class:`._triton_launch.Launcher` (``kernel[grid]`` the first time per key, then the compiled kernel).
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from ._triton_launch import Launcher, fast_launch  # noqa: F401  (fast_launch: re-exported for the study)

TILE = 4096  # elements per [BLOCK_N, BLOCK_D] tile
# Launch settings measured by scripts/gpu/quant_variants.py (H200, 2026-12-02 01:42; BENCHMARKS.md): with smoothed k
# the statistics launch took 71.4 / 367.2 us (Flux / Wan 480p) at 8 warps and 64 chunks, 38.1 / 285.0 us at 4 and 32.
MAX_CHUNKS = 32  # token chunks per head (bounds the workspace and the reduction of a head)
CHUNK_SLOTS = tl.constexpr(64)  # a head's chunk maxima are read as one block of this many (>= MAX_CHUNKS, asserted)
NUM_WARPS = 8  # at 8 warps a [BLOCK_N, BLOCK_D] tile is 16 elements a thread: two 16-byte loads of bf16
SMOOTH_WARPS = 4  # the statistics launch with smoothed k (its per-channel max, min and sum per tile)
RB = tl.constexpr(16)  # chunk rows a smoothed head's reduction reads per step, as [16, BLOCK_D] tiles
HEADS = 128  # heads a tensor's reduction reads at a time
MAX_EXP = tl.constexpr(60)  # = fp8.MAX_EXPONENT


@triton.jit
def _pick(t, a, b, c):
    return tl.where(t == 0, a, tl.where(t == 1, b, c))


@triton.jit
def _tensor_of(p):
    """Tensor (0 q, 1 k, 2 v) of program-axis-2 index ``p``: k first, its longer head reductions overlap q and v."""
    return tl.where(p == 0, 1, tl.where(p == 1, 0, 2))


@triton.jit
def _exponent(amax):
    """int32 s: the largest with amax * 2**s <= 448 (448 = 1.75 * 2**8), clamped to +-MAX_EXP; 0 where amax is
    0 or not finite (what fp8.scale_exponents computes)."""
    bits = amax.to(tl.int32, bitcast=True)
    expo = (bits >> 23) & 0xFF
    s = 8 - (expo - 127) - ((bits & 0x7FFFFF) > 0x600000).to(tl.int32)
    s = tl.minimum(tl.maximum(s, -MAX_EXP), MAX_EXP)
    return tl.where((bits == 0) | (expo == 0xFF), 0, s)


@triton.jit
def _scale_of(s):
    return ((s + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _descale_of(amax, s):
    finite = ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) != 0xFF
    return tl.where(finite, ((127 - s) << 23).to(tl.float32, bitcast=True), float("nan"))


@triton.jit
def _nanmax(x):
    """max over a 1-D block, NaN if any element is NaN or Inf (tl.max alone drops NaN)."""
    return tl.max(x, axis=0) + tl.sum(x * 0.0, axis=0)


@triton.jit
def _layout(BH, CHMAX, BLOCK_D: tl.constexpr):
    """Float offsets in the workspace (mirrors workspace_layout below): the spreads [4], the scales [3, BH], the
    heads' maxima [3, BH], the chunks' maxima [3, BH, CHMAX], smoothed k's chunk statistics [BH, CHMAX, 3, D]."""
    scale = 4
    hamax = scale + 3 * BH
    part = hamax + 3 * BH
    kstat = (part + 3 * BH * CHMAX + 3) // 4 * 4
    return scale, hamax, part, kstat


def workspace_layout(bh: int, chmax: int, block_d: int, smooth_k: bool) -> int:
    """Floats in the workspace for ``_layout`` (the spreads come first)."""
    kstat = (4 + 6 * bh + 3 * bh * chmax + 3) // 4 * 4
    return kstat + (bh * chmax * 3 * block_d if smooth_k else 0)


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
def _head_amax_k(ws, mean_out, KSTAT, bh, nch, NK, D, CHMAX, BLOCK_D: tl.constexpr):
    """Smoothed k, one head: the mean over tokens from the chunks' channel sums, stored, and the exact max
    |k - mean| from the chunks' channel extremes. The chunks' rows are read RB at a time as one [RB, BLOCK_D]
    tile per statistic, at most MAX_CHUNKS / RB steps (one row at a time before: no measurable difference on the
    H200). Loads go through L2 (``.cg``): the chunks were written by other programs of this launch, ordered before
    us by the counter's acquire. The sum's order is fixed (tiles in order, one tree per tile): a deterministic mean."""
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    offs_r = tl.arange(0, RB)
    mx = tl.full([BLOCK_D], float("-inf"), tl.float32)
    mn = tl.full([BLOCK_D], float("inf"), tl.float32)
    sm = tl.zeros([BLOCK_D], dtype=tl.float32)
    j = 0
    while j < nch:
        rows = j + offs_r
        m = (rows < nch)[:, None] & dmask[None, :]
        p = ws + KSTAT + (bh.to(tl.int64) * CHMAX + rows[:, None]) * (3 * BLOCK_D) + offs_d[None, :]
        mx = tl.maximum(mx, tl.max(tl.load(p, mask=m, other=float("-inf"), cache_modifier=".cg"), axis=0))
        mn = tl.minimum(mn, tl.min(tl.load(p + BLOCK_D, mask=m, other=float("inf"), cache_modifier=".cg"), axis=0))
        sm += tl.sum(tl.load(p + 2 * BLOCK_D, mask=m, other=0.0, cache_modifier=".cg"), axis=0)
        j += RB
    mean = tl.where(dmask, sm / NK, 0.0)
    tl.store(mean_out + bh * D + offs_d, mean, mask=dmask)
    dev = tl.where(dmask, tl.maximum(mx - mean, mean - mn), 0.0)
    return _nanmax(dev)


@triton.jit
def _chunks_amax(part, nch):
    """A head's max over its chunks' maxima (NaN if any is), written by other programs of this launch."""
    offs_c = tl.arange(0, CHUNK_SLOTS)
    return _nanmax(tl.load(part + offs_c, mask=offs_c < nch, other=0.0, volatile=True))


@triton.jit
def _finish_tensor(ws, desc, cnt, t, BH, SCALE, HAMAX, PER_TENSOR: tl.constexpr, HB: tl.constexpr):
    """The last head of tensor t: its spread of head scales and, per tensor, the shared scale for every head."""
    tmax = tl.full([], 0.0, tl.float32)
    smin = tl.full([], 1000, tl.int32)
    smax = tl.full([], -1000, tl.int32)
    j = 0
    while j < BH:
        hs = j + tl.arange(0, HB)
        m = hs < BH
        a = tl.load(ws + HAMAX + t * BH + hs, mask=m, other=0.0, volatile=True)
        tmax = tl.maximum(tmax, _nanmax(a), propagate_nan=tl.PropagateNan.ALL)
        s = _exponent(a)
        valid = m & (a > 0) & (((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) != 0xFF)
        smin = tl.minimum(smin, tl.min(tl.where(valid, s, 1000), axis=0))
        smax = tl.maximum(smax, tl.max(tl.where(valid, s, -1000), axis=0))
        j += HB
    tl.store(ws + t, tl.where(smax > smin, smax - smin, 0).to(tl.float32))
    if PER_TENSOR:
        s = _exponent(tmax)
        sc = _scale_of(s)
        dsc = _descale_of(tmax, s)
        j = 0
        while j < BH:
            hs = j + tl.arange(0, HB)
            m = hs < BH
            tl.store(ws + SCALE + t * BH + hs, tl.zeros([HB], tl.float32) + sc, mask=m)
            tl.store(desc + t * BH + hs, tl.zeros([HB], tl.float32) + dsc, mask=m)
            j += HB
    tl.store(cnt + t, 0)


@triton.jit
def _stats(q, k, v, ws, desc, mean, cnt, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, H, NQ, NK, D, CHQ, CHK, CHMAX,
           SMOOTH_K: tl.constexpr, TENSOR_MASK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
           HB: tl.constexpr):
    c = tl.program_id(0)
    bh = tl.program_id(1)
    t = _tensor_of(tl.program_id(2))
    BH = tl.num_programs(1)
    n_tok = tl.where(t == 0, NQ, NK)
    chunk = tl.where(t == 0, CHQ, CHK)
    nch = tl.maximum(tl.cdiv(n_tok, chunk), 1)
    SCALE, HAMAX, PART, KSTAT = _layout(BH, CHMAX, BLOCK_D)
    if c < nch:  # chunks past this tensor's end do nothing (they are not counted either)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        base = _pick(t, q, k, v) + b * _pick(t, sqb, skb, svb).to(tl.int64) + h * _pick(t, sqh, skh, svh).to(tl.int64)
        sn = _pick(t, sqn, skn, svn).to(tl.int64)
        i = c * chunk
        limit = tl.minimum(i + chunk, n_tok)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        out = ws + PART + (t * BH + bh) * CHMAX + c
        if SMOOTH_K:
            if t == 1:  # k: per-channel extremes and sums, for the mean and the exact max of |k - mean|
                cmax, cmin, csum = _channel_stats(base, sn, i, limit, offs_d, dmask, BLOCK_N, BLOCK_D)
                p = ws + KSTAT + (bh.to(tl.int64) * CHMAX + c) * (3 * BLOCK_D) + offs_d
                tl.store(p, cmax)
                tl.store(p + BLOCK_D, cmin)
                tl.store(p + 2 * BLOCK_D, csum)
            else:
                tl.store(out, _abs_stats(base, sn, i, limit, offs_d, dmask, BLOCK_N, BLOCK_D))
        else:
            tl.store(out, _abs_stats(base, sn, i, limit, offs_d, dmask, BLOCK_N, BLOCK_D))
        # Every thread's stores above, then one acq_rel count (the threadfence-reduction pattern): the program
        # that completes the head sees all its chunks' stores.
        tl.debug_barrier()
        done = tl.atomic_add(cnt + 3 + t * BH + bh, 1, sem="acq_rel")
        if done == nch - 1:
            if SMOOTH_K:
                if t == 1:
                    amax = _head_amax_k(ws, mean, KSTAT, bh, nch, NK, D, CHMAX, BLOCK_D)
                else:
                    amax = _chunks_amax(ws + PART + (t * BH + bh) * CHMAX, nch)
            else:
                amax = _chunks_amax(ws + PART + (t * BH + bh) * CHMAX, nch)
            s = _exponent(amax)
            tl.store(ws + HAMAX + t * BH + bh, amax)
            tl.store(ws + SCALE + t * BH + bh, _scale_of(s))
            tl.store(desc + t * BH + bh, _descale_of(amax, s))
            tl.store(cnt + 3 + t * BH + bh, 0)
            tl.debug_barrier()
            heads = tl.atomic_add(cnt + t, 1, sem="acq_rel")
            if heads == BH - 1:
                per_tensor = ((TENSOR_MASK >> t) & 1) == 1
                if per_tensor:
                    _finish_tensor(ws, desc, cnt, t, BH, SCALE, HAMAX, True, HB)
                else:
                    _finish_tensor(ws, desc, cnt, t, BH, SCALE, HAMAX, False, HB)


@triton.jit
def _cast(q, k, v, q8, k8, v8, ws, mean_in, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, H, NQ, NK, D, CHQ, CHK, CHMAX,
          SMOOTH_K: tl.constexpr, EXACT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # walked backwards: v's last heads' last chunks first (what _stats read last, the likeliest still in L2)
    BH = tl.num_programs(1)
    c = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = BH - 1 - tl.program_id(1)
    t = _tensor_of(2 - tl.program_id(2))
    n_tok = tl.where(t == 0, NQ, NK)
    chunk = tl.where(t == 0, CHQ, CHK)
    nch = tl.maximum(tl.cdiv(n_tok, chunk), 1)
    SCALE, HAMAX, PART, KSTAT = _layout(BH, CHMAX, BLOCK_D)
    if c < nch:
        scale = tl.load(ws + SCALE + t * BH + bh)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        base = _pick(t, q, k, v) + b * _pick(t, sqb, skb, svb).to(tl.int64) + h * _pick(t, sqh, skh, svh).to(tl.int64)
        sn = _pick(t, sqn, skn, svn).to(tl.int64)
        row = (H * D).to(tl.int64)
        obase = _pick(t, q8, k8, v8) + b * n_tok * row + h * D
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        mean = tl.zeros([BLOCK_D], dtype=tl.float32)
        if SMOOTH_K:
            if t == 1:
                mean = tl.load(mean_in + bh * D + offs_d, mask=dmask, other=0.0)
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
    f = tl.load(desc + bh) * factor  # float32 * float32
    offs_n = (pn * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    m = (offs_n < N)[:, None] & (offs_d < D)[None, :]
    row = (H * D).to(tl.int64)
    p = b * N * row + h * D + offs_n[:, None] * row + offs_d[None, :]
    x = tl.load(o8 + p, mask=m, other=0.0).to(tl.float32) * f  # exact e4m3 -> float32, one float32 product
    tl.store(out + p, x.to(out.dtype.element_ty), mask=m)  # one rounding, to nearest even


# ---------------------------------------------------------------- launching

_STATS = Launcher(_stats, ("SMOOTH_K", "TENSOR_MASK", "BLOCK_N", "BLOCK_D", "HB"), NUM_WARPS)
_STATS_SMOOTH = Launcher(_stats, _STATS.names, SMOOTH_WARPS)
_CAST = Launcher(_cast, ("SMOOTH_K", "EXACT", "BLOCK_N", "BLOCK_D"), NUM_WARPS)
_DEQUANT = Launcher(_dequant, ("BLOCK_N", "BLOCK_D"), NUM_WARPS)


def _aligned(*ts) -> int:
    bits = 0
    for i, t in enumerate(ts):
        bits |= (t.data_ptr() % 16 == 0) << i
    return bits


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _blocks(d: int) -> Tuple[int, int]:
    block_d = max(16, _pow2(d))
    return max(16, TILE // block_d), block_d


def chunks(n: int, block_n: int) -> Tuple[int, int]:
    """(tokens per program, programs per head) for ``n`` tokens: at most MAX_CHUNKS programs per head,
    each a whole number of ``block_n`` tiles."""
    assert MAX_CHUNKS <= CHUNK_SLOTS.value, "a head's chunk maxima are read as one block of CHUNK_SLOTS"
    per = -(-max(n, 1) // MAX_CHUNKS)
    per = -(-per // block_n) * block_n
    return per, -(-max(n, 1) // per)


_plans: dict = {}  # (B, H, NQ, NK, D, strides, flags) -> what a call of that signature launches: pure data


def _plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tensor_mask: int, smooth_k: bool, exact: bool):
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    BH = B * H
    block_n, block_d = _blocks(D)
    chq, ncq = chunks(NQ, block_n)
    chk, nck = chunks(NK, block_n)
    chmax = max(ncq, nck)
    sq, sk, sv = q.stride(), k.stride(), v.stride()
    ints = (sq[0], sq[1], sq[2], sk[0], sk[1], sk[2], sv[0], sv[1], sv[2], H, NQ, NK, D, chq, chk, chmax)
    return ((chmax, BH, 3), ints, workspace_layout(BH, chmax, block_d, smooth_k), 3 + 3 * BH,
            (bool(smooth_k), int(tensor_mask), block_n, block_d, HEADS), (bool(smooth_k), bool(exact), block_n, block_d),
            (B, NQ, H, D), (B, NK, H, D), (3, B, H), (B, H, D) if smooth_k else None)


def quantize_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tensor_mask: int, smooth_k: bool, exact: bool,
                 counters):
    """(q8, k8, v8, descale [3, B, H], k_mean or None, spread [3]) for BHND views q [B, H, Nq, D], k/v
    [B, H, Nk, D] (validated by the caller: one dtype and device, equal B/H/D, contiguous last dim).
    ``tensor_mask``: bit i set where tensor i (q, k, v) takes one scale for all its heads. ``counters(n)``:
    an int32 buffer of at least n zeros (:func:`.fp8.counters`), zeros again after the launch."""
    key = (q.shape, k.shape[2], q.stride(), k.stride(), v.stride(), tensor_mask, smooth_k, exact)
    plan = _plans.get(key)
    if plan is None:
        if len(_plans) > 1024:
            _plans.clear()
        plan = _plans[key] = _plan(q, k, v, tensor_mask, smooth_k, exact)
    grid, ints, total, n_cnt, c_stats, c_cast, q_shape, kv_shape, d_shape, m_shape = plan
    dev = q.device
    e4m3 = torch.float8_e4m3fn
    q8 = torch.empty(q_shape, dtype=e4m3, device=dev)
    k8 = torch.empty(kv_shape, dtype=e4m3, device=dev)
    v8 = torch.empty(kv_shape, dtype=e4m3, device=dev)
    descale = torch.empty(d_shape, dtype=torch.float32, device=dev)
    ws = torch.empty(total, dtype=torch.float32, device=dev)
    mean = descale if m_shape is None else torch.empty(m_shape, dtype=torch.float32, device=dev)
    cnt = counters(n_cnt)
    key = (dev.index, q.dtype, _aligned(q, k, v))
    (_STATS_SMOOTH if smooth_k else _STATS)(grid, (q, k, v, ws, descale, mean, cnt) + ints, c_stats, key)
    _CAST(grid, (q, k, v, q8, k8, v8, ws, mean) + ints, c_cast, key)
    return q8, k8, v8, descale, None if m_shape is None else mean, ws[:3]


def dequantize(o8: torch.Tensor, descale: torch.Tensor, factor: float, dtype: torch.dtype) -> torch.Tensor:
    """``o8`` (e4m3 contiguous [B, N, H, D]) times ``factor * descale[b, h]``, in ``dtype``, one pass."""
    B, N, H, D = o8.shape
    out = torch.empty((B, N, H, D), dtype=dtype, device=o8.device)
    block_n, block_d = _blocks(D)
    grid = (-(-max(N, 1) // block_n), B * H, 1)
    _DEQUANT(grid, (o8, out, descale, N, H, D, float(factor)), (block_n, block_d),
             (o8.device.index, dtype, _aligned(o8, out, descale)))
    return out
