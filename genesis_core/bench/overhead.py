"""The overhead section: Genesis ``attention()`` against calling the chosen kernel directly, µs per call.

Small tensors ([1, 1, 8, 64]) for an already-seen signature, so what shows is the CPU-side cost of
dispatch, not the kernel: the best of interleaved rounds of many calls each.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from .._device import synchronize
from ..attn import dispatch, registry
from ..attn.types import AttentionCall


def _per_call_us(fns: Dict[str, Callable[[], object]], device: torch.device, calls: int = 2000,
                 rounds: int = 15) -> Dict[str, float]:
    """µs per call of each fn: the best of interleaved rounds of ``calls`` calls (host clock).

    The minimum, as ``timeit`` advises for host-side micro-benchmarks: other processes only ever add
    time, so the fastest round is the closest to the code's own cost (medians moved by several µs
    between runs on a shared 2-core machine)."""
    for fn in fns.values():
        for _ in range(min(200, calls)):
            fn()
    samples: Dict[str, List[float]] = {n: [] for n in fns}
    for _ in range(rounds):
        for n, fn in fns.items():
            synchronize(device)
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            synchronize(device)
            samples[n].append((time.perf_counter() - t0) / calls * 1e6)
    return {n: min(v) for n, v in samples.items()}


def bench_overhead(devices: List[torch.device], calls: int = 2000, rounds: int = 15) -> List[dict]:
    rows = []
    for device in devices:
        dtype = torch.float32 if device.type == "cpu" else torch.float16
        q, k, v = (torch.randn(1, 1, 8, 64, device=device, dtype=dtype) for _ in range(3))
        with torch.no_grad():
            dispatch.attention(q, k, v)  # plan (and, where measuring is on, the autotuner) happen here
            chosen = dispatch.last_backend()
            backend = registry.get(chosen)
            call = AttentionCall(q, k, v, None, 64 ** -0.5)
            fns = {
                "F.scaled_dot_product_attention(q, k, v)": lambda: F.scaled_dot_product_attention(q, k, v),
                f"backend '{chosen}'.run(call) (the chosen kernel)": lambda: backend.run(call),
                "genesis_core.attention(q, k, v)  [auto]": lambda: dispatch.attention(q, k, v),
                f"genesis_core.attention(..., backend='{chosen}')": lambda: dispatch.attention(q, k, v, backend=chosen),
            }
            us = _per_call_us(fns, device, calls=calls if device.type == "cpu" else max(1, calls // 4), rounds=rounds)
        names = list(fns)
        direct = us[names[0]] if chosen == "sdpa" else us[names[1]]
        for n in names:
            rows.append({"device": str(device), "dtype": str(dtype).replace("torch.", ""), "call": n,
                         "us_per_call": us[n], "overhead_us": us[n] - direct, "chosen": chosen})
    return rows
