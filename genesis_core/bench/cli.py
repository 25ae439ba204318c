"""``python -m genesis_core bench``: the arguments, the run's environment, the sections in order, JSON."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from typing import List, Optional

import torch

from .._log import first_line
from ..attn import autotune, dispatch, quality, registry
from .attention import REF_SKIP_MS, bench_attention
from .comfy_e2e import bench_e2e_comfyui, comfyui_path
from .e2e import bench_e2e
from .estimate import estimate, measure_speed, shape_s
from .overhead import bench_comfy_override, bench_overhead, print_comfy_override
from .plot import write_plot
from .report import fit, print_attention, print_e2e, print_overhead, say
from .shapes import DTYPES, parse_shapes

SECTIONS = ("attention", "overhead", "e2e", "executor")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m genesis_core bench",
                                description="Benchmark Genesis attention backends, AUTO, dispatch overhead and end to end.")
    p.add_argument("--shapes", default=None,
                   help="named sets (sd15, sdxl, flux, wan, diffusion, video, small, tiny) and/or custom "
                        "'B,H,Nq,Nk,D' separated by ';' or spaces (default: diffusion on CUDA, plus video when the "
                        "estimate fits --time-budget-s; small on CPU)")
    p.add_argument("--layout", default="BNHD", choices=("BNHD", "BHND"),
                   help="BNHD (default): contiguous [B, N, H, D] tensors handed to every row as BHND views, as "
                        "ComfyUI makes them; BHND: contiguous [B, H, N, D]")
    p.add_argument("--levels", default=",".join(quality.LEVELS),
                   help="comma-separated quality levels (exact, high, fast) that get an AUTO row: auto, auto@high, "
                        "auto@fast (default: all three)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--backends", default=None,
                   help="comma-separated backend names (default: every registered one); the 'auto' row is always added unless --no-auto")
    p.add_argument("--no-auto", action="store_true", help="leave out the Genesis AUTO row")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per cell (default 10 on CUDA, 5 on CPU)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up runs per cell (default 2)")
    p.add_argument("--budget-ms", type=float, default=3000.0,
                   help="time budget per cell: slow cells get fewer repetitions, a call over a third of it is "
                        "timed once (default 3000)")
    p.add_argument("--ref-skip-ms", type=float, default=REF_SKIP_MS,
                   help="skip the reference kernels (pytorch, sdpa_math, sdpa_efficient) where they would take "
                        f"over this many ms per call (default {REF_SKIP_MS:g}; 0: never skip)")
    p.add_argument("--time-budget-s", type=float, default=300.0,
                   help="the whole run's time budget: shapes whose estimated time no longer fits are skipped, "
                        "said in the output (default 300; 0: no budget)")
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


def environment(device: torch.device) -> dict:
    from .. import __version__

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


def main(argv: Optional[List[str]] = None) -> int:
    """Run the benchmark; returns a process exit code (0 ok, 2 bad arguments, 1 a section failed)."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        device = torch.device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda asked for, but torch.cuda.is_available() is False")
        on_cpu = device.type == "cpu"
        shapes = parse_shapes(args.shapes or ("small" if on_cpu else "diffusion"))
        levels = [quality.normalise(lv, "--levels") for lv in args.levels.split(",") if lv.strip()]
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
        if args.time_budget_s < 0 or args.ref_skip_ms < 0:
            raise ValueError("--time-budget-s and --ref-skip-ms must be >= 0")
    except ValueError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    size = args.e2e_size or ("small" if on_cpu else "flux")
    blocks = args.e2e_blocks or (2 if size == "small" else 4)
    comfy_path = comfyui_path(args.comfyui)

    env = environment(device)
    dt = str(dtype).replace("torch.", "")
    speed = measure_speed(device, dtype)
    attn_plan = dict(names=names, include_auto=include_auto, device=device, dtype=dtype, reps=reps,
                     warmup=args.warmup, budget_ms=args.budget_ms, speed=speed, levels=levels,
                     ref_skip_ms=args.ref_skip_ms)
    plan = dict(attn_plan, e2e_size=size, e2e_blocks=blocks, comfyui=bool(comfy_path))
    guess = estimate(sections, shapes, **plan)
    shapes_note = None
    if args.shapes is None and not on_cpu:  # the video set joins the default run only when it fits the budget
        shapes, guess, shapes_note = with_video_if_it_fits(shapes, guess, lambda more: estimate(sections, more, **plan),
                                                           args.time_budget_s)
    result: dict = {"environment": env, "settings": {"dtype": dt, "reps": reps, "warmup": args.warmup,
                                                      "budget_ms": args.budget_ms, "sections": sections,
                                                      "layout": args.layout, "levels": levels,
                                                      "ref_skip_ms": args.ref_skip_ms,
                                                      "time_budget_s": args.time_budget_s,
                                                      "shapes_note": shapes_note,
                                                      "shapes": [asdict(s) for s in shapes]}}
    say(f"Genesis bench: {env['device_name']} ({device}), torch {env['torch']}"
        + (f", CUDA {env['cuda']}, cuDNN {env.get('cudnn')}" if device.type == "cuda" else "")
        + f", {dt}, autotune {env['autotune_mode']}, {env['date_utc']}")
    result["settings"]["estimated_s"] = guess
    say(f"Estimated time: about {_seconds(guess['total'])} ("
        + ", ".join(f"{s} {_seconds(guess[s])}" for s in SECTIONS if s in sections) + ")")
    made = ("contiguous [B, N, H, D] handed as BHND views, as ComfyUI makes them" if args.layout == "BNHD"
            else "contiguous [B, H, N, D]")
    say(f"Inputs: {args.layout} ({made}); shapes: {', '.join(s.name for s in shapes)}"
        + (f"; {shapes_note}" if shapes_note else ""))
    sys.stdout.flush()
    write = _json_writer(args.json, result)
    status = 0
    progress = not args.no_progress
    clock = _SectionClock(result)
    if "attention" in sections:
        clock.start("attention")
        later = sum(guess[s] for s in SECTIONS if s in sections and s != "attention")

        def should_skip(shape) -> Optional[str]:
            if not args.time_budget_s:
                return None
            spent = time.perf_counter() - started
            need = shape_s(shape, **attn_plan)
            if spent + need + later <= args.time_budget_s:
                return None
            return (f"time budget: {spent:.1f} s spent, about {need:.1f} s needed here and {later:.1f} s for the "
                    f"later sections, over --time-budget-s {args.time_budget_s:g}")

        def on_shape(rows_so_far, summary_so_far) -> None:
            result["attention"], result["summary"] = rows_so_far, summary_so_far
            write()

        try:
            rows, summary = bench_attention(shapes, names, include_auto, device, dtype, reps, args.warmup,
                                            args.budget_ms, progress, args.seed, layout=args.layout, levels=levels,
                                            ref_skip_ms=args.ref_skip_ms, should_skip=should_skip, on_shape=on_shape)
        except Exception as exc:  # what was measured before stays (on_shape), the other sections still run
            print(fit(f"\nattention section failed: {first_line(exc)}"), file=sys.stderr)
            result["attention_error"] = first_line(exc)
            rows, summary = result.get("attention", []), result.get("summary", [])
            status = 1
        result["attention"], result["summary"] = rows, summary
        print_attention(rows, summary)
        result["autotune"] = autotune.timings()
        if args.plot and rows:
            err = write_plot(args.plot, rows, f"{env['device_name']}, torch {env['torch']}, {dt}")
            say(f"\nplot: {err}" if err else f"\nplot written to {args.plot}")
    write()
    if "overhead" in sections:
        clock.start("overhead")
        devs = [torch.device("cpu")] + ([device] if device.type == "cuda" else [])
        status |= _section(result, "overhead", "overhead section", lambda: bench_overhead(devs), print_overhead)
        status |= _section(result, "overhead_comfy", "ComfyUI override overhead",
                           lambda: bench_comfy_override(devs, comfyui=comfy_path), print_comfy_override)
        write()
    if "e2e" in sections:
        clock.start("e2e")
        status |= _section(result, "e2e", "e2e", lambda: bench_e2e(device, dtype, size, blocks, max(reps, 5), args.seed),
                           print_e2e)
        if comfy_path:
            double, single = (1, 2) if size == "small" else (2, 4)
            status |= _section(result, "e2e_comfyui", "e2e with ComfyUI's Flux",
                               lambda: bench_e2e_comfyui(comfy_path, device, dtype, size, double, single,
                                                         max(reps, 5), args.seed), print_e2e)
        write()
    if "executor" in sections:
        clock.start("executor")
        try:
            from ..compute import bench as compute_bench
        except ImportError as exc:
            say(f"\nexecutor section skipped: {exc}")
        else:
            print("\nExecutor:")
            status |= _section(result, "executor", "executor section",
                               lambda: compute_bench.run_executor_bench(quick=on_cpu, print_table=True))
    clock.start(None)
    result["elapsed_s"] = time.perf_counter() - started
    if args.json:
        write()
        say(f"\njson written to {args.json}")
    say(f"\nFinished in {_seconds(result['elapsed_s'])} (estimated about {_seconds(guess['total'])}).")
    return status


