"""The attention section: every backend and Genesis AUTO on each shape, timed in interleaved rounds.

For each shape, every backend that can serve it (plus ``auto``, i.e. ``genesis_core.attention`` with AUTO):
median ms, TFLOP/s (4·B·H·Nq·Nk·D / time), relative error against a float64 reference on a slice, and
whether that error is within the backend's tolerance. Backends are warmed up, probed, then timed in
interleaved rounds (CUDA events on CUDA), so drift hits all alike; a cell whose runs are slow gets fewer
repetitions (``budget_ms``), and PyTorch's reference kernel ``sdpa_math`` is skipped where its score matrix
would not fit in memory. The summary judges AUTO's choice (``choice_ok``, ``choice_verdict``): where the
chosen backend is not the fastest row, the two are timed again in strict alternation and, where
torch.profiler sees device kernels, compared kernel by kernel.
"""
from __future__ import annotations

import math
import statistics
import sys
from typing import Callable, Dict, List

import torch

from .._device import synchronize
from .._log import first_line
from .._timing import alternate, inner_count, repeat, rotated, time_runs
from ..attn import autotune, dispatch, registry
from ..attn.types import AttentionCall
from .kernels import _compare_kernels
from .shapes import Shape
from .verdicts import choice_verdict


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


def _randn(shape, device, dtype, gen) -> torch.Tensor:
    return torch.randn(shape, generator=gen, device="cpu", dtype=torch.float32).to(device=device, dtype=dtype)


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
                reason = backend.reason_for(call)  # sdpa_math refuses score matrices that do not fit
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
                    probe = time_runs(fn, device, 1)[0]
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
        inner = {n: inner_count(fastest) for n in live}
        limit = {n: max(1, min(reps, int(budget_ms / max(cells[n]["probe_ms"] * inner[n], 1e-3)))) for n in live}
        samples: Dict[str, List[float]] = {n: [] for n in live}
        with torch.no_grad():
            for r in range(reps):
                # Rotate the order every round: a cell right after one that thrashes L2 or changes clocks
                # (the chunked math path) is otherwise always the one that pays for it.
                for n, fn in rotated(live.items(), r):
                    if r >= limit[n]:
                        continue
                    try:
                        t = time_runs(repeat(fn, inner[n]), device, 1)[0]
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
    a, c = alternate(fns["auto"], fns[chosen], inner["auto"], max(reps, 6), device)
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
        ms_chosen, ms_best = alternate(fns[chosen], fns[best], n_inner, rounds, device)
        out["choice_vs_fastest_paired"] = ms_chosen / ms_best
        out["choice_paired_rounds"] = rounds
    except Exception as exc:
        out["choice_paired_error"] = first_line(exc)
    out.update(_compare_kernels(fns[chosen], fns[best], device))
    return out


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
