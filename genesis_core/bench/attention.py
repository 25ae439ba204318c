"""The attention section: every backend, ComfyUI's default call and Genesis AUTO per quality level, per shape.

Inputs are made as ComfyUI makes them: contiguous [B, N, H, D] tensors handed to every row as BHND
*views* (layout tag ``BNHD``; ``layout="BHND"`` gives contiguous [B, H, N, D] instead). Every row of a
shape runs on the same tensors:

* one row per backend (``backend.run(call)``: quantisation and layout work included);
* ``comfyui-default``: ComfyUI's own SDPA call (``comfy_default.py``), the baseline of the speed targets;
* ``auto``, ``auto@high``, ``auto@fast``: ``genesis_core.attention(q, k, v, quality=...)`` - the first call
  is where the autotuner measures (kept out of the timings, its wall time recorded as ``first_call_ms``),
  then each is timed alternately with the kernel it chose, so its cost over that kernel is Genesis' own.

Per row: median ms, TFLOP/s (4·B·H·Nq·Nk·D / time), relative L2 error and cosine against a float64
reference slice, judged at the row's quality level (``judge.py``). Cells are warmed up, probed, then timed
in rotated, interleaved rounds (CUDA events on CUDA); a cell whose probe is over a third of ``budget_ms``
is *timed once* (that probe); the reference kernels (``pytorch``, ``sdpa_math``, ``sdpa_efficient``) run
after the others and are *skipped* where they would take over ``ref_skip_ms`` per call (from the fastest
probe of the shape and their usual slowdown), and ``sdpa_math`` where its scores would not fit in memory.
Any failure is recorded in its row and the run goes on. The summary per shape is built in ``summary.py``.
"""
from __future__ import annotations

import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .._device import synchronize
from .._log import first_line
from .._timing import alternate, inner_count, repeat, rotated, time_runs
from ..attn import autotune, dispatch, quality, registry
from ..attn.types import AttentionCall
from .comfy_default import COMFY_ROW, comfy_default_call
from .judge import LEVEL_ROWS, ROW_LEVELS, judge, level_of
from .kernels import _compare_kernels
from .shapes import Shape
from .summary import summarise
from .verdicts import choice_verdict, comfy_target, judge_targets

LAYOUTS = ("BNHD", "BHND")
# Usual time of the reference kernels over the fastest row of a shape (H100/H200 runs: the chunked math path
# 16-28x, SDPA's math kernel ~27x, its memory-efficient kernel 3.6-5.2x): they run last and are skipped where
# that predicts more than ``ref_skip_ms`` per call.
REFERENCE_SLOWDOWN = {"sdpa_efficient": 5.0, "pytorch": 25.0, "sdpa_math": 30.0}
REF_SKIP_MS = 2000.0
ONCE_FRACTION = 3  # a cell whose probe exceeds budget_ms / 3 is timed once (that probe)


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


def make_inputs(shape: Shape, device: torch.device, dtype: torch.dtype, gen: torch.Generator,
                layout: str = "BNHD") -> tuple:
    """q, k, v as BHND tensors: views of contiguous [B, N, H, D] tensors (``BNHD``, ComfyUI's way) or
    contiguous [B, H, N, D] (``BHND``). Fresh seeded normal values, drawn on ``gen``'s device (on the GPU for
    GPU runs: Wan 720p's 1.2 G values take seconds on a CPU) in float32, then cast."""
    def one(n: int) -> torch.Tensor:
        dims = (shape.b, n, shape.h, shape.d) if layout == "BNHD" else (shape.b, shape.h, n, shape.d)
        t = torch.randn(dims, generator=gen, device=gen.device, dtype=torch.float32).to(device=device, dtype=dtype)
        return t.transpose(1, 2) if layout == "BNHD" else t

    return one(shape.nq), one(shape.nk), one(shape.nk)