def with_video_if_it_fits(shapes: List, guess: dict, estimate_for, budget_s: float) -> tuple:
    """(shapes, estimate, note): ``shapes`` plus the ``video`` set when the run's estimate with it
    (``estimate_for(shapes)``) fits ``budget_s`` (0: no budget), else ``shapes`` and ``guess`` unchanged; the
    note says which and why."""
    longer = list(shapes) + parse_shapes("video")
    more = estimate_for(longer)
    limit = f" (--time-budget-s {budget_s:g})" if budget_s else ""
    if not budget_s or more["total"] <= budget_s:
        return longer, more, f"video set included: estimate {_seconds(more['total'])}{limit}"
    return list(shapes), guess, f"video set left out: the estimate with it is {_seconds(more['total'])}{limit}"


def _json_writer(path: Optional[str], result: dict):
    """A function writing ``result`` to ``path`` (atomically, so a run cut short leaves the last whole file);
    a no-op without a path. Called after every shape and section."""
    def write() -> None:
        if not path:
            return
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1, default=str)
        os.replace(tmp, path)

    return write


def _section(result: dict, key: str, label: str, run, show=None) -> int:
    """Run one section into ``result[key]`` (printing it with ``show``); a failure is reported in
    ``result[key + "_error"]`` and on stderr, and the run goes on. Returns 1 on failure, else 0."""
    try:
        result[key] = run()
        if show is not None:
            show(result[key])
    except Exception as exc:
        print(fit(f"\n{label} failed: {first_line(exc)}"), file=sys.stderr)
        result[key + "_error"] = first_line(exc)
        return 1
    return 0


class _SectionClock:
    """Seconds each section took, into ``result["section_s"]`` (beside the estimate in ``settings``)."""

    def __init__(self, result: dict) -> None:
        self.times = result.setdefault("section_s", {})
        self.name, self.t0 = None, 0.0

    def start(self, name: Optional[str]) -> None:
        now = time.perf_counter()
        if self.name is not None:
            self.times[self.name] = now - self.t0
        self.name, self.t0 = name, now


def _seconds(s: float) -> str:
    if s < 0.1:
        return "under 0.1 s"
    return f"{s:.1f} s" if s < 10 else f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"
