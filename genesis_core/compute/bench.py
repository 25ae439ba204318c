"""Executor micro-benchmarks: the rows ``python -m genesis_core bench`` prints in its executor section.

* per-call overhead of ``execute_on_backend`` on CPU against calling ``fn`` directly (a tiny op, so the
  executor's own cost is what shows), plain and with a captured model (placement discovery);
* ONNX Runtime (CPU provider) against PyTorch CPU for a cross-attention block ([2,256,512] attending to
  [2,77,768], 8 heads), with the export time and the numeric difference;
* with CUDA: CUDA alone, CPU alone, and ``split_execute`` over CPU+CUDA on a larger batch; ONNX Runtime's
  CUDA provider when present.

Medians of repeated calls after warm-up; CUDA timings synchronise. Run standalone with
``python -m genesis_core.compute.bench [--quick]``.
"""
from __future__ import annotations

import statistics
import sys
import textwrap
import time
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backends import ComputeBackend, detect_backends
from .executor import HeterogeneousExecutor


class BenchCrossAttention(nn.Module):
    """Self-contained cross-attention block: q/k/v/out projections around ``F.scaled_dot_product_attention``."""

    def __init__(self, query_dim: int = 512, context_dim: int = 768, heads: int = 8) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(query_dim, query_dim, bias=False)
        self.to_k = nn.Linear(context_dim, query_dim, bias=False)
        self.to_v = nn.Linear(context_dim, query_dim, bias=False)
        self.to_out = nn.Linear(query_dim, query_dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        m = context.shape[1]
        q = self.to_q(x).view(b, n, self.heads, -1).transpose(1, 2)
        k = self.to_k(context).view(b, m, self.heads, -1).transpose(1, 2)
        v = self.to_v(context).view(b, m, self.heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


def _median_ms(fn: Callable[[], Any], reps: int, warmup: int = 3, device: Optional[torch.device] = None) -> float:
    def sync() -> None:
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _paired_ms(fa: Callable[[], Any], fb: Callable[[], Any], reps: int, warmup: int = 3) -> "tuple[float, float]":
    """Medians of ``fa`` and ``fb`` timed alternately, so machine noise hits both alike."""
    for _ in range(warmup):
        fa()
        fb()
    ta, tb = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        fa()
        t1 = time.perf_counter()
        fb()
        t2 = time.perf_counter()
        ta.append((t1 - t0) * 1e3)
        tb.append((t2 - t1) * 1e3)
    return statistics.median(ta), statistics.median(tb)


def _row(name: str, backend: str, ms: Optional[float], baseline_ms: Optional[float] = None, baseline: str = "",
         overhead: bool = False, **extra: Any) -> Dict[str, Any]:
    """One row. ``ms=None``: not measured (``note`` says why). ``overhead=True``: the row measures what the
    executor adds to ``baseline`` - it gets ``overhead_us`` and no ``speedup`` (a ratio of a tiny op's times
    says nothing); other comparisons get ``speedup`` = baseline_ms / ms (>1: faster than the baseline)."""
    row: Dict[str, Any] = {"section": "executor", "name": name, "backend": backend,
                           "ms": None if ms is None else round(ms, 4)}
    if baseline_ms is not None:
        row["baseline"] = baseline
        row["baseline_ms"] = round(baseline_ms, 4)
        if overhead:
            row["overhead_us"] = round((ms - baseline_ms) * 1e3, 2)
        elif ms is not None:
            row["speedup"] = round(baseline_ms / ms, 3) if ms > 0 else None
    row.update(extra)
    return row


def run_executor_bench(quick: bool = False, print_table: bool = True) -> List[Dict[str, Any]]:
    """Run the executor benchmarks; return one dict per row (and print a table unless ``print_table=False``).

    Row keys: ``section`` ("executor"), ``name``, ``backend``, ``ms`` (median per call; None when not
    measured, with the reason in ``note``), and where a comparison applies ``baseline``, ``baseline_ms`` and
    either ``overhead_us`` (the executor's per-call overhead rows) or ``speedup`` (baseline_ms / ms; >1 =
    faster than the baseline), plus extras such as ``max_abs_diff``, ``export_s``, ``rows``.
    """
    torch.manual_seed(0)
    reps = 20 if quick else 100
    rows: List[Dict[str, Any]] = []
    found = detect_backends()
    ex = HeterogeneousExecutor()
    ex.register_backend(ComputeBackend.CPU)

    # 1. per-call overhead on CPU, tiny op
    tiny = torch.randn(16)
    fn = lambda t: t * 2 + 1  # noqa: E731
    direct, via = _paired_ms(lambda: fn(tiny), lambda: ex.execute_on_backend(ComputeBackend.CPU, fn, tiny),
                             reps * 10)
    rows.append(_row("execute_on_backend overhead (x*2+1, 16 floats)", "cpu", via, direct, "fn(x) direct",
                     overhead=True))
    small = nn.Linear(16, 16)
    holder = type("Holder", (), {})()
    holder.model = small

    def closure(t: torch.Tensor) -> torch.Tensor:
        return holder.model(t)

    with torch.no_grad():
        direct, via = _paired_ms(lambda: closure(tiny),
                                 lambda: ex.execute_on_backend(ComputeBackend.CPU, closure, tiny), reps * 10)
    rows.append(_row("execute_on_backend overhead (closure over Linear 16)", "cpu", via, direct, "fn(x) direct",
                     overhead=True))

    # 2. ONNX Runtime CPU vs PyTorch CPU, cross-attention
    model = BenchCrossAttention().eval()
    x, ctx = torch.randn(2, 256, 512), torch.randn(2, 77, 768)
    with torch.no_grad():
        model64 = BenchCrossAttention().double().eval()
        model64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
        ref = model64(x.double(), ctx.double())
        torch_err = (model(x, ctx).double() - ref).abs().max().item()
    if found[ComputeBackend.ONNX].available:
        ex.register_backend(ComputeBackend.ONNX)
        t0 = time.perf_counter()
        out = ex.execute_on_backend(ComputeBackend.ONNX, model, x, ctx)
        first_s = time.perf_counter() - t0
        with torch.no_grad():  # blocks, not interleaved: alternating calls thrash caches for both
            torch_a = _median_ms(lambda: model(x, ctx), reps)
            onnx_ms = _median_ms(lambda: ex.execute_on_backend(ComputeBackend.ONNX, model, x, ctx), reps)
            torch_ms = min(torch_a, _median_ms(lambda: model(x, ctx), reps))
        s = ex.stats()["onnx"]
        rows.append(_row("cross-attn [2,256,512]x[2,77,768] h8", "onnx (CPU EP)", onnx_ms, torch_ms, "torch cpu",
                         max_abs_diff=float(f"{(out.double() - ref).abs().max().item():.3g}"),
                         torch_max_abs_diff=float(f"{torch_err:.3g}"),
                         export_s=round(s["export_s"], 3), first_call_s=round(first_s, 3)))
    else:
        with torch.no_grad():
            torch_ms = _median_ms(lambda: model(x, ctx), reps)
        rows.append(_row("cross-attn [2,256,512]x[2,77,768] h8", "onnx", None, torch_ms, "torch cpu",
                         note="skipped: " + (found[ComputeBackend.ONNX].reason or "ONNX Runtime not found")))

    # 3. CUDA: alone, CPU alone, split CPU+CUDA
    if found[ComputeBackend.CUDA].available or found[ComputeBackend.ROCM].available:
        rows.extend(_gpu_rows(ex, model, quick, found))
    else:
        rows.append(_row("split cpu+cuda", "-", None, note="skipped: " +
                         (found[ComputeBackend.CUDA].reason or "no CUDA")))
    if print_table:
        print_rows(rows)
    return rows


def _gpu_rows(ex: HeterogeneousExecutor, model: BenchCrossAttention, quick: bool,
              found: Dict[ComputeBackend, Any]) -> List[Dict[str, Any]]:
    rows: List[Dict[str, Any]] = []
    gpu = ComputeBackend.CUDA if found[ComputeBackend.CUDA].available else ComputeBackend.ROCM
    ex.register_backend(gpu)
    dev = ex.device_of(gpu)
    reps = 10 if quick else 30
    batch = 16 if quick else 32
    x, ctx = torch.randn(batch, 256, 512), torch.randn(batch, 77, 768)
    xg, ctxg = x.to(dev), ctx.to(dev)
    gpu_model = BenchCrossAttention().eval()
    gpu_model.load_state_dict(model.state_dict())
    ex.place(gpu_model, gpu)  # data and weights on the GPU: the fair "GPU alone" number
    with torch.no_grad():
        ref = model(x, ctx)
        gpu_ms = _median_ms(lambda: ex.execute_on_backend(gpu, gpu_model, xg, ctxg), reps, device=dev)
        cpu_ms = _median_ms(lambda: ex.execute_on_backend(ComputeBackend.CPU, model, x, ctx), max(3, reps // 5))
        # the split takes host tensors and the CPU-resident model: the CUDA worker uploads its share
        # (and uses cached weight copies), which is what a CPU+GPU split of host data really costs
        ex.split_execute(model, (x, ctx), [ComputeBackend.CPU, gpu])  # calibrate
        plan = ex.split_plan(model, (x, ctx), [ComputeBackend.CPU, gpu])
        split_ms = _median_ms(lambda: ex.split_execute(model, (x, ctx), [ComputeBackend.CPU, gpu]), reps)
        out = ex.split_execute(model, (x, ctx), [ComputeBackend.CPU, gpu])
        host_gpu_ms = _median_ms(lambda: ex.execute_on_backend(gpu, model, x, ctx), reps, device=dev)
    tag = f"cross-attn batch {batch}"
    rows.append(_row(f"{tag}, data+weights on GPU", gpu.value, gpu_ms))
    rows.append(_row(f"{tag}, host data in/out", gpu.value, host_gpu_ms))
    rows.append(_row(f"{tag}", "cpu", cpu_ms, host_gpu_ms, f"{gpu.value} host data"))
    rows.append(_row(f"{tag}, split_execute cpu+{gpu.value}", "cpu+" + gpu.value, split_ms, host_gpu_ms,
                     f"{gpu.value} alone (host data)", rows=plan,
                     max_abs_diff=float(f"{(out - ref).abs().max().item():.3g}")))
    ort_providers = found[ComputeBackend.ONNX].devices if found[ComputeBackend.ONNX].available else []
    if "CUDAExecutionProvider" in ort_providers and gpu is ComputeBackend.CUDA:
        try:
            ex.register_backend(ComputeBackend.ONNX, name="onnx-cuda",
                                providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
                                provider_options=[{"device_id": dev.index or 0}, {}])
            got = ex.execute_on_backend("onnx-cuda", model, xg, ctxg)
            ms = _median_ms(lambda: ex.execute_on_backend("onnx-cuda", model, xg, ctxg), reps, device=dev)
            rows.append(_row(f"{tag}, ONNX Runtime CUDA EP", "onnx-cuda", ms, gpu_ms, f"torch {gpu.value}",
                             max_abs_diff=float(f"{(got.cpu() - ref).abs().max().item():.3g}")))
        except Exception as exc:  # report, do not crash the whole bench
            rows.append(_row(f"{tag}, ONNX Runtime CUDA EP", "onnx-cuda", None,
                             note=f"failed: {type(exc).__name__}: {str(exc)[:120]}"))
    return rows


def print_rows(rows: List[Dict[str, Any]], width: int = 100) -> None:
    """Print rows in at most ``width`` columns: a row's name, backend and time, then an indented line with what
    it is compared with (the executor's overhead in µs, or the speed against the baseline) and its other
    details; a row that was not measured says why instead."""
    print(f"  {'row':<56} {'backend':<16} {'ms':>10}")
    for r in rows:
        ms = r.get("ms")
        print(_fit(f"  {r['name'][:56]:<56} {r['backend'][:16]:<16} {_ms(ms):>10}", width))
        if ms is None:
            detail = [r.get("note") or "not measured"]
        elif "overhead_us" in r:
            detail = [f"{r['overhead_us']:+.2f} us per call over {r['baseline']} ({_ms(r['baseline_ms'])} ms)"]
        elif r.get("speedup") is not None:
            detail = [f"x{r['speedup']:.3g} the speed of {r['baseline']} ({_ms(r['baseline_ms'])} ms)"]
        else:
            detail = []
        detail += [f"{k}={v}" for k, v in r.items() if k not in _SHOWN]
        if detail:
            print(_fit("      " + "; ".join(detail), width))


def _ms(ms: Optional[float]) -> str:
    return "-" if ms is None else f"{ms:.4g}"


_SHOWN = ("section", "name", "backend", "ms", "baseline", "baseline_ms", "speedup", "overhead_us", "note")


def _fit(line: str, width: int) -> str:
    if len(line) <= width:
        return line
    return "\n".join(textwrap.wrap(line, width=width, subsequent_indent=" " * 6, break_long_words=True,
                                   break_on_hyphens=False))


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    run_executor_bench(quick="--quick" in argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
