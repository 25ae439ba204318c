"""GPU check of the FlashAttention packages (fa4, fa3, fa2, the flash umbrella) and SageAttention 2.x (sage, sage2_*).

Run on the lent H200 (about 1-2 minutes, at most ~150 s):

    PYTHONPATH=/tmp/site:$PWD/.sage_src:$PWD python3 scripts/gpu/kernels_gpu.py --out $OUT

For every backend: availability, the reason where it does not run, version and kernel, and the time its probe
took (FA4 compiles its first configuration there). Then per shape (bfloat16, inputs made as ComfyUI makes them:
contiguous [B, N, H, D], every kernel handed the [B, H, N, D] transposed views through its ``run``): the first
call's cost (FA4 compiles each new configuration there), the error against a float64 slice (relative L2,
cosine), and the median of >= 20 CUDA-event timings after warm-up (fewer on Wan 720p), with plain
``F.scaled_dot_product_attention`` on the same views as the baseline (ratio > 1: faster than SDPA). Last, ``sage``
through Genesis dispatch against the raw ``sageattn`` call and against the path Genesis took before (BHND views
and a smoothed copy of k, made for 1.x). Every kernel runs under a time limit and in a try/except: one failure is reported and
the script goes on. Writes kernels_gpu.json under --out and prints a short table last.

``--cpu-dry-run``: the same logic on tiny CPU shapes with whatever backends serve there (the CI runs it).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _limits import sync, time_limit  # noqa: E402
from genesis_core._timing import time_runs  # noqa: E402
from genesis_core.attn import attention, autotune, registry  # noqa: E402
from genesis_core.attn.backends import fa4 as fa4_backend  # noqa: E402
from genesis_core.attn.backends import sage as sage_backend  # noqa: E402
from genesis_core.attn.types import AttentionCall  # noqa: E402

# name: (B, H, N, D, reps); Nk = N
GPU_SHAPES = {"flux": (1, 24, 4608, 128, 30), "wan480": (1, 40, 32760, 128, 20), "wan720": (1, 40, 75600, 128, 7),
              "sdxl": (2, 10, 4096, 64, 30)}
CPU_SHAPES = {"flux": (1, 2, 64, 32, 3), "wan480": (1, 2, 96, 32, 3), "wan720": (1, 2, 120, 32, 2),
              "sdxl": (2, 2, 48, 16, 3)}
BACKENDS = ("flash", "fa4", "fa3", "fa2", "sage", "sage2_fp8", "sage2_fp16", "sage2_triton", "sdpa_cudnn", "sdpa_flash")
PROBE_ORDER = ("fa4", "fa3", "fa2", "flash", "sage", "sage2_fp8", "sage2_fp16", "sage2_triton", "sdpa_cudnn",
               "sdpa_flash")  # members before the umbrella, so each probe's time is its own
WAN720_BACKENDS = ("flash", "fa4", "fa3", "sage", "sage2_fp8")  # each call ~0.2 s: only what the comparison needs
KERNEL_LIMIT_S = 45  # one kernel's first call, warm-up and timing
TOTAL_BUDGET_S = 140




def inputs(shape, device, dtype, seed):
    """Contiguous [B, N, H, D] q, k, v (as ComfyUI makes them)."""
    b, h, n, d = shape[:4]
    g = torch.Generator(device=device.type).manual_seed(seed)
    return [torch.randn(b, n, h, d, device=device, dtype=dtype, generator=g) for _ in range(3)]


def median_ms(fn, device, reps):
    return statistics.median(time_runs(fn, device, reps))


def first_and_time(fn, device, reps, warmup=2):
    """(first call ms, median ms, output of the first call): the first call (a JIT compile, a guard) is timed on
    its own with a synchronize, then ``warmup`` untimed runs, then the median of ``reps`` timed runs."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    first = (time.perf_counter() - t0) * 1e3
    for _ in range(warmup):
        fn()
    return first, median_ms(fn, device, reps), out


