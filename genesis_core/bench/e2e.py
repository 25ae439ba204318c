"""The end-to-end section: a stack of Flux-sized transformer blocks, Genesis AUTO against plain SDPA.

LayerNorm → QKV → RMSNorm(q, k) → attention → projection → MLP, with Genesis AUTO against plain
``F.scaled_dot_product_attention`` (what ComfyUI's default attention calls on current PyTorch), timed
alternately in one run. Where AUTO served the baseline's own kernel (same device kernels, or on CPU the
same backend: ``sdpa`` is ``F.scaled_dot_product_attention`` itself), the row says so and the verdict gives
no speed ratio. ComfyUI's own Flux model is in ``comfy_e2e.py``.
"""
from __future__ import annotations

import statistics
from typing import Callable, Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._timing import time_runs
from ..attn import dispatch
from .kernels import same_as_baseline
from .verdicts import e2e_verdict

BASELINE_BACKEND = "sdpa"  # the Genesis backend that runs F.scaled_dot_product_attention itself


class _RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * self.weight


class FluxLikeBlock(nn.Module):
    """Pre-norm transformer block with Flux's sizes and habits: fused QKV, RMSNorm on q and k, GELU(tanh) MLP x4."""

    def __init__(self, heads: int, head_dim: int, attn: Callable):
        super().__init__()
        hidden = heads * head_dim
        self.heads, self.head_dim, self.attn = heads, head_dim, attn
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.q_norm, self.k_norm = _RMSNorm(head_dim), _RMSNorm(head_dim)
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(approximate="tanh"), nn.Linear(4 * hidden, hidden))

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        a = self.attn(q, k, v)  # [B, H, N, D], as ComfyUI's Flux passes it
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, -1))
        return x + self.mlp(self.norm2(x))


def bench_e2e(device: torch.device, dtype: torch.dtype, size: str, blocks: int, reps: int, seed: int) -> List[dict]:
    if size == "flux":
        b, n, heads, hd = 1, 4608, 24, 128
    else:
        b, n, heads, hd = 1, 256, 4, 32
    torch.manual_seed(seed)
    current = {"fn": None}
    with device:  # parameters created (and initialised) on the device: seconds saved at Flux sizes
        stack = nn.Sequential(*[FluxLikeBlock(heads, hd, lambda q, k, v: current["fn"](q, k, v)) for _ in range(blocks)])
    stack = stack.to(device=device, dtype=dtype).eval()
    x = torch.randn(b, n, heads * hd, device=device, dtype=dtype)
    variants = {
        "F.scaled_dot_product_attention (ComfyUI default on current PyTorch)": F.scaled_dot_product_attention,
        "genesis_core.attention (AUTO)": lambda q, k, v: dispatch.attention(q, k, v),
    }
    outs = {}
    samples: Dict[str, List[float]] = {n_: [] for n_ in variants}
    with torch.no_grad():
        for name, fn in variants.items():
            current["fn"] = fn
            outs[name] = stack(x).float()  # warm-up (Genesis measures its attention here)
            stack(x)
        for _ in range(reps):
            for name, fn in variants.items():
                current["fn"] = fn
                samples[name].append(time_runs(lambda: stack(x), device, 1)[0])
    served = dispatch.last_backend()
    base_name, gen_name = list(variants)
    base = outs[base_name]
    diff = float(torch.linalg.vector_norm(outs[gen_name] - base) / torch.linalg.vector_norm(base))
    base_ms = statistics.median(samples[base_name])

    def forward_with(fn):
        def run():
            current["fn"] = fn
            stack(x)
        return run

    same, why = same_as_baseline(forward_with(variants[base_name]), forward_with(variants[gen_name]), device,
                                 BASELINE_BACKEND, served)
    rows = []
    for name in variants:
        ms = statistics.median(samples[name])
        rows.append({"variant": name, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
                     "size": f"{blocks} blocks, B{b} N{n} H{heads} D{hd} (hidden {heads * hd})", "ms": ms,
                     "vs_baseline": ms / base_ms, "rel_diff_vs_baseline": 0.0 if name == base_name else diff,
                     "attention_backend": None if name == base_name else served})
    rows[1].update(same_as_baseline=same, same_as_baseline_why=why)
    rows[1]["target_ok"], rows[1]["verdict"] = e2e_verdict(rows)
    return rows
