"""``python -m genesis_core bench``: attention backends, Genesis AUTO, dispatch overhead, end to end.

Sections (``--section``, comma-separated; default all):

* ``attention``: for each shape, every backend that can serve it (plus ``auto``, i.e.
  ``genesis_core.attention`` with AUTO) — median ms, TFLOP/s (4·B·H·Nq·Nk·D / time), relative error
  against a float64 reference on a slice, and whether that error is within the backend's tolerance.
  Backends are warmed up, probed, then timed in interleaved rounds (CUDA events on CUDA), so drift hits
  all alike; a cell whose runs are slow gets fewer repetitions (``--budget-ms``), and PyTorch's
  reference kernel ``sdpa_math`` is skipped where its score matrix would not fit in memory.
  The summary judges AUTO's choice (``choice_ok``, ``choice_verdict``): where the chosen backend is not
  the fastest row, the two are timed again in strict alternation and, where torch.profiler sees device
  kernels, compared kernel by kernel (two backends launching the same kernel differ only by noise).
* ``overhead``: Genesis ``attention()`` against calling the chosen kernel directly, CPU-side µs per
  call on small tensors ([1, 1, 8, 64]) for an already-seen signature (best of 15 interleaved rounds).
* ``e2e``: a stack of Flux-sized transformer blocks (LayerNorm → QKV → RMSNorm(q, k) → attention →
  projection → MLP) with Genesis AUTO against plain ``F.scaled_dot_product_attention`` — what ComfyUI's
  default attention calls on current PyTorch — timed alternately in one run.
* ``executor``: the executor's own rows (``genesis_core.compute.bench``) when that module exists.

Defaults follow the device: the diffusion shape set in bf16 on CUDA, small shapes in float32 on CPU.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._device import synchronize
from ._log import first_line
from .attn import autotune, dispatch, registry
from .attn.types import AttentionCall


@dataclass(frozen=True)
class Shape:
    name: str
    b: int
    h: int
    nq: int
    nk: int
    d: int

    @property
    def flops(self) -> float:
        return 4.0 * self.b * self.h * self.nq * self.nk * self.d

    def label(self) -> str:
        return f"{self.name} [B{self.b} H{self.h} Nq{self.nq} Nk{self.nk} D{self.d}]"


SHAPE_SETS: Dict[str, List[Shape]] = {
    # SD1.5 at 512x512 (batch 2: cond + uncond): 64x64 latent level (320 ch, head_dim 40) and 16x16 level (1280 ch, head_dim 160)
    "sd15": [
        Shape("sd15-self-d40", 2, 8, 4096, 4096, 40),
        Shape("sd15-cross-d40", 2, 8, 4096, 77, 40),
        Shape("sd15-self-d160", 2, 8, 256, 256, 160),
        Shape("sd15-cross-d160", 2, 8, 256, 77, 160),
    ],
    # SDXL at 1024x1024: 64x64 level (640 ch = 10 heads x 64), self and 77-token cross attention
    "sdxl": [
        Shape("sdxl-self-4k", 2, 10, 4096, 4096, 64),
        Shape("sdxl-cross-77", 2, 10, 4096, 77, 64),
    ],
    # Flux at 1024x1024: 4096 image + 512 text tokens, 24 heads x 128
    "flux": [Shape("flux-4608", 1, 24, 4608, 4608, 128)],
    # Wan 2.1 14B, 480x832, 81 frames: 21 x 30 x 52 = 32760 tokens, 40 heads x 128
    "wan": [Shape("wan-32k", 1, 40, 32760, 32760, 128)],
    # CPU-sized
    "small": [
        Shape("small-self", 1, 4, 256, 256, 64),
        Shape("small-cross", 1, 4, 256, 77, 40),
    ],
    "tiny": [Shape("tiny", 1, 2, 32, 24, 16)],
}
SHAPE_SETS["diffusion"] = SHAPE_SETS["sd15"] + SHAPE_SETS["sdxl"] + SHAPE_SETS["flux"] + SHAPE_SETS["wan"]

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "half": torch.float16, "fp32": torch.float32, "float32": torch.float32}
SECTIONS = ("attention", "overhead", "e2e", "executor")
OVERHEAD_TARGET_US = 5.0
CHOICE_TARGET = 1.03  # AUTO's choice: within 3% of the fastest correct backend
KERNEL_NAME_CHARS = 160  # kernel names (C++ templates run long) are stored cut to this


# ---------------------------------------------------------------- arguments


def parse_shapes(spec: str) -> List[Shape]:
    """``sd15,flux`` (named sets) and/or ``B,H,Nq,Nk,D`` groups separated by ``;`` or spaces."""
    out: List[Shape] = []
    tokens = [t for part in spec.replace(";", " ").split() for t in ([part] if part.count(",") == 4 and
              all(x.strip().isdigit() for x in part.split(",")) else part.split(","))]
    for tok in tokens:
        tok = tok.strip()
        if not tok:
            continue
        if tok.lower() in SHAPE_SETS:
            out.extend(SHAPE_SETS[tok.lower()])
            continue
        if "," in tok:
            nums = tok.split(",")
            if len(nums) == 5 and all(n.strip().isdigit() and int(n) > 0 for n in nums):
                b, h, nq, nk, d = (int(n) for n in nums)
                out.append(Shape(f"custom-{b}x{h}x{nq}x{nk}x{d}", b, h, nq, nk, d))
                continue
        raise ValueError(
            f"--shapes entry {tok!r} is neither a named set ({', '.join(sorted(SHAPE_SETS))}) "
            f"nor five positive integers B,H,Nq,Nk,D"
        )
    if not out:
        raise ValueError("--shapes named no shape")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m genesis_core bench",
                                description="Benchmark Genesis attention backends, AUTO, dispatch overhead and end to end.")
    p.add_argument("--shapes", default=None,
                   help="named sets (sd15, sdxl, flux, wan, diffusion, small, tiny) and/or custom 'B,H,Nq,Nk,D' "
                        "separated by ';' or spaces (default: diffusion on CUDA, small on CPU)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--backends", default=None,
                   help="comma-separated backend names (default: every registered one); the 'auto' row is always added unless --no-auto")
    p.add_argument("--no-auto", action="store_true", help="leave out the Genesis AUTO row")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per cell (default 10 on CUDA, 5 on CPU)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up runs per cell (default 2)")
    p.add_argument("--budget-ms", type=float, default=3000.0,
                   help="time budget per cell: slow cells get fewer repetitions (default 3000)")
    p.add_argument("--section", default=",".join(SECTIONS), help=f"comma-separated sections: {', '.join(SECTIONS)}")
    p.add_argument("--e2e-size", default=None, choices=("flux", "small"), help="default flux on CUDA, small on CPU")
    p.add_argument("--e2e-blocks", type=int, default=None, help="transformer blocks in the e2e stack (default 4 / 2)")
    p.add_argument("--comfyui", default=None, metavar="PATH",
                   help="ComfyUI checkout for the e2e section's ComfyUI Flux model (default: $COMFYUI_PATH; skipped without)")
    p.add_argument("--json", default=None, metavar="PATH", help="write every row and the environment as JSON")
    p.add_argument("--plot", default=None, metavar="PNG", help="bar chart of TFLOP/s per shape (needs matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--seed", type=int, default=0)
    return p


# ---------------------------------------------------------------- helpers


def _progress(total: int, enabled: bool, desc: str):
    if enabled:
        try:
            from tqdm import tqdm

            return tqdm(total=total, desc=desc, leave=False, file=sys.stderr, disable=None)  # None: off when not a TTY
        except ImportError:
            pass

    class _Null:
        def update(self, n=1):
            pass

        def set_postfix_str(self, s):
            pass

        def close(self):
            pass

    return _Null()


def environment(device: torch.device) -> dict:
    from . import __version__

    env = {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "genesis": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        env["cudnn"] = torch.backends.cudnn.version()
    env["backends"] = {r["name"]: {"available": r["available"], "reason": r["reason"], "version": r["version"],
                                   "kernel": r["kernel"]} for r in registry.report()}
    env["autotune_mode"] = autotune.mode()
    return env


def _randn(shape, device, dtype, gen) -> torch.Tensor:
    return torch.randn(shape, generator=gen, device="cpu", dtype=torch.float32).to(device=device, dtype=dtype)


# ---------------------------------------------------------------- attention section


def bench_attention(shapes: List[Shape], names: List[str], include_auto: bool, device: torch.device,
                    dtype: torch.dtype, reps: int, warmup: int, budget_ms: float, progress: bool,
                    seed: int) -> tuple:
    rows: List[dict] = []
    summary: List[dict] = []
    bar = _progress(len(shapes) * (len(names) + int(include_auto)), progress, "attention")
    gen = torch.Generator().manual_seed(seed)
    dt = str(dtype).replace("torch.", "")
    for shape in shapes:
        q = _randn((shape.b, shape.h, shape.nq, shape.d), device, dtype, gen)
        k = _randn((shape.b, shape.h, shape.nk, shape.d), device, dtype, gen)
        v = _randn((shape.b, shape.h, shape.nk, shape.d), device, dtype, gen)
        call = AttentionCall(q, k, v, None, shape.d ** -0.5)
        ref = autotune.reference_slice(call)
        cells: Dict[str, dict] = {}
        fns: Dict[str, Callable[[], torch.Tensor]] = {}
        for name in names + (["auto"] if include_auto else []):
            bar.set_postfix_str(f"{shape.name} {name}")
            row = {"shape": shape.name, "B": shape.b, "H": shape.h, "Nq": shape.nq, "Nk": shape.nk, "D": shape.d,
                   "dtype": dt, "device": str(device), "backend": name, "ms": None, "tflops": None,
                   "rel_err": None, "tolerance": None, "correct": None, "status": "ok", "note": ""}
            cells[name] = row
            if name == "auto":
                fn = lambda: dispatch.attention(q, k, v)  # noqa: E731
                backend = None
            else:
                backend = registry.get(name)
                reason = backend.reason_for(call) or autotune._memory_guard(name, call)
                if reason:
                    row["status"] = "skipped"
                    row["note"] = reason
                    bar.update()
                    continue
                fn = (lambda run: (lambda: run(call)))(backend.run)
            try:
                with torch.no_grad():
                    out = fn()  # the first AUTO call measures (autotuner); kept out of the timings
                    synchronize(device)
                    if name == "auto":
                        row["note"] = f"chose {dispatch.last_backend()}"
                        row["chosen"] = dispatch.last_backend()
                        backend = registry.get(row["chosen"])
                    err = autotune.relative_error(out, ref)
                    del out
                    for _ in range(max(0, warmup - 1)):
                        fn()
                    probe = autotune.time_runs(fn, device, 1)[0]
            except Exception as exc:
                row["status"] = "failed"
                row["note"] = first_line(exc)
                bar.update()
                continue
            tol = autotune.tolerance(backend, dtype)
            row["rel_err"] = None if not math.isfinite(err) else err
            row["tolerance"] = tol
            row["correct"] = bool(math.isfinite(err) and err <= tol)
            row["probe_ms"] = probe
            fns[name] = fn
            bar.update()
        # Interleaved rounds: every live cell once per round.
        live = dict(fns)
        # Short calls: several back-to-back runs per sample, so clock and launch granularity stay out.
        # One inner count for every cell of a shape, so launch and event overheads are amortised alike
        # (per-cell counts made the AUTO row look 30-80% slower than its own kernel on short calls).
        fastest = min((cells[n]["probe_ms"] for n in live), default=1.0)
        inner = {n: int(max(1, min(50, 0.5 / max(fastest, 1e-4)))) for n in live}
        limit = {n: max(1, min(reps, int(budget_ms / max(cells[n]["probe_ms"] * inner[n], 1e-3)))) for n in live}
        samples: Dict[str, List[float]] = {n: [] for n in live}
        with torch.no_grad():
            for r in range(reps):
                # Rotate the order every round: a cell right after one that thrashes L2 or changes clocks
                # (the chunked math path) is otherwise always the one that pays for it.
                items = list(live.items())
                items = items[r % len(items):] + items[:r % len(items)] if items else items
                for n, fn in items:
                    if r >= limit[n]:
                        continue
                    try:
                        t = autotune.time_runs(autotune.repeat(fn, inner[n]), device, 1)[0]
                        samples[n].append(t / inner[n])
                    except Exception as exc:
                        cells[n]["status"] = "failed"
                        cells[n]["note"] = first_line(exc)
                        del live[n]
        for n, vals in samples.items():
            if n not in live or not vals:
                continue
            ms = statistics.median(vals)
            cells[n]["ms"] = ms
            cells[n]["tflops"] = shape.flops / (ms * 1e-3) / 1e12
            cells[n]["reps"] = len(vals)
            if len(vals) < reps:
                cells[n]["note"] = (cells[n]["note"] + "; " if cells[n]["note"] else "") + f"{len(vals)} rep(s): budget"
        _pair_auto_with_its_kernel(cells, fns, live, inner, reps, device, shape.flops)
        summ = _summarise(shape, cells)
        summ.update(_pair_choice_with_fastest(summ, cells, fns, live, inner, reps, budget_ms, device))
        summ["choice_ok"], summ["choice_verdict"] = choice_verdict(summ)
        for row in cells.values():
            row.pop("probe_ms", None)
            rows.append(row)
        summary.append(summ)
    bar.close()
    return rows, summary


def _alternate(first: Callable[[], object], second: Callable[[], object], n_inner: int, rounds: int,
               device: torch.device) -> tuple:
    """Median ms per call of ``first`` and of ``second``, timed in strict alternation (``n_inner`` calls per
    sample, who goes first swapping every round), so drift and clocks hit both alike."""
    pair = (first, second)
    samples: List[List[float]] = [[], []]
    with torch.no_grad():
        for r in range(rounds):
            for i in ((0, 1) if r % 2 == 0 else (1, 0)):
                samples[i].append(autotune.time_runs(autotune.repeat(pair[i], n_inner), device, 1)[0] / n_inner)
    return statistics.median(samples[0]), statistics.median(samples[1])


def _pair_auto_with_its_kernel(cells: Dict[str, dict], fns: Dict[str, Callable[[], object]], live: Dict[str, object],
                               inner: Dict[str, int], reps: int, device: torch.device, flops: float) -> None:
    """Time AUTO and the kernel it chose in strict alternation (same inner count, rotating who goes
    first), so the AUTO row's cost over its kernel is Genesis' own and not the neighbours' (on the H100,
    reading AUTO off the big interleaved round put it 20-70% over its kernel; alternated, the same call
    was within 1% on Flux)."""
    auto = cells.get("auto")
    chosen = auto.get("chosen") if auto else None
    if "auto" not in live or chosen not in live:
        return
    a, c = _alternate(fns["auto"], fns[chosen], inner["auto"], max(reps, 6), device)
    auto["ms_interleaved"] = auto["ms"]
    auto["ms"] = a
    auto["tflops"] = flops / (a * 1e-3) / 1e12
    auto["paired_kernel_ms"] = c
    auto["note"] = (auto["note"] + "; " if auto["note"] else "") + f"timed alternately with {chosen}: {c:.3f} ms"


def _pair_choice_with_fastest(summ: dict, cells: Dict[str, dict], fns: Dict[str, Callable[[], object]],
                              live: Dict[str, object], inner: Dict[str, int], reps: int, budget_ms: float,
                              device: torch.device) -> dict:
    """Where AUTO chose another backend than the fastest correct row and both rows were timed: time the
    two in strict alternation (same inner count, rotating who goes first, ``max(reps, 6)`` rounds, fewer
    where either call would spend more than ``budget_ms``, never fewer than 2) and compare the device
    kernels each launches. Returns the summary keys ``choice_vs_fastest_paired`` (median chosen / median
    fastest), ``choice_paired_rounds`` and those of :func:`_compare_kernels`; {} where there is nothing
    to pair. (On the H100, ``sdpa`` and ``sdpa_cudnn`` ran the same cuDNN kernel on Wan yet swapped
    places by 8-13% between runs of the interleaved rows.)"""
    chosen, best = summ.get("auto_backend"), summ.get("fastest_correct")
    if not chosen or not best or chosen == best or chosen not in live or best not in live:
        return {}
    if cells[chosen]["ms"] is None or cells[best]["ms"] is None:
        return {}
    n_inner = inner[chosen]
    slowest = max(cells[chosen]["ms"], cells[best]["ms"]) * n_inner
    rounds = max(2, min(max(reps, 6), int(budget_ms / max(slowest, 1e-3))))
    out: dict = {}
    try:
        ms_chosen, ms_best = _alternate(fns[chosen], fns[best], n_inner, rounds, device)
        out["choice_vs_fastest_paired"] = ms_chosen / ms_best
        out["choice_paired_rounds"] = rounds
    except Exception as exc:
        out["choice_paired_error"] = first_line(exc)
    out.update(_compare_kernels(fns[chosen], fns[best], device))
    return out


_PROFILER_ACTIVITY = {"cuda": "CUDA", "xpu": "XPU"}  # device type -> ProfilerActivity / DeviceType name


def device_kernels(fn: Callable[[], object], device: torch.device) -> Optional[List[str]]:
    """Sorted names of the device kernels (and memsets/copies) one call of ``fn`` launches, as
    torch.profiler records them: ProfilerActivity.CUDA on CUDA (and ROCm), XPU on Intel GPUs. None on
    devices whose kernels the profiler does not record (CPU, MPS): there is nothing to compare there.
    Profiler errors propagate; :func:`_compare_kernels` turns them into a reason."""
    kind = _PROFILER_ACTIVITY.get(device.type)
    activity = getattr(torch.profiler.ProfilerActivity, kind, None) if kind else None
    if activity is None:
        return None
    with torch.no_grad(), torch.profiler.profile(activities=[activity]) as prof:
        fn()
        synchronize(device)
    return sorted({e.name for e in prof.events() if getattr(e.device_type, "name", None) == kind})


def _compare_kernels(chosen_fn: Callable[[], object], fastest_fn: Callable[[], object], device: torch.device) -> dict:
    """``chosen_kernels``, ``fastest_kernels`` (sorted, names cut to KERNEL_NAME_CHARS) and ``same_kernel``:
    True only when both sets are non-empty and equal (compared on the full names), False when they
    differ, None where there are no device kernels to compare (CPU) or the probe failed; a failure, or
    a device where the profiler saw no kernel, leaves its reason in ``kernel_probe_error``. Never raises."""
    out: dict = {"chosen_kernels": None, "fastest_kernels": None, "same_kernel": None}
    try:
        chosen, fastest = device_kernels(chosen_fn, device), device_kernels(fastest_fn, device)
    except Exception as exc:
        out["kernel_probe_error"] = first_line(exc)
        return out
    if chosen is None or fastest is None:
        return out
    out["chosen_kernels"] = sorted({n[:KERNEL_NAME_CHARS] for n in chosen})
    out["fastest_kernels"] = sorted({n[:KERNEL_NAME_CHARS] for n in fastest})
    if chosen and fastest:
        out["same_kernel"] = chosen == fastest
    else:
        out["kernel_probe_error"] = f"torch.profiler recorded no {device.type} kernel for " + \
            " or ".join(w for w, k in (("the chosen backend", chosen), ("the fastest backend", fastest)) if not k)
    return out


def choice_verdict(summ: dict) -> tuple:
    """(choice_ok, choice_verdict) for one shape's summary. OK when the chosen kernel's own row is within
    CHOICE_TARGET of the fastest correct row, or else when the two timed alternately are (the rows of two
    launches of one device kernel can differ by run-to-run noise: the alternated timing settles it, and the
    kernel names say why). Only when no alternated timing exists does "the same device kernel" decide alone;
    a chosen backend that is slower timed alternately fails even with the same kernel (its host side costs).
    None (no verdict) where no choice was timed: no AUTO row, AUTO failed, or the chosen backend's own row
    was not measured."""
    ratio, best, chosen = summ.get("choice_vs_fastest"), summ.get("fastest_correct"), summ.get("auto_backend")
    paired, same = summ.get("choice_vs_fastest_paired"), summ.get("same_kernel")
    pct = lambda x: f"{(x - 1) * 100:+.1f}%"  # noqa: E731
    kernels = ", ".join(summ.get("chosen_kernels") or [])
    if ratio is None:
        why = "no AUTO row" if chosen is None else f"the chosen backend {chosen}'s own row was not timed"
        return None, f"no timed choice ({why})"
    if ratio <= CHOICE_TARGET:
        return True, ("chose the fastest correct backend" if chosen == best
                      else f"{chosen} within {pct(CHOICE_TARGET)} of the fastest row {best} ({pct(ratio)})")
    if paired is not None and paired <= CHOICE_TARGET:
        return True, (f"rows {pct(ratio)}, but timed alternately with {best} {pct(paired)}: within "
                      f"{pct(CHOICE_TARGET)}" + (f"; same device kernel as the fastest row: {kernels}" if same else ""))
    if paired is None and same is True:
        return True, f"same kernel as the fastest row: {kernels}; rows differ by timing noise ({pct(ratio)})"
    parts = [f"{chosen} {pct(ratio)} slower than {best} in the rows"]
    if paired is not None:
        parts.append(f"timed alternately {pct(paired)}")
    if same is True:
        parts.append(f"same device kernel ({kernels}), so the difference is host-side")
    elif same is False:
        parts.append("different kernels")
    for key in ("kernel_probe_error", "choice_paired_error"):
        if summ.get(key):
            parts.append(f"{key}: {summ[key]}")
    return False, "; ".join(parts)


def _summarise(shape: Shape, cells: Dict[str, dict]) -> dict:
    good = {n: c for n, c in cells.items() if n != "auto" and c["ms"] is not None and c["correct"]}
    best = min(good, key=lambda n: good[n]["ms"]) if good else None
    auto = cells.get("auto")
    out = {"shape": shape.name, "fastest_correct": best, "fastest_ms": good[best]["ms"] if best else None,
           "auto_backend": auto.get("chosen") if auto else None, "auto_ms": auto["ms"] if auto else None,
           "auto_correct": auto["correct"] if auto else None,
           "rejected": {n: f"rel err {c['rel_err']:.3g} > {c['tolerance']:.3g}" if c["rel_err"] is not None
                        else "non-finite output" for n, c in cells.items()
                        if c["correct"] is False and n != "auto"}}
    if best and auto and auto["ms"]:
        chosen = cells.get(out["auto_backend"] or "")
        if chosen is not None and chosen["ms"]:
            # the choice's quality alone: the chosen kernel's own row (no dispatch) against the fastest
            out["choice_vs_fastest"] = chosen["ms"] / good[best]["ms"]
        if auto.get("paired_kernel_ms"):
            # Genesis' own cost over the kernel it chose (timed alternately), times the choice's quality
            out["auto_over_kernel"] = auto["ms"] / auto["paired_kernel_ms"]
            out["auto_vs_fastest"] = out["auto_over_kernel"] * out.get("choice_vs_fastest", 1.0)
        else:
            out["auto_vs_fastest"] = auto["ms"] / good[best]["ms"]
    return out


# ---------------------------------------------------------------- overhead section


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


# ---------------------------------------------------------------- end-to-end section


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
                samples[name].append(autotune.time_runs(lambda: stack(x), device, 1)[0])
    base_name, gen_name = list(variants)
    base = outs[base_name]
    diff = float(torch.linalg.vector_norm(outs[gen_name] - base) / torch.linalg.vector_norm(base))
    base_ms = statistics.median(samples[base_name])
    rows = []
    for name in variants:
        ms = statistics.median(samples[name])
        rows.append({"variant": name, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
                     "size": f"{blocks} blocks, B{b} N{n} H{heads} D{hd} (hidden {heads * hd})", "ms": ms,
                     "vs_baseline": ms / base_ms, "rel_diff_vs_baseline": 0.0 if name == base_name else diff,
                     "attention_backend": None if name == base_name else dispatch.last_backend()})
    return rows


def _import_comfyui(path: str, device: torch.device):
    """Import ComfyUI's model code from a checkout (``COMFYUI_PATH``); ComfyUI's own arguments stay default
    (``--cpu`` added on a machine without CUDA). Already-imported ComfyUI (inside ComfyUI) is used as is."""
    import os

    if "comfy.ldm.flux.model" not in sys.modules:
        if not os.path.isfile(os.path.join(path, "comfy", "ldm", "flux", "model.py")):
            raise FileNotFoundError(f"COMFYUI_PATH {path!r} holds no comfy/ldm/flux/model.py")
        if path not in sys.path:
            sys.path.insert(0, path)
        saved = sys.argv
        sys.argv = [saved[0]] + ([] if device.type == "cuda" else ["--cpu"])
        try:
            import comfy.options

            comfy.options.enable_args_parsing()  # ComfyUI parses sys.argv (set above), not ours
            import comfy.ldm.flux.model  # noqa: F401
        finally:
            sys.argv = saved
    import comfy.ldm.modules.attention as comfy_attention
    import comfy.ops
    from comfy.ldm.flux.model import Flux

    return Flux, comfy.ops, comfy_attention


def bench_e2e_comfyui(path: str, device: torch.device, dtype: torch.dtype, size: str, double: int, single: int,
                      reps: int, seed: int) -> List[dict]:
    """ComfyUI's own Flux model (random weights, ``double`` + ``single`` blocks): ComfyUI's default attention
    against Genesis AUTO through ``transformer_options["optimized_attention_override"]``, alternately."""
    from .interop.comfy_adapter import GenesisAttentionOverride

    Flux, ops, comfy_attention = _import_comfyui(path, device)
    if size == "flux":  # Flux.1 dims; 1024x1024 image -> 128x128 latent -> 4096 tokens, + 512 text tokens
        hidden, heads, lat, txt = 3072, 24, 128, 512
    else:
        hidden, heads, lat, txt = 256, 2, 32, 64
    torch.manual_seed(seed)
    model = Flux(operations=ops.disable_weight_init, dtype=dtype, device=device, in_channels=16, out_channels=16,
                 vec_in_dim=768, context_in_dim=4096, hidden_size=hidden, mlp_ratio=4.0, num_heads=heads,
                 depth=double, depth_single_blocks=single, axes_dim=[16, 56, 56], theta=10000, patch_size=2,
                 qkv_bias=True, guidance_embed=True).eval()
    with torch.no_grad():
        for p in model.parameters():  # disable_weight_init leaves weights uninitialised
            p.normal_(0.0, 0.02)
    x = torch.randn(1, 16, lat, lat, device=device, dtype=dtype)
    ctx = torch.randn(1, txt, 4096, device=device, dtype=dtype)
    y = torch.randn(1, 768, device=device, dtype=dtype)
    ts = torch.tensor([0.5], device=device, dtype=dtype)
    guidance = torch.tensor([3.5], device=device, dtype=dtype)
    override = GenesisAttentionOverride("auto")
    default_name = getattr(comfy_attention.optimized_attention, "__name__", str(comfy_attention.optimized_attention))
    variants = {
        f"ComfyUI default attention ({default_name})": {},
        "Genesis AUTO (optimized_attention_override)": {"optimized_attention_override": override},
    }
    outs, samples = {}, {n: [] for n in variants}
    with torch.no_grad():
        for name, opts in variants.items():
            outs[name] = model(x, ts, ctx, y=y, guidance=guidance, transformer_options=dict(opts)).float()
            model(x, ts, ctx, y=y, guidance=guidance, transformer_options=dict(opts))
        for _ in range(reps):
            for name, opts in variants.items():
                samples[name].append(autotune.time_runs(
                    lambda: model(x, ts, ctx, y=y, guidance=guidance, transformer_options=dict(opts)), device, 1)[0])
    base_name, gen_name = list(variants)
    diff = float(torch.linalg.vector_norm(outs[gen_name] - outs[base_name]) / torch.linalg.vector_norm(outs[base_name]))
    base_ms = statistics.median(samples[base_name])
    n_tokens = (lat // 2) ** 2 + txt
    rows = []
    for name in variants:
        ms = statistics.median(samples[name])
        rows.append({"variant": name, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
                     "size": f"ComfyUI Flux, {double} double + {single} single blocks, {n_tokens} tokens, "
                             f"hidden {hidden} ({heads} heads x {hidden // heads})",
                     "ms": ms, "vs_baseline": ms / base_ms, "rel_diff_vs_baseline": 0.0 if name == base_name else diff,
                     "attention_backend": None if name == base_name else dispatch.last_backend(),
                     "genesis_calls": None if name == base_name else override.calls})
    return rows


# ---------------------------------------------------------------- output


def _fmt(x, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def print_attention(rows: List[dict], summary: List[dict]) -> None:
    print(f"\n{'shape':<18} {'backend':<15} {'ms':>9} {'TFLOP/s':>8} {'rel err':>9}  status")
    last = None
    for r in rows:
        if r["shape"] != last and last is not None:
            print()
        last = r["shape"]
        status = r["status"] if r["status"] != "ok" else ("ok" if r["correct"] else "INACCURATE")
        note = f"  ({r['note']})" if r["note"] else ""
        print(f"{r['shape']:<18} {r['backend']:<15} {_fmt(r['ms'], '9.3f'):>9} {_fmt(r['tflops'], '8.3g' if (r['tflops'] or 0) < 100 else '8.0f'):>8} "
              f"{_fmt(r['rel_err'], '9.2e'):>9}  {status}{note}")
    print("\nAUTO against the fastest correct backend measured in this run:")
    for s in summary:
        ratio = s.get("auto_vs_fastest")
        print(f"  {s['shape']:<18} fastest {s['fastest_correct'] or '-':<15} {_fmt(s['fastest_ms'], '.3f')} ms; "
              f"auto -> {s['auto_backend'] or '-'} {_fmt(s['auto_ms'], '.3f')} ms"
              + (f" ({(ratio - 1) * 100:+.1f}%" if ratio else "")
              + (f"; chosen kernel alone {(s['choice_vs_fastest'] - 1) * 100:+.1f}%" if s.get("choice_vs_fastest") else "")
              + (f"; Genesis over its kernel {(s['auto_over_kernel'] - 1) * 100:+.1f}%" if s.get("auto_over_kernel") else "")
              + (")" if ratio else "")
              + ("" if s["auto_correct"] in (None, True) else "  AUTO OUTPUT INACCURATE"))
        if s.get("choice_verdict"):
            ok = {True: "OK", False: "NOT OK", None: "no verdict"}[s.get("choice_ok")]
            print(f"  {'':<18} choice {ok}: {s['choice_verdict']}")


def print_overhead(rows: List[dict]) -> None:
    print(f"\nDispatch overhead (small tensors [1,1,8,64], already-seen signature; target <= {OVERHEAD_TARGET_US:g} us):")
    for r in rows:
        print(f"  {r['device']:<6} {r['call']:<58} {r['us_per_call']:8.2f} us  ({r['overhead_us']:+.2f})")


def print_e2e(rows: List[dict]) -> None:
    if not rows:
        return
    print(f"\nEnd to end: {rows[0]['size']}, {rows[0]['dtype']} on {rows[0]['device']}")
    for r in rows:
        extra = f"  attention: {r['attention_backend']}, rel diff {r['rel_diff_vs_baseline']:.2e}" if r["attention_backend"] else ""
        print(f"  {r['variant']:<68} {r['ms']:9.3f} ms  x{r['vs_baseline']:.3f}{extra}")


def write_plot(path: str, rows: List[dict], title: str) -> Optional[str]:
    """Grouped bars: TFLOP/s per backend per shape; hatched bars are over tolerance. Returns an error or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib); --plot skipped"
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows if r["tflops"] is not None))
    if not shapes or not backends:
        return "nothing measured to plot"
    width = 0.8 / len(backends)
    fig, ax = plt.subplots(figsize=(min(22, max(8, 0.25 * len(shapes) * len(backends) + 2)), 5))
    cmap = plt.get_cmap("tab10" if len(backends) <= 10 else "tab20")
    for i, bname in enumerate(backends):
        for j, s in enumerate(shapes):
            r = next((r for r in rows if r["shape"] == s and r["backend"] == bname and r["tflops"] is not None), None)
            if r is None:
                continue
            ax.bar(j + (i - (len(backends) - 1) / 2) * width, r["tflops"], width, color=cmap(i % 20),
                   hatch="//" if not r["correct"] else None, edgecolor="black" if bname == "auto" else None,
                   label=bname)
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    ax.legend(uniq.values(), uniq.keys(), fontsize=8, ncol=2)
    ax.set_xticks(range(len(shapes)))
    ax.set_xticklabels(shapes, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("TFLOP/s (4·B·H·Nq·Nk·D / time)")
    ax.set_title(title + "   (hatched: over tolerance)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# ---------------------------------------------------------------- main


def main(argv: Optional[List[str]] = None) -> int:
    """Run the benchmark; returns a process exit code (0 ok, 2 bad arguments, 1 a section failed)."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        device = torch.device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda asked for, but torch.cuda.is_available() is False")
        on_cpu = device.type == "cpu"
        shapes = parse_shapes(args.shapes or ("small" if on_cpu else "diffusion"))
        dtype = DTYPES[args.dtype] if args.dtype else (torch.float32 if on_cpu else torch.bfloat16)
        sections = [s.strip() for s in args.section.split(",") if s.strip()]
        bad = [s for s in sections if s not in SECTIONS]
        if bad:
            raise ValueError(f"--section {', '.join(bad)} unknown; valid: {', '.join(SECTIONS)}")
        known = registry.names()
        names = [dispatch.backend_name(n) for n in args.backends.split(",")] if args.backends else list(known)
        include_auto = not args.no_auto
        names = [n for n in dict.fromkeys(names) if n != "auto"]
        reps = args.reps or (5 if on_cpu else 10)
        if reps < 1 or args.warmup < 1:
            raise ValueError(f"--reps and --warmup must be >= 1; got {reps} and {args.warmup}")
    except ValueError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2

    env = environment(device)
    result: dict = {"environment": env, "settings": {"dtype": str(dtype).replace("torch.", ""), "reps": reps,
                                                      "warmup": args.warmup, "budget_ms": args.budget_ms,
                                                      "sections": sections,
                                                      "shapes": [asdict(s) for s in shapes]}}
    print(f"Genesis bench: {env['device_name']} ({device}), torch {env['torch']}"
          + (f", CUDA {env['cuda']}, cuDNN {env.get('cudnn')}" if device.type == "cuda" else "")
          + f", {str(dtype).replace('torch.', '')}, autotune {env['autotune_mode']}, {env['date_utc']}")
    status = 0
    progress = not args.no_progress
    if "attention" in sections:
        rows, summary = bench_attention(shapes, names, include_auto, device, dtype, reps, args.warmup,
                                        args.budget_ms, progress, args.seed)
        result["attention"], result["summary"] = rows, summary
        print_attention(rows, summary)
        result["autotune"] = autotune.timings()
        if args.plot:
            err = write_plot(args.plot, rows, f"{env['device_name']}, torch {env['torch']}, {str(dtype).replace('torch.', '')}")
            print(f"\nplot: {err}" if err else f"\nplot written to {args.plot}")
    if "overhead" in sections:
        devs = [torch.device("cpu")] + ([device] if device.type == "cuda" else [])
        result["overhead"] = bench_overhead(devs)
        print_overhead(result["overhead"])
    if "e2e" in sections:
        size = args.e2e_size or ("small" if on_cpu else "flux")
        blocks = args.e2e_blocks or (2 if size == "small" else 4)
        try:
            result["e2e"] = bench_e2e(device, dtype, size, blocks, max(reps, 5), args.seed)
            print_e2e(result["e2e"])
        except Exception as exc:
            print(f"\ne2e failed: {first_line(exc)}", file=sys.stderr)
            result["e2e_error"] = first_line(exc)
            status = 1
        comfy_path = args.comfyui or os.environ.get("COMFYUI_PATH")
        if comfy_path:
            double, single = (1, 2) if size == "small" else (2, 4)
            try:
                result["e2e_comfyui"] = bench_e2e_comfyui(comfy_path, device, dtype, size, double, single,
                                                          max(reps, 5), args.seed)
                print_e2e(result["e2e_comfyui"])
            except Exception as exc:
                print(f"\ne2e with ComfyUI's Flux failed: {first_line(exc)}", file=sys.stderr)
                result["e2e_comfyui_error"] = first_line(exc)
                status = 1
    if "executor" in sections:
        try:
            from .compute import bench as compute_bench
        except ImportError as exc:
            print(f"\nexecutor section skipped: {exc}")
        else:
            try:
                print("\nExecutor:")
                result["executor"] = compute_bench.run_executor_bench(quick=on_cpu, print_table=True)
            except Exception as exc:
                print(f"\nexecutor section failed: {first_line(exc)}", file=sys.stderr)
                result["executor_error"] = first_line(exc)
                status = 1
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1, default=str)
        print(f"\njson written to {args.json}")
    return status


if __name__ == "__main__":
    sys.exit(main())