def backends_section(names):
    rows = []
    for name in names:
        b = registry.get(name)
        t0 = time.perf_counter()
        try:
            with time_limit(KERNEL_LIMIT_S):
                reason = b.available()
        except Exception as exc:
            reason = f"probe did not finish: {type(exc).__name__}: {exc}"
        probe_s = time.perf_counter() - t0
        rows.append({"backend": name, "available": reason is None, "reason": reason, "version": b.version(),
                     "kernel": b.description(), "precision": b.precision, "probe_s": round(probe_s, 3)})
        status = "runs" if reason is None else f"no: {reason}"
        print(f"  {name:13s} {b.precision:5s} {str(b.version() or '-'):34s} probe {probe_s:6.2f} s  {status}")
        if reason is None:
            print(f"  {'':13s} {b.description()}")
    return rows


def shape_section(sname, shape, device, dtype, names, deadline):
    b, h, n, d, reps = shape
    q, k, v = inputs(shape, device, dtype, seed=len(sname))
    qv, kv, vv = (t.transpose(1, 2) for t in (q, k, v))  # BHND views, as ComfyUI hands them to SDPA
    call = AttentionCall(qv, kv, vv, None, d ** -0.5)
    ref = autotune.reference_slice(call)
    rows = []
    with torch.no_grad():
        base = lambda: F.scaled_dot_product_attention(qv, kv, vv)  # noqa: E731
        _, sdpa_ms, out = first_and_time(base, device, reps)
        rel, cos = autotune.errors(out, ref)
        del out
        rows.append({"shape": sname, "backend": "sdpa (plain)", "status": "ok", "ms": sdpa_ms, "ratio": 1.0,
                     "rel_l2": rel, "cos": cos, "first_ms": None})
        for name in names:
            row = {"shape": sname, "backend": name, "status": "ok", "ms": None, "ratio": None, "rel_l2": None,
                   "cos": None, "first_ms": None, "note": ""}
            rows.append(row)
            be = registry.get(name)
            reason = be.reason_for(call)
            if reason is not None:
                row.update(status="skipped", note=reason)
                continue
            if time.perf_counter() > deadline:
                row.update(status="skipped", note="script time budget spent")
                continue
            try:
                with time_limit(KERNEL_LIMIT_S):
                    first, ms, out = first_and_time(lambda: be.run(call), device, reps)
                    rel, cos = autotune.errors(out, ref)
                    contiguous_bnhd = out.transpose(1, 2).is_contiguous()
                    del out
                row.update(ms=ms, ratio=sdpa_ms / ms, rel_l2=rel, cos=cos, first_ms=first,
                           note="" if contiguous_bnhd else "output not contiguous BNHD")
            except Exception as exc:
                row.update(status="failed", note=one_line(exc))
            if device.type == "cuda":
                torch.cuda.empty_cache()
        _, sdpa_after, _ = first_and_time(base, device, reps)  # drift check: the baseline again at the end
        rows[0]["ms_after"] = sdpa_after
    return rows


