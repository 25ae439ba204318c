"""How long a bench run will take, said before it starts.

A cost model per section from what was asked (sections, shapes, backends and the AUTO rows per quality level,
repetitions, warm-ups, the per-cell budget, the reference kernels' skip rule, the e2e size; the autotuner's
first calls; FlashAttention-4's compiles) and a probe of this machine's speed taken now (:func:`measure_speed`,
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

from .._memory import scores_refusal
from .._timing import inner_count, repeat, time_runs
from ..attn import autotune, quality, registry
from ..attn.autotune import measuring, switches
from ..attn.limits import check
from ..attn.types import AttentionCall
from .attention import ONCE_FRACTION, REF_SKIP_MS, REFERENCE_SLOWDOWN
from .shapes import Shape
from .verdicts import comfy_target

ATTENTION_EFFICIENCY = 0.5  # on CPU, attention reaches about this share of the matmul probe's throughput
# On accelerators the best kernels reach about the matmul probe's throughput at head_dim 128 (H100: SDPA 597
# TFLOP/s on Flux); this share, less for smaller head dims (sqrt(D / 128)), keeps the estimate on the safe side.
ACCEL_EFFICIENCY = 0.85
# Each backend's time over the fastest one (H100/H200 runs): the reference kernels as the bench's skip rule
# has them, PyTorch's built-in FlashAttention-2 ~2x; the other fast kernels (SDPA, FA3/FA4, SageAttention,
# FP8) within about 20% of each other on average.
SLOWDOWN = {**REFERENCE_SLOWDOWN, "sdpa_flash": 2.0}
TYPICAL_SLOWDOWN = 1.2
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
             e2e_blocks: int, comfyui: bool, speed: Speed, levels: Sequence[str] = quality.LEVELS,
             ref_skip_ms: float = REF_SKIP_MS) -> Dict[str, float]:
    """Seconds per section (0 for a section not asked for) and ``total``, their sum."""
    plan = dict(names=names, include_auto=include_auto, device=device, dtype=dtype, reps=reps, warmup=warmup,
                budget_ms=budget_ms, speed=speed, levels=levels, ref_skip_ms=ref_skip_ms)
    out = {
        "attention": sum(shape_s(s, **plan) for s in shapes) + _compile_s(shapes, names, device, dtype)
        if "attention" in sections else 0.0,
        "overhead": _overhead_s(device, speed, comfyui) if "overhead" in sections else 0.0,
        "e2e": _e2e_s(e2e_size, e2e_blocks, max(reps, 5), comfyui, device, speed) if "e2e" in sections else 0.0,
        "executor": _executor_s(device, speed) if "executor" in sections else 0.0,
    }
    out["total"] = sum(out.values())
    return out


def _efficiency(device: torch.device, head_dim: int) -> float:
    if device.type == "cpu":
        return ATTENTION_EFFICIENCY
    return ACCEL_EFFICIENCY * min(1.0, head_dim / 128) ** 0.5


def _probe_call(shape: Shape, device: torch.device, dtype: torch.dtype) -> AttentionCall:
    """An AttentionCall of the shape's sizes that holds no memory (zero-stride views), for limit checks."""
    one = torch.empty((), device=device, dtype=dtype)
    q = one.expand(shape.b, shape.h, shape.nq, shape.d)
    kv = one.expand(shape.b, shape.h, shape.nk, shape.d)
    return AttentionCall(q, kv, kv, None, shape.d ** -0.5)


def _serves(name: str, shape: Shape, device: torch.device, dtype: torch.dtype) -> bool:
    b = registry.get(name)
    if b.available() is not None or check(b.limits, _probe_call(shape, device, dtype)) is not None:
        return False
    if name == "sdpa_math":  # its own memory refusal, as the bench and the autotuner apply it
        return scores_refusal(shape.b * shape.h * shape.nq * shape.nk, 8, device) is None
    return True


