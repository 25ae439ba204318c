#!/usr/bin/env python
"""GPU checks for the heterogeneous executor (run on the lent GPU; exits non-zero on a wrong result).

Checks: detection; CUDA execute (host data in/out, results back where they came from); the spec's
integration closure over a CPU model run on CUDA (device replicas) and on CPU at the same time
(parallel_execute); place(); split_execute CPU+CUDA against each device alone (timings); ONNX Runtime's
CUDA provider with CUDA tensors bound by pointer, and with a model that lives on CUDA; WebGPU through
ONNX Runtime and/or wgpu when an adapter initialises. Then the executor benchmark rows.

Usage (repo root):  python scripts/gpu/executor_gpu.py [--quick]
(``--cpu-dry-run`` runs the same logic on a CPU box with a CPU worker named "cuda", to test the script.)
WebGPU through onnxruntime-webgpu, which cannot share a site-packages with onnxruntime(-gpu): unpack the
wheel into a folder (``pip install --no-deps --target DIR onnxruntime_webgpu-*.whl``) and set
``GENESIS_ORT_WEBGPU_DIR=DIR``; the WebGPU section then also runs in a child interpreter with DIR first on
its path. Vulkan loaders and ``VK_DRIVER_FILES`` must be set up as the device README describes.
Writes ``$OUT/executor_gpu.json`` when ``$OUT`` is set.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from genesis_core.compute import (ComputeBackend, HeterogeneousExecutor, current_worker,  # noqa: E402
                                  detect_backends)
from genesis_core.compute.bench import BenchCrossAttention, _median_ms  # noqa: E402

RESULTS = []


def check(name, fn):
    """Run one check; fn returns (ok, detail dict). Exceptions are failures."""
    t0 = time.perf_counter()
    try:
        ok, detail = fn()
    except Exception as exc:  # record, keep going
        ok, detail = False, {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-1500:]}
    detail["s"] = round(time.perf_counter() - t0, 3)
    RESULTS.append({"check": name, "ok": bool(ok), **detail})
    short = {k: v for k, v in detail.items() if k != "trace"}
    print(f"{'PASS' if ok else 'FAIL'}  {name:55} {json.dumps(short, default=str)[:300]}", flush=True)


def ref64(model, x, ctx):
    m = BenchCrossAttention().double().eval()
    m.load_state_dict({k: v.detach().double().cpu() for k, v in model.state_dict().items()})
    with torch.no_grad():
        return m(x.double().cpu(), ctx.double().cpu())


def err(a, b):
    return (a.detach().double().cpu() - b.double().cpu()).abs().max().item()


def webgpu_checks():
    found = detect_backends()[ComputeBackend.WEBGPU]
    print(f"webgpu detection: {found.describe()} details={found.details}")
    q, k, v = torch.randn(2, 8, 256, 64), torch.randn(2, 8, 77, 64), torch.randn(2, 8, 77, 64)
    r = torch.softmax(q.double() @ k.double().transpose(-1, -2) / 8.0, dim=-1) @ v.double()
    if found.details.get("onnxruntime_ep"):
        def ort_webgpu():
            ex = HeterogeneousExecutor()
            ex.register_backend(ComputeBackend.WEBGPU)
            fn = lambda a, b, c: torch.softmax(a @ b.transpose(-1, -2) / 8.0, dim=-1) @ c  # noqa: E731
            out = ex.execute_on_backend(ComputeBackend.WEBGPU, fn, q, k, v)
            ms = _median_ms(lambda: ex.execute_on_backend(ComputeBackend.WEBGPU, fn, q, k, v), 10)
            e = err(out, r)
            return e < 1e-4, {"max_abs_err": e, "ms": round(ms, 3), **{k2: v2 for k2, v2 in ex.stats()["webgpu"].items()
                                                                      if k2 in ("exports", "active_providers")}}
        check("webgpu: softmax(QK^T)V via ORT WebGpuExecutionProvider", ort_webgpu)
    else:
        RESULTS.append({"check": "webgpu: ORT WebGpuExecutionProvider", "ok": True, "skipped":
                        "; ".join(found.details.get("routes_missing", [])) or found.reason})
        print("SKIP  webgpu via ONNX Runtime:", RESULTS[-1]["skipped"])
    info = found.details.get("wgpu")
    if info:
        def wgsl():
            from genesis_core.compute import webgpu
            out = webgpu.scaled_dot_product_attention(q, k, v)
            e = err(out, r)
            return e < 1e-5, {"max_abs_err": e, "adapter": info.get("device"), "type": info.get("adapter_type")}
        check("webgpu: WGSL attention via wgpu", wgsl)
    else:
        RESULTS.append({"check": "webgpu: wgpu", "ok": True, "skipped": "no wgpu adapter"})
        print("SKIP  webgpu via wgpu: no adapter")


def main(argv):
    quick = "--quick" in argv
    if "--webgpu-only" in argv:
        webgpu_checks()
        return finish("executor_gpu_webgpu.json")
    print(f"torch {torch.__version__}, cuda {torch.version.cuda}, python {sys.version.split()[0]}")
    for status in detect_backends().values():
        print("  ", status.describe())
    dry = "--cpu-dry-run" in argv  # exercise this script's logic on a CPU box: a CPU worker named "cuda"
    if not torch.cuda.is_available() and not dry:
        print("FAIL  CUDA is not available on this machine; nothing to check")
        return 2
    torch.manual_seed(0)
    ex = HeterogeneousExecutor()
    if dry:
        ex.register_backend(ComputeBackend.CPU, name="cuda")
        dev = torch.device("cpu")
    else:
        ex.register_backend(ComputeBackend.CUDA, torch.device("cuda:0"))
        dev = torch.device("cuda:0")
    ex.register_backend(ComputeBackend.CPU, torch.device("cpu"))

    def cuda_execute():
        x = torch.randn(100, 100)
        seen = {}

        def fn(t):
            seen["device"], seen["worker"] = str(t.device), current_worker()
            return t * 2 + 1
        out = ex.execute_on_backend(ComputeBackend.CUDA, fn, x)
        out_gpu = ex.execute_on_backend(ComputeBackend.CUDA, fn, x.to(dev))
        e = err(out, x.double() * 2 + 1)
        ok = (seen == {"device": str(dev), "worker": "cuda"} and out.device.type == "cpu"
              and out_gpu.device.type == dev.type and e < 1e-6)
        return ok, {"ran_on": seen, "returned_to": str(out.device), "max_abs_err": e}
    check("cuda: execute_on_backend, host data in and out", cuda_execute)

    model = BenchCrossAttention().eval()

    class Node:  # the spec's integration example: the closure reaches the model through self
        def __init__(self):
            self.cross_attn = model

        def execute(self, backend, img, txt):
            def process(img_feat, txt_emb):
                return self.cross_attn.forward(img_feat, txt_emb)
            return ex.execute_on_backend(backend, process, img, txt)

    node = Node()
    x, ctx = torch.randn(2, 256, 512), torch.randn(2, 77, 768)
    r = ref64(model, x, ctx)

    def closure_on_cuda():
        with torch.no_grad():
            out = node.execute(ComputeBackend.CUDA, x, ctx)
        e = err(out, r)
        still_cpu = all(p.device.type == "cpu" for p in model.parameters())
        return e < 1e-4 and still_cpu and out.device.type == "cpu", {"max_abs_err": e, "model_left_on_cpu": still_cpu}
    check("cuda: spec closure over a CPU model (device replicas)", closure_on_cuda)

    def parallel_same_closure():
        xs = [torch.randn(2, 256, 512) for _ in range(4)]
        cs = [torch.randn(2, 77, 768) for _ in range(4)]
        fn = lambda a, b: node.cross_attn(a, b)  # noqa: E731
        with torch.no_grad():
            outs = ex.parallel_execute(fn, list(zip(xs, cs)), ["cpu", "cuda", "cpu", "cuda"])
        errs = [err(o, ref64(model, a, b)) for o, a, b in zip(outs, xs, cs)]
        return max(errs) < 1e-4, {"max_abs_err": max(errs)}
    check("parallel_execute: one closure on CPU and CUDA at once", parallel_same_closure)

    def place_module():
        m2 = BenchCrossAttention().eval()
        m2.load_state_dict(model.state_dict())
        ex.place(m2, ComputeBackend.CUDA)
        before = ex._replicas.copies
        with torch.no_grad():
            out = ex.execute_on_backend(ComputeBackend.CUDA, m2, x, ctx)
        e = err(out, r)
        return e < 1e-4 and ex._replicas.copies == before, {"max_abs_err": e, "param_device": str(next(m2.parameters()).device)}
    check("place(): model moved for good, no replicas", place_module)

    def split_vs_alone():
        batch = 16 if quick else 32
        xb, cb = torch.randn(batch, 256, 512), torch.randn(batch, 77, 768)
        rb = ref64(model, xb, cb)
        reps = 5 if quick else 20
        with torch.no_grad():
            out = ex.split_execute(model, (xb, cb), ["cpu", "cuda"])  # calibrates
            plan = ex.split_plan(model, (xb, cb), ["cpu", "cuda"])
            split_ms = _median_ms(lambda: ex.split_execute(model, (xb, cb), ["cpu", "cuda"]), reps)
            cuda_ms = _median_ms(lambda: ex.execute_on_backend("cuda", model, xb, cb), reps, device=dev)
            cpu_ms = _median_ms(lambda: ex.execute_on_backend("cpu", model, xb, cb), max(2, reps // 4))
        e = err(out, rb)
        fastest = min(cuda_ms, cpu_ms)
        return e < 1e-4, {"max_abs_err": e, "rows": plan, "split_ms": round(split_ms, 3),
                          "cuda_alone_ms": round(cuda_ms, 3), "cpu_alone_ms": round(cpu_ms, 3),
                          "split_vs_fastest": round(fastest / split_ms, 3)}
    check("split_execute cpu+cuda vs each alone (host data)", split_vs_alone)

    found = detect_backends()
    providers = found[ComputeBackend.ONNX].devices if found[ComputeBackend.ONNX].available else []
    print("onnxruntime providers:", providers, found[ComputeBackend.ONNX].details)
    if "CUDAExecutionProvider" in providers and not dry:
        def onnx_cuda():
            ex.register_backend(ComputeBackend.ONNX, name="onnx-cuda",
                                providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
                                provider_options=[{"device_id": 0}, {}])
            xg, cg = x.to(dev), ctx.to(dev)
            out = ex.execute_on_backend("onnx-cuda", model, xg, cg)
            with torch.no_grad():
                ort_ms = _median_ms(lambda: ex.execute_on_backend("onnx-cuda", model, xg, cg), 30, device=dev)
                gm = BenchCrossAttention().eval().to(dev)
                gm.load_state_dict(model.state_dict())
                torch_ms = _median_ms(lambda: gm(xg, cg), 30, device=dev)
            s = ex.stats()["onnx-cuda"]
            e = err(out, r)
            ok = e < 1e-4 and out.device.type == "cuda" and s["active_providers"][:1] == ["CUDAExecutionProvider"]
            return ok, {"max_abs_err": e, "ort_cuda_ms": round(ort_ms, 3), "torch_cuda_ms": round(torch_ms, 3),
                        "exports": s["exports"], "active_providers": s["active_providers"]}
        check("onnx: CUDA execution provider, CUDA tensors bound", onnx_cuda)

        def onnx_model_on_cuda():
            gm = BenchCrossAttention().eval().to(dev)
            gm.load_state_dict(model.state_dict())
            out = ex.execute_on_backend("onnx-cuda", lambda a, b: gm(a, b), x, ctx)
            e = err(out, r)
            return e < 1e-4 and out.device.type == "cpu", {"max_abs_err": e}
        check("onnx: export of a model that lives on CUDA", onnx_model_on_cuda)
    else:
        RESULTS.append({"check": "onnx CUDA EP", "ok": True, "skipped": f"providers {providers}"})
        print("SKIP  onnx CUDA EP: not in", providers)

    def onnx_cpu_with_cuda_inputs():
        ex.register_backend(ComputeBackend.ONNX)
        out = ex.execute_on_backend("onnx", model, x.to(dev), ctx.to(dev))
        e = err(out, r)
        return e < 1e-4 and out.device.type == dev.type, {"max_abs_err": e, "returned_to": str(out.device)}
    if found[ComputeBackend.ONNX].available:
        check("onnx: CPU provider, CUDA inputs come back to CUDA", onnx_cpu_with_cuda_inputs)

    webgpu_checks()
    extra_dir = os.environ.get("GENESIS_ORT_WEBGPU_DIR")
    if extra_dir:
        env = dict(os.environ, PYTHONPATH=extra_dir + os.pathsep + os.environ.get("PYTHONPATH", ""))
        print(f"--- WebGPU in a child interpreter with {extra_dir} first on the path")
        rc = subprocess.run([sys.executable, os.path.abspath(__file__), "--webgpu-only"], env=env).returncode
        RESULTS.append({"check": "webgpu child (onnxruntime-webgpu)", "ok": rc == 0, "rc": rc})

    print("--- executor benchmark rows")
    from genesis_core.compute.bench import run_executor_bench
    try:
        bench_rows = run_executor_bench(quick=quick or dry)
    except Exception as exc:
        bench_rows = [{"error": f"{type(exc).__name__}: {exc}"}]
        print("bench failed:", exc)
    return finish("executor_gpu.json", bench_rows, ex.stats())


def finish(filename, bench_rows=None, stats=None):
    failed = [r for r in RESULTS if not r["ok"]]
    print(f"--- {len(RESULTS) - len(failed)} passed, {len(failed)} failed")
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, filename), "w") as fh:
            json.dump({"torch": torch.__version__, "cuda": torch.version.cuda,
                       "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                       "results": RESULTS, "bench": bench_rows, "stats": stats}, fh, indent=1, default=str)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