def sage_dispatch_section(shapes, device, dtype, deadline):
    """``sage`` through Genesis (BNHD in and out) against the raw ``sageattn`` call and the 1.x-style smoothed copy."""
    rows = []
    be = registry.get("sage")
    if be.available() is not None:
        return [{"shape": s, "status": "skipped", "note": f"sage: {be.available()}"} for s in shapes]
    raw = sage_backend.load().sageattn
    for sname, shape in shapes.items():
        if time.perf_counter() > deadline:
            rows.append({"shape": sname, "status": "skipped", "note": "script time budget spent"})
            continue
        q, k, v = inputs(shape, device, dtype, seed=7)
        qv, kv, vv = (t.transpose(1, 2) for t in (q, k, v))
        reps = shape[4]
        fns = {
            "raw sageattn(NHD)": lambda: raw(q, k, v, tensor_layout="NHD", is_causal=False),
            "genesis attention(backend='sage', BNHD)": lambda: attention(q, k, v, backend="sage", layout="BNHD",
                                                                          quality="fast"),
            # what Genesis did before: BHND views as "HND", and a smoothed copy of k (made for 1.x)
            "old Genesis path (HND views + copy of k)": lambda: raw(qv, kv - kv.mean(dim=2, keepdim=True), vv,
                                                                   tensor_layout="HND", is_causal=False),
        }
        try:
            with time_limit(KERNEL_LIMIT_S), torch.no_grad():
                ms = {label: first_and_time(fn, device, reps)[1] for label, fn in fns.items()}
            base = ms["raw sageattn(NHD)"]
            for label, t in ms.items():
                rows.append({"shape": sname, "path": label, "status": "ok", "ms": t, "vs_raw": t / base})
        except Exception as exc:
            rows.append({"shape": sname, "status": "failed", "note": one_line(exc)})
    return rows


def one_line(exc) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__


def fmt(x, spec):
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for kernels_gpu.json")
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny CPU shapes, whatever backends serve there")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    deadline = start + TOTAL_BUDGET_S
    dry = args.cpu_dry_run or not torch.cuda.is_available()
    device = torch.device("cpu" if dry else "cuda")
    shapes = CPU_SHAPES if dry else GPU_SHAPES
    dtype = torch.bfloat16
    print(f"torch {torch.__version__}, {'CPU dry run' if dry else torch.cuda.get_device_name()}")
    print("backends:")
    result = {"device": str(device), "dry_run": dry, "torch": torch.__version__}
    result["backends"] = backends_section(PROBE_ORDER)
    rows = []
    for sname, shape in shapes.items():
        names = WAN720_BACKENDS if sname == "wan720" else BACKENDS
        try:
            rows += shape_section(sname, shape, device, dtype, names, deadline)
        except Exception as exc:  # inputs that do not fit, a baseline that fails: report, go on
            rows.append({"shape": sname, "backend": "-", "status": "failed", "note": one_line(exc)})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result["shapes"] = rows
    result["fa4_first_calls_s"] = fa4_backend.first_calls()
    sage_shapes = {s: shapes[s] for s in ("flux", "wan480")}
    result["sage_dispatch"] = sage_dispatch_section(sage_shapes, device, dtype, deadline)
    result["elapsed_s"] = round(time.perf_counter() - start, 1)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "kernels_gpu.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)

    print("\nFA4 first call per configuration (compile): " +
          (", ".join(f"{c}: {s:.1f} s" for c, s in result["fa4_first_calls_s"].items()) or "none"))
    print("\nsage through Genesis vs the raw kernel:")
    for r in result["sage_dispatch"]:
        print(f"  {r['shape']:7s} " + (f"{r['path']:44s} {fmt(r['ms'], '9.3f')} ms  x{r['vs_raw']:.3f} of raw"
                                       if r["status"] == "ok" else f"{r['status']}: {r.get('note', '')}"))
    print(f"\nbfloat16, ratio vs sdpa = plain SDPA ms / backend ms (elapsed {result['elapsed_s']} s)")
    print(f"  {'shape':7s} {'backend':13s} {'first ms':>9s} {'ms':>9s} {'ratio vs sdpa':>13s} {'rel L2':>8s} "
          f"{'cos':>9s}")
    for r in rows:
        if r["status"] == "ok":
            print(f"  {r['shape']:7s} {r['backend'][:13]:13s} {fmt(r['first_ms'], '9.1f')} {fmt(r['ms'], '9.3f')} "
                  f"{fmt(r['ratio'], '13.2f')} {fmt(r['rel_l2'], '8.1e')} {fmt(r['cos'], '9.6f')} {r.get('note', '')}")
        else:
            print(f"  {r['shape']:7s} {r['backend'][:13]:13s} {r['status']}: {r.get('note', '')[:60]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