def shape_s(shape: Shape, *, names: List[str], include_auto: bool, device: torch.device, dtype: torch.dtype,
            reps: int, warmup: int, budget_ms: float, speed: Speed, levels: Sequence[str] = quality.LEVELS,
            ref_skip_ms: float = REF_SKIP_MS) -> float:
    """Seconds the attention section spends on one shape: every cell (first call, warm-up, probe, rounds;
    timed once or skipped as the bench decides), the alternated pairs, the autotuner's first calls, the
    reference slice."""
    floor_ms = speed.call_us * 1e-3
    fast = max(shape.flops / (speed.gflops * 1e9 * _efficiency(device, shape.d)) * 1e3, floor_ms)
    inner = inner_count(fast)
    usable = [n for n in names if n in registry.names() and _serves(n, shape, device, dtype)]
    cells = {n: fast * SLOWDOWN.get(n, TYPICAL_SLOWDOWN) for n in usable
             if not (n in REFERENCE_SLOWDOWN and ref_skip_ms > 0 and fast * REFERENCE_SLOWDOWN[n] > ref_skip_ms)}
    cells["comfyui-default"] = fast * TYPICAL_SLOWDOWN
    autos = [lv for lv in quality.LEVELS if lv in levels] if include_auto else []
    for lv in autos:
        cells["auto@" + lv] = fast + floor_ms
    total_ms = 0.0
    for t in cells.values():
        total_ms += 2 * t + (max(0, warmup - 1) * t if t * (warmup - 1) <= budget_ms / 4 else 0.0)
        if t * ONCE_FRACTION <= budget_ms:
            total_ms += min(reps, max(1, int(budget_ms / max(t * inner, 1e-3)))) * inner * t
    if autos:  # each AUTO row with its kernel, the exact choice with the fastest, the speed targets with ComfyUI's
        pairs = len(autos) + 1 + sum(comfy_target(shape.name, lv) is not None for lv in autos)
        pair_ms = 2 * fast * TYPICAL_SLOWDOWN * inner
        total_ms += pairs * max(2, min(max(reps, 6), int(budget_ms / max(pair_ms / 2, 1e-3)))) * pair_ms
        if autotune.enabled_for(device):
            everything = [n for n in registry.names() if _serves(n, shape, device, dtype)]
            total_ms += sum(_autotune_ms(shape, everything, lv, fast, inner, device) for lv in autos)
    return (total_ms + 4 * fast) * 1e-3  # + the float64 reference slice


def _autotune_ms(shape: Shape, servable: List[str], level: str, fast: float, inner: int,
                 device: torch.device) -> float:
    """The autotuner's first call at ``level`` (``autotune.measure``): the candidates this level adds (plus
    the stored winner), checked in order until its budget is spent, probed, then timed in rounds."""
    prev = quality.LEVELS[max(0, quality.LEVELS.index(level) - 1)]
    new = [n for n in servable if quality.admits(level, registry.get(n).precision)
           and (level == "exact" or not quality.admits(prev, registry.get(n).precision))]
    if not new:
        return 0.0
    times = {n: fast * SLOWDOWN.get(n, TYPICAL_SLOWDOWN) for n in measuring.candidate_order(new)}
    if level != "exact":
        times["winner"] = fast
    budget = switches.budget_ms(device)
    elapsed, survivors = 0.0, []
    for n, t in times.items():
        if survivors and elapsed > budget:
            break
        elapsed += t
        survivors.append(n)
    elapsed += sum(times[n] for n in survivors)  # one probe each
    best = min(times[n] for n in survivors)
    timed = [times[n] for n in survivors if times[n] <= measuring.SLOW_FACTOR * best]
    rounds = measuring.MIN_REPS if device.type == "cpu" else int(max(
        measuring.MIN_REPS, min(measuring.MAX_REPS, measuring.CANDIDATE_TARGET_MS / max(max(timed) * inner, 1e-3))))
    for r in range(rounds):
        elapsed += sum(timed) * inner
        if r + 1 >= measuring.MIN_REPS and elapsed > budget:
            break
    return elapsed


def _compile_s(shapes: List[Shape], names: List[str], device: torch.device, dtype: torch.dtype) -> float:
    """First calls that compile (FlashAttention-4 per head dim): the seconds a backend's probe reported
    (``Backend.first_call_s``) for each head dim other than the probe's own 128 that it will serve."""
    total = 0.0
    for n in names:
        if n not in registry.names() or not registry.get(n).first_call_s:
            continue
        dims = {s.d for s in shapes if s.d != 128 and _serves(n, s, device, dtype)}
        total += registry.get(n).first_call_s * len(dims)
    return total


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
