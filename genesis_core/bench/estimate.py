"""How long a bench run will take, said before it starts.

A cost model per section from what was asked (sections, shapes, backends, repetitions, warm-ups, the
per-cell budget, the e2e size) and a probe of this machine's speed taken now (:func:`measure_speed`,
a few ms: a matmul's throughput and a tiny SDPA call's host cost), so a busy machine gets a longer estimate.
It is an estimate - the cells' real times are known only once they run - and the run ends by printing
how long it really took next to it.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .._timing import inner_count, repeat, time_runs
from ..attn import autotune, registry
from .shapes import Shape

ATTENTION_EFFICIENCY = 0.5  # attention kernels reach about this share of the matmul probe's throughput
REFERENCE_SLOWDOWN = 4.0  # the reference kernels (materialised scores) against the fast ones
_REFERENCE = ("pytorch", "sdpa_math")
AUTOTUNE_BUDGET_S = {"cpu": 1.5}  # the autotuner's default budget per signature; 4 s on accelerators
ONNX_EXPORT_S = 2.0  # the executor section: importing ONNX Runtime, exporting its cross-attention block
COMFYUI_IMPORT_S = 5.0


@dataclass(frozen=True)
class Speed:
    """What the probe measured: dense matmul throughput on the bench device, in the bench dtype, and the
    host cost of one tiny ``F.scaled_dot_product_attention`` call there (and on the CPU, when the bench
    device is another)."""

    gflops: float
    call_us: float
    cpu_call_us: Optional[float] = None


def measure_speed(device: torch.device, dtype: torch.dtype) -> Speed:
    """Probe this machine now (a few ms)."""
    n = 256 if device.type == "cpu" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    with torch.no_grad():
        time_runs(lambda: a @ a, device, 3)
        ms = min(time_runs(lambda: a @ a, device, 20))  # the best of 20: a busy moment only adds time
        gflops = 2.0 * n ** 3 / max(ms * 1e-3, 1e-9) / 1e9
        call_us = _call_us(device, torch.float32 if device.type == "cpu" else torch.float16)
        cpu_us = call_us if device.type == "cpu" else _call_us(torch.device("cpu"), torch.float32)
    return Speed(gflops=gflops, call_us=call_us, cpu_call_us=cpu_us)


def _call_us(device: torch.device, dtype: torch.dtype) -> float:
    q = torch.randn(1, 1, 8, 64, device=device, dtype=dtype)
    fn = repeat(lambda: F.scaled_dot_product_attention(q, q, q), 100)
    fn()
    return min(time_runs(fn, device, 3)) * 10.0  # ms per 100 calls -> us per call


def estimate(sections: Sequence[str], shapes: List[Shape], *, names: List[str], include_auto: bool,
             device: torch.device, dtype: torch.dtype, reps: int, warmup: int, budget_ms: float, e2e_size: str,
             e2e_blocks: int, comfyui: bool, speed: Speed) -> Dict[str, float]:
    """Seconds per section (0 for a section not asked for) and ``total``, their sum."""
    out = {
        "attention": _attention_s(shapes, names, include_auto, device, reps, warmup, budget_ms, speed)
        if "attention" in sections else 0.0,
        "overhead": _overhead_s(device, speed, comfyui) if "overhead" in sections else 0.0,
        "e2e": _e2e_s(e2e_size, e2e_blocks, max(reps, 5), comfyui, device, speed) if "e2e" in sections else 0.0,
        "executor": _executor_s(device, speed) if "executor" in sections else 0.0,
    }
    out["total"] = sum(out.values())
    return out


def _attention_s(shapes: List[Shape], names: List[str], include_auto: bool, device: torch.device, reps: int,
                 warmup: int, budget_ms: float, speed: Speed) -> float:
    usable = [n for n in names if n in registry.names() and registry.get(n).available() is None]
    floor_ms = speed.call_us * 1e-3
    measures = include_auto and autotune.enabled_for(device)
    total_ms = 0.0
    for s in shapes:
        fast = max(s.flops / (speed.gflops * 1e9 * ATTENTION_EFFICIENCY) * 1e3, floor_ms)
        inner = inner_count(fast)
        cells = {n: fast * (REFERENCE_SLOWDOWN if n in _REFERENCE else 1.0) for n in usable}
        if include_auto:
            cells["auto"] = fast + floor_ms
        for t in cells.values():
            timed = min(reps, max(1, int(budget_ms / max(t * inner, 1e-3))))
            total_ms += (warmup + 1) * t + timed * inner * t
        if include_auto:  # AUTO timed alternately with its kernel, and the chosen one with the fastest
            total_ms += 2 * 2 * max(reps, 6) * inner * fast
            if measures:
                total_ms += min(AUTOTUNE_BUDGET_S.get(device.type, 4.0) * 1e3, len(usable) * 20 * inner * fast)
        total_ms += 4 * fast  # the float64 reference slice
    return total_ms * 1e-3


def _overhead_s(device: torch.device, speed: Speed, comfyui: bool = False) -> float:
    """Four calls compared per device, and ComfyUI's attention_pytorch with and without the override (reproduced,
    and the real one with a checkout), 200 warm-up calls each and 15 rounds of 2000 (500 off the CPU)."""
    per_call_us = {"cpu": speed.cpu_call_us or speed.call_us}
    if device.type == "cuda":
        per_call_us[str(device)] = speed.call_us
    total_us = 0.0
    for dev, us in per_call_us.items():
        calls = 2000 if dev == "cpu" else 500
        total_us += (4 + (4 if comfyui else 2)) * (min(200, calls) + 15 * calls) * (us + 2.0)  # Genesis adds a few us
    return total_us * 1e-6


def _e2e_s(size: str, blocks: int, reps: int, comfyui: bool, device: torch.device, speed: Speed) -> float:
    b, n, heads, hd = (1, 4608, 24, 128) if size == "flux" else (1, 256, 4, 32)
    hidden = heads * hd
    flops = blocks * (24.0 * b * n * hidden ** 2 + 4.0 * b * heads * n * n * hd)
    forward_s = flops / (speed.gflops * 1e9 * ATTENTION_EFFICIENCY) + blocks * 12 * speed.call_us * 1e-6
    build_s = blocks * 12 * hidden ** 2 * (2e-8 if device.type == "cpu" else 1e-10)
    total = build_s + 2 * (2 + reps) * forward_s
    if comfyui:  # ComfyUI's Flux: 1 + 2 blocks (small) or 2 + 4, about as heavy per block
        extra = (3 if size == "small" else 6) / max(blocks, 1)
        total += COMFYUI_IMPORT_S + 2 * (2 + reps) * forward_s * extra
    return total


def _executor_s(device: torch.device, speed: Speed) -> float:
    """The executor section: per-call overhead rows, ONNX Runtime against PyTorch on a cross-attention
    block ([2,256,512] attending to [2,77,768]), and with a GPU the CPU+GPU split rows."""
    quick = device.type == "cpu"
    reps = 20 if quick else 100
    host_us = speed.cpu_call_us or speed.call_us
    block_flops = 2.0 * 2 * (256 * 512 * 512 * 2 + 77 * 768 * 512 * 2) + 4.0 * 2 * 8 * 256 * 77 * 64
    cpu_gflops = speed.gflops if device.type == "cpu" else 50.0
    block_s = block_flops / (cpu_gflops * 1e9 * ATTENTION_EFFICIENCY)
    total = 2 * reps * 10 * 2 * (host_us + 20.0) * 1e-6  # two overhead rows, paired calls
    total += 4 * reps * block_s
    if importlib.util.find_spec("onnxruntime") is not None:  # the ONNX rows run only where it is installed
        total += ONNX_EXPORT_S
    if device.type == "cuda":  # batch 32 on the CPU (calibration, the split and alone) dominates
        total += 16 * block_s * (30 // 5 + 12) + 5.0
    return total
