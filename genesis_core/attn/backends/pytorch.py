"""``pytorch`` backend: plain matmul–softmax–matmul, chunked over query blocks, in bounded memory.

Runs everywhere PyTorch runs (any device, any floating dtype). Scores are computed in the input dtype, then
scaled, masked and soft-maxed in float32 (float64 stays float64). Grouped-query attention reads k and v in
place: their heads are never repeated, and the matmuls get k/v views (a batch is processed on its own where
its strides cannot be merged with the heads', e.g. a [B, N, H, D] tensor seen as BHND).

Memory bound. Query rows are processed in blocks whose size comes from the whole footprint of one block
(:func:`block_bytes`): the scores in the input dtype with their float32 copy while it is made, the mask's
temporaries (a boolean mask's negation, an additive mask cast to float32), the softmax beside the scores, the
probabilities cast back to the input dtype, the block's rows of q and its output. That is two float32 values
(float64 inputs: two float64 values) per score of the block plus the rows' q and output. Without autograd,
what one call allocates besides its output is therefore at most ``budget`` bytes (:data:`SCORE_BUDGET_BYTES`
by default) at every length, or one query row's footprint (``block_bytes(call, 1, 1)`` plus
:func:`fixed_bytes`) where a single row alone is larger. Not counted: the matmul kernels' own workspace
(PyTorch's CPU half-precision GEMM packs its operands: a few MiB, plus a contiguous copy of a strided k or v).
With autograd, the tensors saved for the backward pass (every block's probabilities) come on top.

Fully masked rows (every key masked out, by a boolean mask or by an additive mask that is -inf on every key)
return 0, as PyTorch's ``scaled_dot_product_attention`` does; their gradients are 0 too.
"""
from __future__ import annotations

from typing import Tuple

import torch

from ..registry import Backend, register
from ..types import AttentionCall
from ._common import dead_rows

SCORE_BUDGET_BYTES = 256 * 1024 * 1024  # everything one query block allocates (see the module docstring)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # float32 softmax (float64 stays float64)


def _mergeable(t: torch.Tensor) -> bool:
    """Whether [B, H, N, D] can be viewed as [B*H, N, D] without a copy."""
    try:
        t.view(-1, t.shape[2], t.shape[3])
        return True
    except RuntimeError:
        return False


def row_bytes(call: AttentionCall, batch: int = 0) -> int:
    """Bytes one query row over ``batch`` batch items (0: all) adds to a block's peak (see :func:`block_bytes`)."""
    heads = (batch or call.batch) * call.heads
    a, isz = _acc(call.dtype).itemsize, call.dtype.itemsize
    # Two float32 score-sized tensors at the peak (see block_bytes), plus the row's q and output, and two
    # accumulator values per row and head of slack (softmax row statistics).
    return heads * (2 * a * call.kv_len + (call.head_dim + call.v_head_dim) * isz + 2 * a)


_SLACK = 1024  # bytes: the allocator's rounding of a block's small tensors


def fixed_bytes(call: AttentionCall) -> int:
    """Bytes a call holds through all its blocks besides its output: the flags of fully masked rows (and the
    row maxima they are computed from), one set per query row and mask head."""
    m = call.mask
    if m is None:
        return 0
    return m.shape[0] * m.shape[1] * m.shape[2] * (max(m.element_size(), 1) + 1) + _SLACK


def block_bytes(call: AttentionCall, rows: int, batch: int = 0) -> int:
    """Bytes one block of ``rows`` query rows over ``batch`` batch items (0: all) allocates at its peak.

    What is alive at once, phase by phase, in score-sized tensors (float32 ``a`` bytes per score, the input dtype
    ``i`` <= ``a``): the scores in the input dtype and their float32 copy (i + a); the float32 scores and the
    mask's temporary (a boolean mask's negation, 1, or an additive mask cast to float32, <= a); the scores and
    their softmax (2a); the softmax and its copy in the input dtype (a + i). So 2a per score, plus the block's
    rows of q (a copy where its strides need one) and its output (see :func:`row_bytes`).
    """
    return rows * row_bytes(call, batch) + _SLACK


