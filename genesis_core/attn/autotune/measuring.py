"""Measuring attention backends on a live call: accuracy against float64, then interleaved timing.

For each candidate (likely-fast kernels first, the reference kernels last):

1. one warm-up run, whose output is checked against a float64 reference computed on a slice (up to 4
   batch·head pairs × 256 query rows, all keys): relative L2 error ‖out − ref‖ / ‖ref‖ and cosine
   similarity are recorded. A candidate that raises, returns the wrong shape or NaN/Inf, is rejected; so is
   an ``exact``-class kernel over its dtype's tolerance, and a lossy one over the loosest quality level
   (whether a lossy kernel fits a stricter level is decided per call by the policy, from these numbers);
2. a probe run; a candidate more than 4× slower than the best probe is timed only that once;
3. rounds that time every remaining candidate in turn (rotated, so drift hits all alike; CUDA events on
   CUDA, ``perf_counter`` + synchronize elsewhere), whose median is its time.

Candidates are tried within a wall-clock budget per signature (see :mod:`.switches`); the reference kernel
``sdpa_math`` is skipped where its score matrix would not fit comfortably in memory. What is timed is
``backend.run(call)``: for quantising backends that includes their quantisation and layout work.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Dict, List, Optional, Sequence

import torch

from ... import progress
from ..._device import synchronize
from ..._log import first_line
from ..._memory import scores_refusal
from ..._timing import inner_count, repeat, rotated, time_runs
from .. import registry
from .ranking import error_verdict, pick
from ..types import AttentionCall
from .switches import budget_ms

# Try likely-fast kernels first so the budget and the slow cut-off spare the reference kernels.
PREFERRED_ORDER = ("sdpa", "sdpa_cudnn", "sdpa_flash", "flash", "fa3", "fa4", "fa2", "sage", "sage2_fp8",
                   "sage2_fp16", "sage2_triton", "xformers", "sdpa_efficient")
REFERENCE_KERNELS = ("pytorch", "sdpa_math")
# On an accelerator, a reference kernel is not run where the fastest warm-up (its accuracy check included) took
# this long: on the H200 (2026-12-01) the chunked pytorch path took 18x SDPA's time on Wan 480p (700 vs 38 ms), so
# it cannot win and would cost seconds of a user's first call. (On CPU, where measuring is opt-in, it can win.)
REFERENCE_SKIP_MS = 5.0
SLOW_FACTOR = 4.0
MIN_REPS, MAX_REPS = 3, 15
CANDIDATE_TARGET_MS = 60.0  # timed work per candidate, before clamping the repetitions
REF_HEADS, REF_ROWS = 4, 256


# ---------------------------------------------------------------- accuracy


def _ref_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _spread(n: int, k: int) -> List[int]:
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def reference_slice(call: AttentionCall, heads: int = REF_HEADS, rows: int = REF_ROWS):
    """(pairs, rows, ref): float64 attention for a few (batch, head) pairs and query rows, [P, R, Dv]."""
    dt = _ref_dtype(call.device)
    pairs = [divmod(i, call.heads) for i in _spread(call.batch * call.heads, heads)]
    row_idx = torch.tensor(_spread(call.q_len, rows), device=call.device)
    group = call.heads // call.kv_heads
    outs = []
    for b, h in pairs:
        hk = h // group
        qs = call.q[b, h].index_select(0, row_idx).to(dt)
        ks, vs = call.k[b, hk].to(dt), call.v[b, hk].to(dt)
        s = (qs @ ks.transpose(0, 1)) * call.scale
        if call.mask is not None:
            m = call.mask[b if call.mask.shape[0] > 1 else 0, h if call.mask.shape[1] > 1 else 0]
            if m.shape[0] > 1:
                m = m.index_select(0, row_idx)
            s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.to(dt)
        p = torch.softmax(s, dim=-1)
        outs.append(torch.nan_to_num(p, nan=0.0) @ vs)  # a fully masked row is 0 (PyTorch SDPA's rule)
    return pairs, row_idx, torch.stack(outs)


def errors(out: torch.Tensor, ref) -> tuple:
    """(relative L2 error, cosine similarity) of ``out`` on the reference slice; (NaN, None) if out is not
    finite there."""
    pairs, row_idx, r = ref
    if out.dim() != 4:
        return float("nan"), None
    o = torch.stack([out[b, h].index_select(0, row_idx) for b, h in pairs]).to(r.dtype)
    if not bool(torch.isfinite(o).all()):
        return float("nan"), None
    o, r = o.reshape(-1), r.reshape(-1)
    denom = float(torch.linalg.vector_norm(r))
    rel = float(torch.linalg.vector_norm(o - r)) / max(denom, 1e-30)
    on = float(torch.linalg.vector_norm(o))
    cos = float(torch.dot(o, r)) / max(on * denom, 1e-30) if denom > 0 and on > 0 else (1.0 if on == denom else 0.0)
    return rel, cos


def relative_error(out: torch.Tensor, ref) -> float:
    """‖out − ref‖ / ‖ref‖ on the reference slice; NaN if out is not finite."""
    return errors(out, ref)[0]


# ---------------------------------------------------------------- measuring


def _memory_guard(name: str, call: AttentionCall) -> Optional[str]:
    """Why the reference kernel that materialises the scores should not run for this call, or None."""
    if name != "sdpa_math":
        return None
    reason = scores_refusal(call.batch * call.heads * call.q_len * call.kv_len, 8, call.device)
    return f"not measured: {reason}" if reason else None


def _device_type(device: torch.device) -> str:
    return device.type


def candidate_order(names: Sequence[str]) -> List[str]:
    """Likely-fast kernels first, other registered ones next, the reference kernels last."""
    first = [n for n in PREFERRED_ORDER if n in names]
    last = [n for n in REFERENCE_KERNELS if n in names]
    middle = [n for n in names if n not in first and n not in last]
    return first + middle + last


def measure(call: AttentionCall, names: Sequence[str], budget: Optional[float] = None) -> dict:
    """Measure ``names`` on ``call`` now and return the entry (nothing is stored).

    Phases: warm-up + accuracy check per candidate (in :func:`candidate_order`), one probe timing
    each, then rounds that time every remaining candidate in turn (interleaved, so drift and a
    busy machine hit all of them alike) until each has enough samples or the budget is spent.
    """
    device = call.device
    budget = budget_ms(device) if budget is None else budget
    order = candidate_order(list(names))
    ms: Dict[str, float] = {}
    errs: Dict[str, float] = {}
    coss: Dict[str, Optional[float]] = {}
    rejected: Dict[str, str] = {}
    notes: Dict[str, str] = {}
    bar = progress.bar(len(order) + 1)
    t_start = time.perf_counter()

    def elapsed() -> float:
        return (time.perf_counter() - t_start) * 1e3

    with torch.no_grad():
        ref_box: list = [None]  # the reference slice, computed once a first candidate has run
        survivors: List[str] = []
        fastest_warmup = float("inf")
        for name in order:
            try:
                if survivors and elapsed() > budget:
                    rejected[name] = f"not measured: tuning budget of {budget:.0f} ms spent"
                elif name in REFERENCE_KERNELS and _device_type(device) != "cpu" and fastest_warmup >= REFERENCE_SKIP_MS:
                    rejected[name] = (f"skipped: a reference kernel on a call whose fastest kernel took "
                                      f"{fastest_warmup:.1f} ms (the reference kernels ran 10-25x slower than "
                                      f"SDPA on every such call measured; it cannot win here)")
                else:
                    t0 = time.perf_counter()
                    if check_one(name, call, errs, coss, rejected, ref_box):
                        survivors.append(name)
                        fastest_warmup = min(fastest_warmup, (time.perf_counter() - t0) * 1e3)
            finally:
                bar.step()
        ref_box.clear()
        _time_survivors(call, survivors, ms, rejected, notes, budget, elapsed)
        bar.step()
    ranking = sorted(ms, key=ms.get)
    entry = {
        "chosen": None,  # filled in below: the choice at quality 'exact' 
        "ranking": ranking,
        "ms": {n: round(ms[n], 5) for n in ranking},
        "rel_err": {n: (None if not math.isfinite(e) else float(f"{e:.4g}")) for n, e in errs.items()},
        "cos": {n: (None if c is None else float(f"{c:.7f}")) for n, c in coss.items()},
        "rejected": rejected,
        "notes": notes,
        "shape": (f"B{call.batch} H{call.heads}/{call.kv_heads} Nq{call.q_len} Nk{call.kv_len} "
                  f"D{call.head_dim} {str(call.dtype).replace('torch.', '')}"),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    entry["chosen"] = pick(entry, ranking)
    return entry


def _time_survivors(call, survivors, ms, rejected, notes, budget, elapsed) -> None:
    device = call.device
    probes: Dict[str, float] = {}
    for name in survivors:
        run = registry.get(name).run
        try:
            probes[name] = time_runs(lambda: run(call), device, 1)[0]
        except Exception as exc:
            rejected[name] = f"failed while timing: {first_line(exc)}"
    if not probes:
        return
    best = min(probes.values())
    timed = [n for n in probes if probes[n] <= SLOW_FACTOR * best]
    for n in probes:
        if n not in timed:
            ms[n] = probes[n]
            notes[n] = f"timed once: over {SLOW_FACTOR:g}x the fastest probe"
    slowest = max(probes[n] for n in timed)
    # Several back-to-back runs per sample when a run is short, so launch gaps and clock granularity stay out.
    inner = inner_count(best)
    rounds = int(max(MIN_REPS, min(MAX_REPS, CANDIDATE_TARGET_MS / max(slowest * inner, 1e-3))))
    if device.type == "cpu":
        rounds = MIN_REPS
    samples: Dict[str, List[float]] = {n: [] for n in timed}
    for r in range(rounds):
        order = list(samples)
        if not order:
            break
        for n in rotated(order, r):  # no fixed position
            if n not in samples:
                continue
            run = registry.get(n).run
            try:
                t = time_runs(repeat(lambda: run(call), inner), device, 1)[0]
                samples[n].append(t / inner)
            except Exception as exc:
                rejected[n] = f"failed while timing: {first_line(exc)}"
                del samples[n]
        if r + 1 >= MIN_REPS and elapsed() > budget:
            break
    for n, vals in samples.items():
        ms[n] = statistics.median(vals)


def check_one(name: str, call: AttentionCall, errs: dict, coss: dict, rejected: dict, ref_box: list) -> bool:
    """Warm-up run of one candidate and its accuracy check; False (with the reason recorded) if rejected."""
    reason = _memory_guard(name, call)
    if reason:
        rejected[name] = reason
        return False
    backend = registry.get(name)
    try:
        out = backend.run(call)  # the warm-up run; its output is the one checked
        synchronize(call.device)
    except Exception as exc:
        rejected[name] = f"failed: {first_line(exc)}"
        return False
    want = (call.batch, call.heads, call.q_len, call.v_head_dim)
    try:
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            rejected[name] = f"wrong output: expected shape {want}, got {got}"
            return False
        if ref_box[0] is None:
            ref_box[0] = reference_slice(call)
        rel, cos = errors(out, ref_box[0])
    except Exception as exc:
        rejected[name] = f"accuracy check failed: {first_line(exc)}"
        return False
    finally:
        del out
    errs[name], coss[name] = rel, cos
    why = error_verdict(backend, call.dtype, rel, cos)
    if why:
        rejected[name] = why
        return False
    return True


def check_output(call: AttentionCall, backend: registry.Backend, level: str) -> Optional[str]:
    """Run ``backend`` once on ``call`` and say why its output does not fit ``level`` (or None).

    The dispatch guard for explicitly chosen lossy backends: the output memory is poisoned first (a kernel
    that leaves its output unwritten returns NaN here), then compared with the float64 reference slice.
    """
    try:
        with torch.no_grad():
            _poison_free_memory(call)
            out = backend.run(call)
            synchronize(call.device)
    except Exception as exc:
        return f"failed its accuracy check: {first_line(exc)}"
    want = (call.batch, call.heads, call.q_len, call.v_head_dim)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
        return f"wrong output: expected shape {want}"
    with torch.no_grad():  # the check is no part of the caller's graph
        rel, cos = errors(out, reference_slice(call))
    return error_verdict(backend, call.dtype, rel, cos, level)


def _poison_free_memory(call: AttentionCall) -> None:
    """Fill an output-sized block with NaN and free it, so an allocator that hands it to the kernel's output
    shows unwritten elements as NaN instead of as stale, plausible numbers."""
    n = call.batch * call.heads * call.q_len * call.v_head_dim
    torch.full((n,), float("nan"), dtype=call.dtype, device=call.device)
