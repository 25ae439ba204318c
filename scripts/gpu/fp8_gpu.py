"""GPU study of FP8 attention: Genesis's fused quantisation, its error, and the whole path's speed.

Run on the lent H200 (about 60-120 s, at most ~150 s):

    PYTHONPATH=/tmp/site:$PWD python3 scripts/gpu/fp8_gpu.py --out $OUT

Shapes: Flux 1x24x4608x128, Wan 480p 1x40x32760x128, Wan 720p 1x40x75600x128, SDXL 2x10x4096x64 (bfloat16, made
as ComfyUI makes them: contiguous [B, N, H, D], handed over as [B, H, N, D] views). Two kinds of inputs: ``random``
(normal), ``outliers`` (k plus a large per-channel bias, and a few heavy channels in q, k and v, as DiT
activations have) and ``quiet_heads`` (heads up to 10**6 apart in size). Per shape and kind, the error (relative
L2, cosine, and the worst head's relative L2; against a float64 slice: 4 heads x 256
query rows x all keys, what the autotuner computes) of:

* ``emulated``: q, k, v quantised by the PyTorch reference per tensor / per head / per block (128 tokens), with
  and without k smoothing, dequantised, attended in float64: the input quantisation alone;
* ``fa3 fp8`` / ``cudnn fp8``: the real kernels on Genesis's Triton quantisation, per tensor / per head (cuDNN: the
  descale shapes its graph accepts), with and without smoothing (per block: no kernel takes such scales);
* ``sdpa bf16``: plain SDPA, for scale.

Then (random inputs) the median of >= 20 CUDA-event timings after warm-up (fewer on Wan 720p) of: plain
``F.scaled_dot_product_attention`` on the views (the baseline), the Triton quantisation (per head, per tensor,
cuDNN's mix; with Triton's own launch path too) against the unfused PyTorch one and against the bandwidth floor
(q, k, v read once in bf16 and written once in fp8 at 4.3 TB/s), each FP8 kernel alone, each whole path
(``backend.run``: quantise, attend, output in the input dtype; what AUTO times), FA3 FP8 through
``flash_attn_func`` instead of the compiled op, FA3 FP8 after the unfused quantisation; for the quantisation and
the whole paths also the kernel launches per call (counted by torch.profiler) and the host time to enqueue one
call. Last, what AUTO picks per quality level on Flux, SDXL and Wan 480p (``autotune.tune``). Every kernel runs in a try/except under a time
limit; the JSON (fp8_gpu.json under --out) is rewritten after every shape; a short table is printed last.

``--cpu-dry-run``: the same logic on tiny CPU shapes (the reference math, and the Triton kernels under
``TRITON_INTERPRET=1`` where Triton is installed); kernels that need CUDA are reported as skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

if "--cpu-dry-run" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the Triton kernels are first imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _limits import sync, time_limit  # noqa: E402
from genesis_core._timing import time_runs  # noqa: E402
from genesis_core.attn import autotune, registry  # noqa: E402
from genesis_core.attn.backends import fa3_fp8, fp8_cudnn  # noqa: E402
from genesis_core.attn.quant import fp8  # noqa: E402
from genesis_core.attn.types import AttentionCall  # noqa: E402

GPU_SHAPES = {"flux": (1, 24, 4608, 128, 30), "wan480": (1, 40, 32760, 128, 20), "wan720": (1, 40, 75600, 128, 5),
              "sdxl": (2, 10, 4096, 64, 30)}  # (B, H, N, D, timing reps)
CPU_SHAPES = {"flux": (1, 2, 48, 32, 1), "sdxl": (2, 1, 40, 16, 1)}
KINDS = ("random", "outliers", "quiet_heads")
K_BIAS, HEAVY_CHANNELS, HEAVY_FACTOR = 4.0, 4, 4.0
QUIET_DECADES = 6.0
BLOCK = 128
HBM_TBPS = 4.3
KERNEL_LIMIT_S = 40
TOTAL_BUDGET_S = 140
AUTO_SHAPES = ("flux", "sdxl", "wan480")




def first_line(exc):
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:240]}" if text else type(exc).__name__


def make_inputs(shape, kind, device, seed):
    """Contiguous [B, N, H, D] bfloat16 q, k, v (ComfyUI's layout) and their BHND views."""
    b, h, n, d = shape[:4]
    g = torch.Generator(device=device.type).manual_seed(seed)
    q, k, v = (torch.randn(b, n, h, d, device=device, generator=g) for _ in range(3))
    if kind == "outliers":
        k += K_BIAS * torch.randn(d, device=device, generator=g)  # a per-channel offset in k
        for t in (q, k, v):
            t[..., :HEAVY_CHANNELS] *= HEAVY_FACTOR  # a few heavy channels
    if kind == "quiet_heads":  # heads up to 10**QUIET_DECADES apart in size: what per-head scales are for
        for t in (q, k, v):
            t *= 10.0 ** (-QUIET_DECADES * torch.rand(1, 1, h, 1, device=device, generator=g))
    bnhd = [t.to(torch.bfloat16) for t in (q, k, v)]
    return bnhd, [t.transpose(1, 2) for t in bnhd]


def median_ms(fn, device, reps):
    for _ in range(2 if device.type == "cuda" else 0):  # warm-up (the CPU dry run only checks the code path)
        fn()
    sync(device)
    return statistics.median(time_runs(fn, device, max(1, reps)))


def host_us(fn, device, calls=20):
    """Microseconds to enqueue one call (no synchronize inside; the queue does not fill in 20 calls)."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t = (time.perf_counter() - t0) / calls * 1e6
    sync(device)
    return t


def guarded(row, fn, limit=KERNEL_LIMIT_S):
    """Run ``fn`` under a time limit; a failure lands in row["status"] and the script goes on."""
    try:
        with time_limit(limit):
            return fn()
    except Exception as exc:  # noqa: BLE001  (one failure must not stop the study)
        row["status"] = f"failed: {first_line(exc)}"
        return None


def fa3_attend(qkv, scale):
    return fa3_fp8.attend(qkv, scale).transpose(1, 2)


def launches(fn, device):
    """CUDA kernels (and copies/memsets, counted apart) one call of ``fn`` runs, by torch.profiler."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync(device)
    names = [e.name for e in prof.events() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    copies = [n for n in names if n.startswith(("Memcpy", "Memset"))]
    return {"kernels": len(names) - len(copies), "copies": len(copies), "names": sorted(set(names))[:12]}


def cudnn_attend(plan, qkv, call):
    B, H, NQ, D = call.q.shape
    o8 = torch.empty((B, NQ, H, D), dtype=fp8.E4M3, device=call.device)
    plan.execute(qkv, o8)
    return fp8.dequantize_output(o8, qkv.descale[2], fp8_cudnn.O_FACTOR, call.dtype).transpose(1, 2)


def slice_errors(o, r):
    """(relative L2, cosine, worst head's relative L2) of ``o`` against the float64 slice ``r`` ([P, R, D])."""
    o = o.to(r.dtype)
    if not bool(torch.isfinite(o).all()):
        return float("nan"), None, float("nan")
    a, b = o.reshape(-1), r.reshape(-1)
    rel = float((a - b).norm() / b.norm().clamp_min(1e-30))
    cos = float(torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-30))
    worst = float(((o - r).flatten(1).norm(dim=1) / r.flatten(1).norm(dim=1).clamp_min(1e-30)).max())
    return rel, cos, worst


def errors(out, ref):
    """slice_errors of a BHND output on the reference slice's heads and rows."""
    pairs, rows, r = ref
    return slice_errors(torch.stack([out[b, h].index_select(0, rows) for b, h in pairs]), r)


def emulated(call, ref, granularity, smooth):
    """Error of attention on the reference quantiser's dequantised inputs (float64 on the slice)."""
    deq = [fp8.dequantize(fp8.quantize_reference(t, granularity, smooth=(smooth and i == 1), block=BLOCK))
           for i, t in enumerate((call.q, call.k, call.v))]
    got = autotune.reference_slice(AttentionCall(*deq, None, call.scale))[2]  # the same heads and rows as ref
    return slice_errors(got, ref[2])


def error_section(sname, kind, call, ref, plans):
    rows = []

    def add(path, granularity, smooth, fn):
        row = {"shape": sname, "inputs": kind, "path": path, "granularity": granularity, "smooth_k": smooth,
               "rel_l2": None, "cos": None, "rel_l2_worst_head": None, "status": "ok"}
        rows.append(row)
        res = guarded(row, fn)
        if res is not None:
            row["rel_l2"], row["cos"], row["rel_l2_worst_head"] = res
        return row

    with torch.no_grad():
        add("sdpa bf16", None, False,
            lambda: errors(F.scaled_dot_product_attention(call.q, call.k, call.v), ref))
        for granularity in fp8.GRANULARITIES:
            for smooth in (False, True):
                add("emulated", granularity, smooth, lambda g=granularity, s=smooth: emulated(call, ref, g, s))
        for granularity in fp8.KERNEL_GRANULARITIES:
            for smooth in (False, True):
                if fa3_fp8.backend.available() is None:
                    add("fa3 fp8", granularity, smooth, lambda g=granularity, s=smooth: errors(
                        fa3_attend(fp8.quantize_qkv(call.q, call.k, call.v, g, s), call.scale), ref))
                plan = plans.get(granularity)
                if isinstance(plan, str) or plan is None:
                    row = add("cudnn fp8", granularity, smooth, lambda: None)
                    row["status"] = plan or f"skipped: {fp8_cudnn.backend.available()}"
                else:  # q and k as the graph takes them, v per head (what run() does); run() would refuse
                    box = {}  # the calls whose refusal row says so

                    def cud(p=plan, s=smooth, box=box):
                        qkv = fp8.quantize_qkv(call.q, call.k, call.v, fp8_cudnn.granularity_for(p), s)
                        box["refusal"] = fp8_cudnn.shared_scale_refusal(qkv) if p.granularity == "tensor" else None
                        box["spread"] = qkv.spread.tolist()
                        return errors(cudnn_attend(p, qkv, call), ref)

                    row = add("cudnn fp8", granularity, smooth, cud)
                    row.update(refused=box.get("refusal"), spread=box.get("spread"))
        if fa3_fp8.backend.available() is not None:
            rows.append({"shape": sname, "inputs": kind, "path": "fa3 fp8", "status":
                         f"skipped: {fa3_fp8.backend.available()}"})
    return rows


def cudnn_plans(call):
    """The cuDNN graphs per descale granularity (or why none builds), built with the backend's own code."""
    if fp8_cudnn.backend.available() is not None:
        return {}
    out = {}
    key = fp8_cudnn.graph_key(call)
    for granularity, amax_s in fp8_cudnn.VARIANTS:
        if isinstance(out.get(granularity), fp8_cudnn._Plan):
            continue
        try:
            with time_limit(KERNEL_LIMIT_S):
                out[granularity] = fp8_cudnn.build_graph(key, (granularity, amax_s))
        except Exception as exc:  # noqa: BLE001
            out[granularity] = f"no graph ({granularity} descales, Amax_S output {amax_s}): {first_line(exc)}"
    return out


def timing_section(sname, shape, call, device, plans):
    b, h, n, d, reps = shape
    elems = 3 * b * h * n * d
    floor_ms = elems * 3 / (HBM_TBPS * 1e12) * 1e3
    rows, base = [], {}

    def add(what, fn, bytes_moved=None, host=False, count=False):
        row = {"shape": sname, "what": what, "ms": None, "x_vs_sdpa": None, "status": "ok"}
        rows.append(row)
        if count:
            row["launches"] = guarded(row, lambda: launches(fn, device))
        ms = guarded(row, lambda: median_ms(fn, device, reps))
        if ms is not None:
            row["ms"] = ms
            if "sdpa" in base and not bytes_moved:
                row["x_vs_sdpa"] = base["sdpa"] / ms
            if bytes_moved:
                row["gb_per_s"] = bytes_moved / ms / 1e6
                row["floor_ms"] = floor_ms
            if host and device.type == "cuda":
                row["host_us"] = guarded(row, lambda: host_us(fn, device))
        return row

    with torch.no_grad():
        r = add("sdpa bf16 (plain F.scaled_dot_product_attention)", lambda: F.scaled_dot_product_attention(
            call.q, call.k, call.v), host=True)
        if r["ms"]:
            base["sdpa"] = r["ms"]
            r["x_vs_sdpa"] = 1.0
        if registry.get("fa3").available() is None:
            add("fa3 bf16 (exact)", lambda: registry.get("fa3").run(call))
        if fp8.triton_missing() is None:
            mixed = ("tensor", "tensor", "head")
            for g, s in (("head", True), ("head", False), ("tensor", True), (mixed, True)):
                label = "q,k tensor + v head" if g == mixed else g
                add(f"quantise q,k,v: Triton, {label}{' + smooth k' if s else ''}",
                    lambda g=g, s=s: fp8.quantize_qkv(call.q, call.k, call.v, g, s), bytes_moved=elems * 5,
                    host=True, count=True)
            kern = fp8._kernels()
            kern.fast_launch(False)
            try:
                add("quantise q,k,v: Triton, head + smooth k, through Triton's own launch path",
                    lambda: fp8.quantize_qkv(call.q, call.k, call.v, "head", True), bytes_moved=elems * 5, host=True)
            finally:
                kern.fast_launch(True)
        add("quantise q,k,v: unfused PyTorch, head + smooth k",
            lambda: fp8.quantize_qkv_reference(call.q, call.k, call.v, "head", True), bytes_moved=elems * 5)
        if fa3_fp8.backend.available() is None:
            qkv = fp8.quantize_qkv(call.q, call.k, call.v, fa3_fp8.GRANULARITY, fa3_fp8.SMOOTH_K)
            add("fa3 fp8 kernel only", lambda: fa3_attend(qkv, call.scale), host=True)
            add("fa3_fp8 whole path (run: Triton quantise + kernel)", lambda: fa3_fp8.run(call), host=True,
                count=True)
            if fa3_fp8._attend is not fa3_fp8._wrapper_attend:
                chosen = fa3_fp8._attend
                fa3_fp8._attend = fa3_fp8._wrapper_attend
                try:
                    add("fa3_fp8 whole path through flash_attn_func (not the compiled op)", lambda: fa3_fp8.run(call),
                        host=True)
                finally:
                    fa3_fp8._attend = chosen
            add("fa3 fp8 + unfused PyTorch quantisation", lambda: fa3_attend(
                fp8.quantize_qkv_reference(call.q, call.k, call.v, "head", True), call.scale))
            del qkv
        live = fp8_cudnn.backend.available() is None
        plan = next((p for p in plans.values() if isinstance(p, fp8_cudnn._Plan)), None) if live else None
        if plan is not None:
            qkv = fp8.quantize_qkv(call.q, call.k, call.v, fp8_cudnn.granularity_for(plan), fp8_cudnn.SMOOTH_K)
            o8 = torch.empty((b, n, h, d), dtype=fp8.E4M3, device=device)
            add(f"cudnn fp8 kernel only ({plan.granularity} descales, fp8 out)", lambda: plan.execute(qkv, o8),
                host=True)
            add("dequantise the fp8 output (one pass)", lambda: fp8.dequantize_output(
                o8, qkv.descale[2], fp8_cudnn.O_FACTOR, call.dtype), host=True, count=True)
            add("fp8_cudnn whole path (run: quantise + kernel + dequantise)", lambda: fp8_cudnn.run(call), host=True,
                count=True)
            del qkv, o8
    return rows


def auto_section(sname, bnhd):
    row = {"shape": sname, "status": "ok"}

    def tune():
        entry = autotune.tune(*bnhd, layout="BNHD", force=True, quality="fast")
        row.update(ms=entry.get("ms"), rel_err=entry.get("rel_err"), cos=entry.get("cos"),
                   rejected=entry.get("rejected"))
        servable = list(entry.get("ms", {}))
        row["picks"] = {lvl: autotune.pick(entry, servable, lvl) for lvl in ("exact", "high", "fast")}

    guarded(row, tune, limit=60)
    return row


def environment(device):
    env = {"torch": torch.__version__, "device": str(device), "triton_missing": fp8.triton_missing()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cudnn_torch"] = torch.backends.cudnn.version()
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001
        env["triton"] = f"absent: {first_line(exc)}"
    env["backends"] = {}
    for name in ("fa3_fp8", "fp8_cudnn", "fa3", "sdpa_cudnn"):
        b = registry.get(name)
        row = {}
        guarded(row, lambda: row.update(reason=b.available(), version=b.version(), kernel=b.description()), 90)
        env["backends"][name] = row
    return env


ERR_COLS = (("sdpa", "sdpa bf16", None, False), ("e.t", "emulated", "tensor", False),
            ("e.h", "emulated", "head", False), ("e.b", "emulated", "block", False),
            ("e.hs", "emulated", "head", True), ("e.bs", "emulated", "block", True),
            ("fa3.h", "fa3 fp8", "head", False), ("fa3.hs", "fa3 fp8", "head", True),
            ("fa3.ts", "fa3 fp8", "tensor", True), ("cud.t", "cudnn fp8", "tensor", False),
            ("cud.ts", "cudnn fp8", "tensor", True), ("cud.hs", "cudnn fp8", "head", True))
TIME_COLS = (("sdpa ms", "sdpa bf16"), ("fa3 run", "fa3_fp8 whole"), ("fa3 krn", "fa3 fp8 kernel"),
             ("fa3+pt", "fa3 fp8 + unfused"), ("cud run", "fp8_cudnn whole"), ("cud krn", "cudnn fp8 kernel"))


def table(result):
    """Two short tables: speed per shape (x = faster than plain SDPA; quant ms: the Triton quantisation per head
    with k smoothed, floor: its bandwidth floor, torch: the unfused PyTorch one; host us: enqueueing one fa3_fp8
    call; q launch / q host / q jit: the quantisation's kernel launches per call and host us per call, and host
    us through Triton's own launch path; cud us: enqueueing one fp8_cudnn call (its spread check syncs);
    launch: kernels per whole fa3_fp8 / fp8_cudnn call) and relative L2 error in % per shape and inputs (e:
    emulated; t/h/b: per tensor/head/block scales, s: k smoothed; cud.t/ts: per-tensor q/k with v per head;
    '-': not measured, see the JSON; for quiet_heads the worst head's error, which the overall number hides)."""
    lines = ["", f"{'shape':7s}" + "".join(f"{c:>9s}" for c, _ in TIME_COLS) + f"{'quant ms':>10s}{'floor':>7s}"
             f"{'torch':>7s}{'host us':>8s}{'q launch':>9s}{'q host':>7s}{'q jit':>6s}{'cud us':>7s}{'launch':>7s}"]
    for sname in dict.fromkeys(r["shape"] for r in result["timing"]):
        rows = [r for r in result["timing"] if r["shape"] == sname]
        cells = []
        for _, prefix in TIME_COLS:
            r = next((r for r in rows if r["what"].startswith(prefix)), None)
            val = None if r is None else (r.get("ms") if prefix == "sdpa bf16" else r.get("x_vs_sdpa"))
            cells.append(f"{val:9.3f}" if prefix == "sdpa bf16" and val else f"{'x%.2f' % val:>9s}" if val else
                         f"{'-':>9s}")
        tq = next((r for r in rows if r["what"].startswith("quantise q,k,v: Triton, head + smooth")), {})
        pq = next((r for r in rows if r["what"].startswith("quantise q,k,v: unfused")), {})
        run = next((r for r in rows if r["what"].startswith("fa3_fp8 whole")), {})
        jit = next((r for r in rows if r["what"].endswith("Triton's own launch path")), {})
        cud = next((r for r in rows if r["what"].startswith("fp8_cudnn whole")), {})
        fmt = lambda v, w, p=3: f"{v:{w}.{p}f}" if v else f"{'-':>{w}s}"  # noqa: E731
        n_launch = lambda r: (r.get("launches") or {}).get("kernels")  # noqa: E731
        paths = "/".join("-" if n_launch(r) is None else str(n_launch(r)) for r in (run, cud))
        lines.append(f"{sname:7s}" + "".join(cells) + fmt(tq.get("ms"), 10) + fmt(tq.get("floor_ms"), 7) +
                     fmt(pq.get("ms"), 7) + fmt(run.get("host_us"), 8, 0) + fmt(n_launch(tq), 9, 0) +
                     fmt(tq.get("host_us"), 7, 0) + fmt(jit.get("host_us"), 6, 0) + fmt(cud.get("host_us"), 7, 0) +
                     f"{paths:>7s}")
    lines += ["", f"{'rel L2 %':16s}" + "".join(f"{c:>7s}" for c, *_ in ERR_COLS)]
    for key in dict.fromkeys((r["shape"], r["inputs"]) for r in result["errors"]):
        rows = [r for r in result["errors"] if (r["shape"], r["inputs"]) == key]
        cells = []
        for _, path, gran, smooth in ERR_COLS:
            r = next((r for r in rows if r["path"] == path and r.get("granularity") == gran
                      and r.get("smooth_k") == smooth), None)
            val = None if r is None else r.get("rel_l2_worst_head" if key[1] == "quiet_heads" else "rel_l2")
            cells.append(f"{100 * val:7.2f}" if val is not None else f"{'-':>7s}")
        label = "quiet(w)" if key[1] == "quiet_heads" else key[1]
        lines.append(f"{key[0]:6s} {label:8s} " + "".join(cells))
    for row in result["auto"]:
        lines.append(f"AUTO {row['shape']}: {row.get('picks', row['status'])}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny CPU shapes: the reference math and interpreter")
    args = ap.parse_args(argv)
    if args.cpu_dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    t_start = time.perf_counter()
    cuda = torch.cuda.is_available() and not args.cpu_dry_run
    device = torch.device("cuda" if cuda else "cpu")
    shapes = GPU_SHAPES if cuda else CPU_SHAPES
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "fp8_gpu.json")
    inputs = {"k_bias": K_BIAS, "heavy_channels": HEAVY_CHANNELS, "heavy_factor": HEAVY_FACTOR,
              "quiet_decades": QUIET_DECADES, "block": BLOCK}
    result = {"env": environment(device), "inputs": inputs, "errors": [], "timing": [], "auto": [], "skipped": []}
    print(json.dumps(result["env"], indent=1, default=str))
    for sname, shape in shapes.items():
        if time.perf_counter() - t_start > TOTAL_BUDGET_S:
            result["skipped"].append(f"{sname}: time budget of {TOTAL_BUDGET_S} s spent")
            continue
        print(f"== {sname} {shape[:4]} ({time.perf_counter() - t_start:.0f} s)", flush=True)
        plans = None
        for kind in KINDS:
            bnhd, views = make_inputs(shape, kind, device, seed=len(sname))
            call = AttentionCall(*views, None, shape[3] ** -0.5)
            ref = autotune.reference_slice(call)
            if plans is None:
                plans = cudnn_plans(call)
            result["errors"] += error_section(sname, kind, call, ref, plans)
            if kind == "random":
                result["timing"] += timing_section(sname, shape, call, device, plans)
                if cuda and sname in AUTO_SHAPES and time.perf_counter() - t_start < TOTAL_BUDGET_S - 30:
                    result["auto"].append(auto_section(sname, bnhd))
            del bnhd, views, call, ref
            if cuda:
                torch.cuda.empty_cache()
        with open(path, "w") as f:
            json.dump(result, f, indent=1, default=str)
    result["total_s"] = time.perf_counter() - t_start
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(table(result))
    print(f"wrote {path} ({result['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