def plan(call: AttentionCall, budget: int = SCORE_BUDGET_BYTES) -> Tuple[int, int]:
    """(batch items per block, query rows per block) so that :func:`block_bytes` plus :func:`fixed_bytes` fit
    ``budget``.

    All batch items go in one block where k and v can be viewed as [B*H, N, D] and one row of all of them fits;
    otherwise one batch item per block. Rows: as many as fit, at least 1, at most Nq.
    """
    nb = call.batch
    if nb > 1 and not (_mergeable(call.k) and _mergeable(call.v)
                       and block_bytes(call, 1, nb) + fixed_bytes(call) <= budget):
        nb = 1
    rows = (budget - _SLACK - fixed_bytes(call)) // max(row_bytes(call, nb), 1)
    return nb, int(max(1, min(call.q_len, rows)))


def query_block(call: AttentionCall, budget: int = SCORE_BUDGET_BYTES) -> int:
    """Query rows per block so that one block's whole footprint (:func:`block_bytes`) and what the call holds
    throughout (:func:`fixed_bytes`) fit ``budget`` bytes (one row where a single row alone is larger)."""
    return plan(call, budget)[1]


def run(call: AttentionCall, budget: int = SCORE_BUDGET_BYTES) -> torch.Tensor:
    q, k, v, mask = call.q, call.k, call.v, call.mask
    b, hq, nq, d = q.shape
    hkv, nk, dv = call.kv_heads, call.kv_len, call.v_head_dim
    g = hq // hkv
    acc = _acc(q.dtype)
    dead = None
    if mask is not None:
        # [B|1, H|1, Nq|1, Nk] -> [B|1, Hkv|1, G|1, Nq|1, Nk], matching the [B, Hkv, G, rows, Nk] scores.
        mask = mask.unsqueeze(2) if mask.shape[1] == 1 else mask.unflatten(1, (hkv, g))
        dead = dead_rows(mask)
        if q.device.type == "cpu" and not bool(dead.any()):  # (free to ask on CPU; elsewhere it would sync)
            dead = None
    out = torch.empty((b, hkv, g, nq, dv), dtype=q.dtype, device=q.device)
    nb, step = plan(call, budget)
    for b0 in range(0, b, nb):
        bs = slice(b0, b0 + nb)
        # [nb*Hkv, Nk, D] views (nb == 1, or strides that merge): the G query heads of a group share one.
        kt = k[bs].reshape(nb * hkv, nk, d).transpose(1, 2)
        vb = v[bs].reshape(nb * hkv, nk, dv)
        mb = None if mask is None else (mask[bs] if mask.shape[0] > 1 else mask)
        db = None if dead is None else (dead[bs] if dead.shape[0] > 1 else dead)
        for start in range(0, nq, step):
            stop = min(nq, start + step)
            rows = stop - start
            qb = q[bs, :, start:stop].reshape(nb * hkv, g * rows, d)
            scores = torch.bmm(qb, kt)
            del qb
            scores = scores.to(acc).mul_(call.scale)
            s5 = scores.view(nb, hkv, g, rows, nk)
            gone = None
            if mb is not None:
                m = mb if mb.shape[3] == 1 else mb[:, :, :, start:stop]
                if m.dtype == torch.bool:
                    s5.masked_fill_(~m, float("-inf"))
                else:
                    s5.add_(m if m.dtype == acc else m.to(acc))
                del m
                if db is not None:
                    # A fully masked row's softmax is NaN (0/0): give it finite scores instead, and zero its output
                    # below. A NaN must never reach the matmul: CPU bf16 GEMM spreads it to the neighbouring row.
                    gone = db if db.shape[3] == 1 else db[:, :, :, start:stop]
                    s5.masked_fill_(gone, 0.0)
            del s5
            probs = torch.softmax(scores, dim=-1)
            del scores
            probs = probs.to(v.dtype)
            o = torch.bmm(probs, vb)
            del probs
            o5 = o.view(nb, hkv, g, rows, dv)
            if gone is not None:  # a fully masked row is 0 (PyTorch SDPA's rule), and so are its gradients
                o5.masked_fill_(gone, 0.0)
            out[bs, :, :, start:stop] = o5
            del o, o5
    return out.view(b, hq, nq, dv)


backend = register(
    Backend(
        name="pytorch",
        probe=lambda: None,
        run=run,
        description=lambda: "PyTorch matmul-softmax-matmul (float32 softmax), chunked over query blocks",
        version=lambda: torch.__version__,
        tolerance={torch.float32: 1e-4, torch.float64: 1e-9, torch.float16: 2e-2, torch.bfloat16: 3e-2},
    ),
    rank=90,
)
