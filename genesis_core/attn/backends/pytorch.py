"""``pytorch`` backend: plain matmul–softmax–matmul, chunked over query blocks.

Runs everywhere PyTorch runs (any device, any floating dtype). Scores are computed in the input
dtype, the softmax in float32, and the query dimension is processed in blocks so that the score
matrix of one block stays under ``SCORE_BUDGET_BYTES``: a 32k-token call never allocates the
whole [B, H, Nq, Nk] matrix. Grouped-query attention is computed without copying k/v.
"""
from __future__ import annotations


import torch

from ..registry import Backend, register
from ..types import AttentionCall

SCORE_BUDGET_BYTES = 256 * 1024 * 1024  # float32 scores of one query block


def query_block(call: AttentionCall, budget: int = SCORE_BUDGET_BYTES) -> int:
    """Rows of queries per block so that one block's float32 scores fit ``budget`` bytes."""
    per_row = call.batch * call.heads * call.kv_len * 4
    return max(1, min(call.q_len, budget // max(per_row, 1)))


def run(call: AttentionCall, budget: int = SCORE_BUDGET_BYTES) -> torch.Tensor:
    q, k, v, mask = call.q, call.k, call.v, call.mask
    b, hq, nq, _ = q.shape
    hkv = call.kv_heads
    g = hq // hkv
    # [B, Hkv, G, N, D]: the G query heads of a group share one k/v head (a view, no copy).
    qg = q.reshape(b, hkv, g, nq, q.shape[-1])
    kt = k.unsqueeze(2).transpose(-1, -2)
    vg = v.unsqueeze(2)
    if mask is not None:
        # [B|1, H|1, Nq|1, Nk] -> [B|1, Hkv|1, G|1, Nq|1, Nk] matching qg's grouping.
        if mask.shape[1] == 1:
            mask = mask.unsqueeze(2)
        else:
            mask = mask.reshape(mask.shape[0], hkv, g, mask.shape[2], mask.shape[3])
    out = torch.empty((b, hkv, g, nq, v.shape[-1]), dtype=q.dtype, device=q.device)
    acc = torch.promote_types(q.dtype, torch.float32)  # float32 softmax (float64 stays float64)
    step = query_block(call, budget)
    for start in range(0, nq, step):
        stop = min(nq, start + step)
        scores = torch.matmul(qg[:, :, :, start:stop], kt).to(acc).mul_(call.scale)
        if mask is not None:
            m = mask if mask.shape[3] == 1 else mask[:, :, :, start:stop]
            if m.dtype == torch.bool:
                scores.masked_fill_(~m, float("-inf"))
            else:
                scores.add_(m.to(acc))
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        out[:, :, :, start:stop] = torch.matmul(probs, vg)
    return out.reshape(b, hq, nq, v.shape[-1])


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