def bench_attention(shapes: List[Shape], names: List[str], include_auto: bool, device: torch.device,
                    dtype: torch.dtype, reps: int, warmup: int, budget_ms: float, progress: bool,
                    seed: int, *, layout: str = "BNHD", levels: Sequence[str] = quality.LEVELS,
                    ref_skip_ms: float = REF_SKIP_MS, should_skip: Optional[Callable[[Shape], Optional[str]]] = None,
                    on_shape: Optional[Callable[[list, list], None]] = None) -> tuple:
    """(rows, summary) for every shape (see the module docstring). ``levels``: the AUTO rows to add (with
    ``include_auto``). ``should_skip(shape)``: a reason to leave a shape out (the time budget), or None.
    ``on_shape(rows, summary)`` is called after each shape (the CLI writes its JSON there)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
    autos = [LEVEL_ROWS[lv] for lv in quality.LEVELS if lv in levels] if include_auto else []
    rows: List[dict] = []
    summary: List[dict] = []
    bar = _progress(len(shapes) * (len(names) + 1 + len(autos)), progress, "attention")
    gen = _generator(device, seed)
    for shape in shapes:
        reason = should_skip(shape) if should_skip is not None else None
        if reason:
            summary.append({"shape": shape.name, "layout": layout, "skipped": reason})
        else:
            try:
                cells, summ = _bench_shape(shape, names, autos, device, dtype, reps, warmup, budget_ms, layout,
                                           ref_skip_ms, gen, bar)
                rows.extend(cells.values())
                summary.append(summ)
            except Exception as exc:  # a shape that cannot even be set up (out of memory): say so, go on
                summary.append({"shape": shape.name, "layout": layout, "error": first_line(exc)})
                _free(device)
        if reason:
            bar.update(len(names) + 1 + len(autos))
        if on_shape is not None:
            on_shape(rows, summary)
    bar.close()
    return rows, summary


def _generator(device: torch.device, seed: int) -> torch.Generator:
    """A seeded generator on ``device`` where it has one (CUDA), else on the CPU."""
    if device.type == "cuda":
        try:
            return torch.Generator(device=device).manual_seed(seed)
        except Exception:  # no device generator: draw on the CPU and move
            pass
    return torch.Generator().manual_seed(seed)


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        try:
            torch.cuda.empty_cache()
        except Exception:
            pass


def _row(shape: Shape, name: str, dtype: torch.dtype, device: torch.device, layout: str) -> dict:
    return {"shape": shape.name, "B": shape.b, "H": shape.h, "Nq": shape.nq, "Nk": shape.nk, "D": shape.d,
            "dtype": str(dtype).replace("torch.", ""), "device": str(device), "layout": layout, "backend": name,
            "ms": None, "tflops": None, "rel_err": None, "cos": None, "level": None, "tolerance": None,
            "correct": None, "status": "ok", "note": ""}


def _add_note(row: dict, text: str) -> None:
    row["note"] = (row["note"] + "; " if row["note"] else "") + text


def _bench_shape(shape, names, autos, device, dtype, reps, warmup, budget_ms, layout, ref_skip_ms, gen, bar):
    q, k, v = make_inputs(shape, device, dtype, gen, layout)
    call = AttentionCall(q, k, v, None, shape.d ** -0.5)
    ref = autotune.reference_slice(call)
    cells: Dict[str, dict] = {}
    fns: Dict[str, Callable[[], object]] = {}
    probes: Dict[str, float] = {}
    order = [COMFY_ROW] + [n for n in names if n not in REFERENCE_SLOWDOWN] + \
        [n for n in names if n in REFERENCE_SLOWDOWN] + autos
    for name in order:
        bar.set_postfix_str(f"{shape.name} {name}")
        row = cells[name] = _row(shape, name, dtype, device, layout)
        backend: Optional[registry.Backend] = None
        if name == COMFY_ROW:
            fn = comfy_default_call(q, k, v)
            backend = registry.get("sdpa") if "sdpa" in registry.names() else None
        elif name in ROW_LEVELS:
            fn = (lambda lv: (lambda: dispatch.attention(q, k, v, quality=lv)))(ROW_LEVELS[name])
        else:
            backend = registry.get(name)
            why = backend.reason_for(call) or _reference_skip(name, probes, ref_skip_ms)
            if why:  # unavailable, outside its limits, sdpa_math's memory refusal, or too slow to bother
                row["status"], row["note"] = "skipped", why
                bar.update()
                continue
            fn = (lambda run: (lambda: run(call)))(backend.run)
        probe = _first_calls(name, fn, row, backend, device, dtype, warmup, budget_ms, ref)
        if probe is not None:
            fns[name] = fn
            if name not in ROW_LEVELS:
                probes[name] = probe
        bar.update()
    _time_rounds(cells, fns, reps, budget_ms, device)
    for name in autos:
        _pair_with_its_kernel(cells, fns, name, reps, budget_ms, device)
    summ = summarise(shape, cells, layout, dtype)
    summ.update(_pair_choice_with_fastest(summ, cells, fns, reps, budget_ms, device))
    summ["choice_ok"], summ["choice_verdict"] = choice_verdict(summ)
    for level, lsum in summ["levels"].items():
        if comfy_target(shape.name, level) is not None:
            lsum.update(_pair_with_comfy(cells, fns, LEVEL_ROWS[level], reps, budget_ms, device))
    summ["targets"] = judge_targets(summ)
    for row in cells.values():
        row.pop("probe_ms", None)
        row.pop("inner", None)
    return cells, summ


def _reference_skip(name: str, probes: Dict[str, float], ref_skip_ms: float) -> Optional[str]:
    factor = REFERENCE_SLOWDOWN.get(name)
    if factor is None or not probes or ref_skip_ms <= 0:
        return None
    fastest = min(probes.values())
    if fastest * factor <= ref_skip_ms:
        return None
    return (f"skipped: over {ref_skip_ms:g} ms per call expected (about {factor:g}x the fastest row's "
            f"{fastest:.1f} ms)")


def _first_calls(name, fn, row, backend, device, dtype, warmup, budget_ms, ref) -> Optional[float]:
    """The cell's first call (untimed: the autotuner measures in AUTO's; its output is judged), its warm-up
    runs and one probe timing. Returns the probe's ms (a probe over a third of the budget is the cell's only
    timing: ``timed_once``), or None when the cell failed."""
    try:
        with torch.no_grad():
            t0 = time.perf_counter()
            out = fn()
            synchronize(device)
            first_ms = (time.perf_counter() - t0) * 1e3
            if name in ROW_LEVELS:
                row["chosen"] = dispatch.last_backend()
                row["first_call_ms"] = first_ms
                _add_note(row, f"chose {row['chosen']}")
                backend = registry.get(row["chosen"])
            rel, cos = autotune.errors(out, ref)
            del out
            judge(row, backend, dtype, rel, cos, level_of(name, backend))
            if first_ms * (warmup - 1) <= budget_ms / 4:  # a slow first call is warm-up enough
                for _ in range(max(0, warmup - 1)):
                    fn()
            probe = time_runs(fn, device, 1)[0]
    except Exception as exc:
        row["status"], row["note"] = "failed", first_line(exc)
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            _free(device)
        return None
    row["probe_ms"] = probe
    if probe * ONCE_FRACTION > budget_ms:
        _set_ms(row, probe, 1)
        row["timed_once"] = True
        _add_note(row, f"timed once: {probe:.0f} ms per call, over a third of the {budget_ms:g} ms cell budget")
    return probe


def _set_ms(row: dict, ms: float, reps: int) -> None:
    row["ms"], row["reps"] = ms, reps
    flops = 4.0 * row["B"] * row["H"] * row["Nq"] * row["Nk"] * row["D"]
    row["tflops"] = flops / (ms * 1e-3) / 1e12


def _time_rounds(cells, fns, reps, budget_ms, device) -> None:
    """Interleaved rounds: every live cell once per round, the order rotated every round (a cell right after
    one that thrashes L2 or changes clocks is otherwise always the one that pays for it). One inner count
    for every cell of a shape (per-cell counts made the AUTO row look 30-80% slower than its own kernel)."""
    live = {n: fn for n, fn in fns.items() if not cells[n].get("timed_once")}
    if not live:
        return
    fastest = min(cells[n]["probe_ms"] for n in live)
    inner = inner_count(fastest)
    limit = {n: max(1, min(reps, int(budget_ms / max(cells[n]["probe_ms"] * inner, 1e-3)))) for n in live}
    samples: Dict[str, List[float]] = {n: [] for n in live}
    with torch.no_grad():
        for r in range(reps):
            for n, fn in rotated(list(live.items()), r):
                if r >= limit[n] or n not in live:
                    continue
                try:
                    samples[n].append(time_runs(repeat(fn, inner), device, 1)[0] / inner)
                except Exception as exc:
                    cells[n]["status"], cells[n]["note"] = "failed", first_line(exc)
                    del live[n]
                    fns.pop(n, None)
    for n, vals in samples.items():
        if n in live and vals:
            _set_ms(cells[n], statistics.median(vals), len(vals))
            cells[n]["inner"] = inner
            if len(vals) < reps:
                _add_note(cells[n], f"{len(vals)} rep(s): budget")


def _rounds(slowest_ms: float, reps: int, budget_ms: float) -> int:
    """Alternated rounds: ``max(reps, 6)``, fewer where the pair would spend more than ``budget_ms``, >= 2."""
    return max(2, min(max(reps, 6), int(budget_ms / max(slowest_ms, 1e-3))))


def _inner(cells, *names) -> int:
    return max([cells[n].get("inner") or 1 for n in names])


def _pair_with_its_kernel(cells, fns, name, reps, budget_ms, device) -> None:
    """Time an AUTO row and the kernel it chose in strict alternation (same inner count, rotating who goes
    first), so the row's cost over its kernel is Genesis' own and not the neighbours' (on the H100, reading
    AUTO off the big interleaved round put it 20-70% over its kernel; alternated, within 1% on Flux)."""
    auto = cells.get(name)
    chosen = auto.get("chosen") if auto else None
    if name not in fns or chosen not in fns or auto["ms"] is None or cells[chosen]["ms"] is None:
        return
    n_inner = _inner(cells, name, chosen)
    rounds = _rounds(max(auto["ms"], cells[chosen]["ms"]) * n_inner, reps, budget_ms)
    try:
        a, c = alternate(fns[name], fns[chosen], n_inner, rounds, device)
    except Exception as exc:
        _add_note(auto, f"not timed alternately with {chosen}: {first_line(exc)}")
        return
    auto["ms_interleaved"] = auto["ms"]
    _set_ms(auto, a, auto.get("reps") or rounds)
    auto["paired_kernel_ms"], auto["paired_rounds"] = c, rounds
    _add_note(auto, f"timed alternately with {chosen}: {c:.3f} ms")


def _pair_choice_with_fastest(summ, cells, fns, reps, budget_ms, device) -> dict:
    """Where AUTO at exact chose another backend than the fastest exact row and both rows were timed: time
    the two in strict alternation (``max(reps, 6)`` rounds, fewer where either call would spend more than
    ``budget_ms``, never fewer than 2) and compare the device kernels each launches. Returns the summary keys
    ``choice_vs_fastest_paired`` (median chosen / median fastest), ``choice_paired_rounds`` and those of
    :func:`_compare_kernels`; {} where there is nothing to pair. (On the H100, ``sdpa`` and ``sdpa_cudnn``
    ran the same cuDNN kernel on Wan yet swapped places by 8-13% between runs of the interleaved rows.)"""
    chosen, best = summ.get("auto_backend"), summ.get("fastest_correct")
    if not chosen or not best or chosen == best or chosen not in fns or best not in fns:
        return {}
    if cells[chosen]["ms"] is None or cells[best]["ms"] is None:
        return {}
    n_inner = _inner(cells, chosen, best)
    rounds = _rounds(max(cells[chosen]["ms"], cells[best]["ms"]) * n_inner, reps, budget_ms)
    out: dict = {}
    try:
        ms_chosen, ms_best = alternate(fns[chosen], fns[best], n_inner, rounds, device)
        out["choice_vs_fastest_paired"] = ms_chosen / ms_best
        out["choice_paired_rounds"] = rounds
    except Exception as exc:
        out["choice_paired_error"] = first_line(exc)
    out.update(_compare_kernels(fns[chosen], fns[best], device))
    return out


def _pair_with_comfy(cells, fns, name, reps, budget_ms, device) -> dict:
    """An AUTO row against ``comfyui-default``, timed alternately (where a speed target needs the ratio):
    ``vs_comfy_paired`` = ComfyUI's ms / AUTO's ms, ``comfy_paired_rounds``; {} where either was not timed."""
    if name not in fns or COMFY_ROW not in fns or cells[name]["ms"] is None or cells[COMFY_ROW]["ms"] is None:
        return {}
    n_inner = _inner(cells, name, COMFY_ROW)
    rounds = _rounds(max(cells[name]["ms"], cells[COMFY_ROW]["ms"]) * n_inner, reps, budget_ms)
    try:
        a, c = alternate(fns[name], fns[COMFY_ROW], n_inner, rounds, device)
    except Exception as exc:
        return {"comfy_paired_error": first_line(exc)}
    return {"vs_comfy_paired": c / a, "comfy_paired_rounds": rounds, "paired_ms": a, "comfy_paired_ms": c}
