#!/usr/bin/env python
"""The executor on the GPUs of one host: detection, parallel_execute, split_execute, scaling, replicas.

Run on a machine with two (or more) CUDA GPUs (written for the lent nvidia-h100-x2 / nvidia-h200-x2;
NVLink multicast stays off: scripts/gpu/setup.sh exports NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1 and this script refuses to run without them;
nothing here uses NCCL). Workloads, bf16:

* ``flux_attention``: ``genesis_core.attention`` on Flux-sized calls, 24 heads x 4608 tokens x 128 per item;
* ``cross_attention``: the spec's ``CrossAttentionModule`` (SDXL sizes: 4096 image tokens x 640, 77 text
  tokens x 2048, 10 heads), built on the CPU and captured by ``fn``: the executor runs it from per-device
  replicas;
* ``flux_blocks``: four Flux-sized transformer blocks (attention + MLP, ~0.9 GB of bf16 weights) built on
  the CPU and captured by ``fn``, for the replicas' first-call vs steady-state times.

For each: the two-GPU result against one GPU's result for the same batch (bf16 tolerance) and against a
float32 reference on a slice; wall time of one GPU alone vs the batch split over both, interleaved rounds,
medians, every device synchronised: (a) ``parallel_execute`` with each half already on its GPU and the
results left there, (b) ``split_execute`` of a batch that lives on cuda:0, gathered back on cuda:0 (so the
cross-GPU copies count); then CPU + cuda:0 + cuda:1 by measured throughput against the two GPUs alone.

Usage (repo root, after ``source scripts/gpu/setup.sh``): ``python scripts/gpu/multigpu.py``
(``--cpu-dry-run``: the same logic on a CPU box, with CPU workers named cuda:0 / cuda:1 and small sizes).
Writes ``$OUT/multigpu.json`` when ``$OUT`` is set; exits non-zero when a result is wrong.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import genesis_core  # noqa: E402
from genesis_core._device import synchronize  # noqa: E402
from genesis_core.attn.modules import CrossAttentionModule  # noqa: E402
from genesis_core.bench import FluxLikeBlock  # noqa: E402
from genesis_core.compute import ComputeBackend, HeterogeneousExecutor, detect_backends  # noqa: E402

DRY = "--cpu-dry-run" in sys.argv
REPORT = {"checks": [], "scaling": [], "three_way": [], "replicas": []}
FAILED = []


def say(ok, name, **detail):
    REPORT["checks"].append({"check": name, "ok": bool(ok), **detail})
    if not ok:
        FAILED.append(name)
    print(f"{'PASS' if ok else 'FAIL'}  {name}  {json.dumps(detail, default=str)[:400]}", flush=True)


def sync_all(devices):
    for d in devices:
        synchronize(d)


def rel_err(a, b):
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def environment(devices):
    env = {"date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "torch": torch.__version__,
           "cuda": torch.version.cuda, "python": sys.version.split()[0],
           "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
           "gpus": [torch.cuda.get_device_name(d) for d in devices if d.type == "cuda"],
           "nvls_off": {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                                       "NVSHMEM_DISABLE_NVLS")}}
    if not DRY:
        env["peer_access_0_1"] = torch.cuda.can_device_access_peer(0, 1)
        try:
            env["topology"] = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True,
                                             timeout=30).stdout.strip()
        except Exception as exc:  # noqa: BLE001
            env["topology"] = f"nvidia-smi topo failed: {exc}"
        # cuda:0 -> cuda:1 copy bandwidth (1 GiB; bytes moved once), what the gathered split pays for
        src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda:0")
        dst = torch.empty(1 << 30, dtype=torch.uint8, device="cuda:1")
        times = []
        for _ in range(6):
            sync_all(DEVICES)
            t0 = time.perf_counter()
            dst.copy_(src)
            sync_all(DEVICES)
            times.append(time.perf_counter() - t0)
        env["copy_0_to_1_GBps"] = round((1 << 30) / statistics.median(times[1:]) / 1e9, 1)
        del src, dst
    return env


def timed_rounds(fns, devices, rounds, warmup=2):
    """{name: median ms}: every fn once per round, order rotating, all devices synchronised around each."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    sync_all(devices)
    samples = {n: [] for n in fns}
    items = list(fns.items())
    for r in range(rounds):
        for n, f in items[r % len(items):] + items[:r % len(items)]:
            sync_all(devices)
            t0 = time.perf_counter()
            f()
            sync_all(devices)
            samples[n].append((time.perf_counter() - t0) * 1e3)
    return {n: statistics.median(v) for n, v in samples.items()}, {n: len(v) for n, v in samples.items()}


def halves(t, d0, d1):
    n = t.shape[0] // 2
    return t[:n].to(d0), t[n:].to(d1)


def workload_flux_attention(batch, g):
    h, n, d = (24, 4608, 128) if not DRY else (4, 256, 64)
    q, k, v = (torch.randn(batch, h, n, d, generator=g).to(DTYPE) for _ in range(3))
    fn = lambda q, k, v: genesis_core.attention(q, k, v)  # noqa: E731

    def ref(inputs):  # float32 math on item 0, first 2 heads, first 512 queries
        q, k, v = (t[:1, :2].float().cpu() for t in inputs)
        q = q[:, :, :512]
        return torch.softmax(q @ k.transpose(-1, -2) * d ** -0.5, dim=-1) @ v, (slice(0, 1), slice(0, 2), slice(0, 512))
    return fn, (q, k, v), ref, f"{batch}x{h}x{n}x{n}x{d}"


def workload_cross_attention(batch, g):
    nq, dq, m, dc, heads = (4096, 640, 77, 2048, 10) if not DRY else (256, 64, 77, 96, 4)
    module = CrossAttentionModule(dq, dc, heads).to(DTYPE).eval()  # lives on the CPU; the executor replicates it
    x = torch.randn(batch, nq, dq, generator=g).to(DTYPE)
    ctx = torch.randn(batch, m, dc, generator=g).to(DTYPE)
    fn = lambda x, c: module(x, c)  # noqa: E731

    def ref(inputs):
        m32 = CrossAttentionModule(dq, dc, heads, backend="pytorch").float().eval()
        m32.load_state_dict({k: t.float() for k, t in module.state_dict().items()})
        with torch.no_grad():
            return m32(inputs[0][:2].float().cpu(), inputs[1][:2].float().cpu()), (slice(0, 2),)
    return fn, (x, ctx), ref, f"{batch}x{nq}x{dq} <- {m}x{dc}, {heads} heads", module


def check_and_scale(ex, name, fn, inputs, ref, label, d0, d1, rounds):
    inputs0 = tuple(t.to(d0) for t in inputs)
    with torch.no_grad():
        single = ex.execute_on_backend("cuda:0", fn, *inputs0)
        parts = [halves(t, d0, d1) for t in inputs0]
        split0, split1 = (tuple(p[i] for p in parts) for i in (0, 1))
        par = ex.parallel_execute(fn, [split0, split1], ["cuda:0", "cuda:1"], return_device=None)
        gathered = ex.split_execute(fn, inputs0, ["cuda:0", "cuda:1"])
        sync_all(DEVICES)
        plan = ex.split_plan(fn, inputs0, ["cuda:0", "cuda:1"])
        par_cat = torch.cat([par[0].to(d0), par[1].to(d0)])
        r, idx = ref(inputs)
        e_ref = rel_err(single[idx], r)
        e_par, e_gath = rel_err(par_cat, single), rel_err(gathered, single)
        tol = 2e-2 if DTYPE == torch.bfloat16 else 1e-4
        where = sorted({str(par[0].device), str(par[1].device)})
        say(e_par <= tol and e_gath <= tol and e_ref <= tol and gathered.device == single.device
            and where == sorted({str(d0), str(d1)}),
            f"{name}: two GPUs equal one GPU", shape=label, rel_err_parallel_vs_single=e_par,
            rel_err_split_vs_single=e_gath, rel_err_single_vs_fp32_ref=e_ref, tolerance=tol, halves_on=where,
            split_plan=plan, gathered_on=str(gathered.device))
        del single, par, gathered, par_cat
        fns = {
            "one GPU (cuda:0)": lambda: ex.execute_on_backend("cuda:0", fn, *inputs0),
            "parallel_execute, halves resident": lambda: ex.parallel_execute(
                fn, [split0, split1], ["cuda:0", "cuda:1"], return_device=None),
            "split_execute from cuda:0, gathered": lambda: ex.split_execute(fn, inputs0, ["cuda:0", "cuda:1"]),
        }
        ms, n = timed_rounds(fns, DEVICES, rounds)
    base = ms["one GPU (cuda:0)"]
    row = {"workload": name, "shape": label, "ms": {k: round(v, 3) for k, v in ms.items()}, "reps": n,
           "speedup": {k: round(base / v, 3) for k, v in ms.items() if k != "one GPU (cuda:0)"}}
    REPORT["scaling"].append(row)
    print(f"      {name} {label}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items())
          + " | speedup " + ", ".join(f"{k}: x{v}" for k, v in row["speedup"].items()), flush=True)
    return row


def three_way(ex, name, fn, inputs, d0, calls):
    """CPU + cuda:0 + cuda:1 by measured throughput vs cuda:0 + cuda:1, same batch on cuda:0, interleaved."""
    inputs0 = tuple(t.to(d0) for t in inputs)
    three, two = ["cpu", "cuda:0", "cuda:1"], ["cuda:0", "cuda:1"]
    with torch.no_grad():
        t0 = time.perf_counter()
        plan_first = ex.split_plan(fn, inputs0, three)  # calibrates each worker alone
        calib_s = time.perf_counter() - t0
        ex.split_plan(fn, inputs0, two)
        walls3, walls2, plans = [], [], []
        for i in range(calls):
            for which, names, walls in ((3, three, walls3), (2, two, walls2)) if i % 2 == 0 else \
                                       ((2, two, walls2), (3, three, walls3)):
                if which == 3:
                    plans.append(ex.split_plan(fn, inputs0, three))
                sync_all(DEVICES)
                t0 = time.perf_counter()
                out = ex.split_execute(fn, inputs0, names)
                sync_all(DEVICES)
                walls.append((time.perf_counter() - t0) * 1e3)
        ref = ex.split_execute(fn, inputs0, two)
        e = rel_err(out, ref)
    steady3, steady2 = statistics.median(walls3[-5:]), statistics.median(walls2[-5:])
    row = {"workload": name, "calibration_s": round(calib_s, 2), "first_plan": plan_first, "last_plan": plans[-1],
           "walls_three_ms": [round(w, 2) for w in walls3], "walls_two_ms": [round(w, 2) for w in walls2],
           "steady_three_ms": round(steady3, 3), "steady_two_ms": round(steady2, 3), "rel_err_vs_two": e}
    REPORT["three_way"].append(row)
    tol = 2e-2 if DTYPE == torch.bfloat16 else 1e-4
    say(e <= tol and steady3 <= steady2 * 1.05, f"{name}: CPU + cuda:0 + cuda:1 never slower than the two GPUs",
        first_plan=plan_first, last_plan=plans[-1], steady_three_ms=row["steady_three_ms"],
        steady_two_ms=row["steady_two_ms"], first_calls_three_ms=row["walls_three_ms"][:4],
        note="target: steady state within 5% (timing noise) of the two GPUs alone")


def replicas(d0, d1, g, rounds):
    blocks = 4 if not DRY else 2
    heads, hd, n, batch = (24, 128, 4608, 4) if not DRY else (4, 16, 128, 4)
    model = nn.Sequential(*[FluxLikeBlock(heads, hd, genesis_core.attention) for _ in range(blocks)]).to(DTYPE).eval()
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ex = HeterogeneousExecutor()
    for d, name in ((d0, "cuda:0"), (d1, "cuda:1")):
        register(ex, d, name)
    x = torch.randn(batch, n, heads * hd, generator=g).to(DTYPE)
    a, b = halves(x, d0, d1)
    fn = lambda t: model(t)  # noqa: E731
    with torch.no_grad():
        sync_all(DEVICES)
        t0 = time.perf_counter()
        out = ex.parallel_execute(fn, [a, b], ["cuda:0", "cuda:1"], return_device=None)
        sync_all(DEVICES)
        first = (time.perf_counter() - t0) * 1e3
        copies_first = ex._replicas.copies
        steady, _ = timed_rounds({"steady": lambda: ex.parallel_execute(fn, [a, b], ["cuda:0", "cuda:1"],
                                                                         return_device=None)}, DEVICES, rounds)
        copies_after = ex._replicas.copies
        single = ex.execute_on_backend("cuda:0", fn, x.to(d0))  # the whole batch on one GPU
        e = rel_err(torch.cat([out[0].to(d0), out[1].to(d0)]), single)
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    n_tensors = sum(1 for _ in model.parameters()) + sum(1 for _ in model.buffers())
    row = {"model": f"{blocks} Flux-sized blocks ({nbytes / 2**20:.0f} MiB bf16), built on the CPU",
           "batch": f"{batch}x{n}x{heads * hd}", "first_call_ms": round(first, 2),
           "steady_ms": round(steady["steady"], 3), "tensor_copies_first_call": copies_first,
           "tensor_copies_after_steady": copies_after, "model_tensors": n_tensors,
           "user_model_still_on_cpu": on_cpu, "rel_err_vs_one_gpu": e}
    REPORT["replicas"].append(row)
    say(copies_after == copies_first and (DRY or 0 < copies_first <= 2 * n_tensors) and on_cpu and e <= 2e-2,
        "replicas: copied to each GPU once, reused", **row)


def register(ex, d, name):
    if DRY:
        ex.register_backend(ComputeBackend.CPU, name=name)
    else:
        ex.register_backend(ComputeBackend.CUDA, d, name=name)


def main():
    global DEVICES, DTYPE
    need = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    if not DRY and any(os.environ.get(k) != v for k, v in need.items()):
        print("FAIL  NVLink multicast must stay off: source scripts/gpu/setup.sh first", need)
        return 2
    if DRY:
        DEVICES, DTYPE = [torch.device("cpu")] * 2, torch.float32
    else:
        if torch.cuda.device_count() < 2:
            print(f"FAIL  needs two CUDA GPUs; torch sees {torch.cuda.device_count()}")
            return 2
        DEVICES, DTYPE = [torch.device("cuda:0"), torch.device("cuda:1")], torch.bfloat16
    d0, d1 = DEVICES
    env = environment(DEVICES)
    REPORT["environment"] = env
    print(json.dumps({k: v for k, v in env.items() if k != "topology"}), "\n" + str(env.get("topology", "")), flush=True)
    cuda = detect_backends()[ComputeBackend.CUDA]
    print("detection:", cuda.describe(), flush=True)
    if not DRY:
        say({"cuda:0", "cuda:1"} <= set(cuda.devices), "detection lists cuda:0 and cuda:1", devices=cuda.devices)
    ex = HeterogeneousExecutor()
    for d, name in zip(DEVICES, ("cuda:0", "cuda:1")):
        register(ex, d, name)
    ex.register_backend(ComputeBackend.CPU, name="cpu")
    say(set(ex.registered()) >= {"cuda:0", "cuda:1", "cpu"}, "registered cuda:0, cuda:1 and cpu",
        workers=ex.registered(), devices={w: str(ex.device_of(w)) for w in ex.registered()})
    g = torch.Generator().manual_seed(0)
    rounds = 5 if DRY else 15
    steps = [
        ("flux_attention B=4", lambda: check_and_scale(ex, "flux_attention", *workload_flux_attention(4, g), d0, d1, rounds)),
        ("flux_attention B=16", lambda: check_and_scale(ex, "flux_attention", *workload_flux_attention(16, g), d0, d1, rounds)),
        ("flux_attention B=32", lambda: check_and_scale(ex, "flux_attention", *workload_flux_attention(32, g), d0, d1, rounds)),
    ]
    for b in (64, 256):
        cross = workload_cross_attention(b, g)
        steps.append((f"cross_attention B={b}", lambda c=cross: check_and_scale(ex, "cross_attention", *c[:4], d0, d1, rounds)))
    steps.append(("replicas", lambda: replicas(d0, d1, g, rounds)))
    small = workload_cross_attention(16, g)
    steps.append(("three-way cross_attention", lambda: three_way(ex, "cross_attention B=16", small[0], small[1], d0, 8)))
    fa = workload_flux_attention(8, g)
    steps.append(("three-way flux_attention", lambda: three_way(ex, "flux_attention B=8", fa[0], fa[1], d0, 6)))
    for label, step in steps:
        t0 = time.perf_counter()
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - record and go on
            say(False, label, error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc()[-2000:])
        print(f"      ({label}: {time.perf_counter() - t0:.1f} s)", flush=True)
        if not DRY:
            torch.cuda.empty_cache()
    REPORT["executor_stats"] = ex.stats()
    # the throughput fits (time = a + b * rows) each split measured, worker alone: a and b in ms
    REPORT["solo_fits_ms"] = [{w: [round(a * 1e3, 4), round(b * 1e3, 4)] for w, (a, b) in fits.items()}
                              for fits in ex._planner.solo_fits()]
    print("solo fits (a, b) ms:", REPORT["solo_fits_ms"])
    REPORT["failed"] = FAILED
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "multigpu.json"), "w") as f:
            json.dump(REPORT, f, indent=1, default=str)
    print("FAILED:" if FAILED else "all checks passed", FAILED if FAILED else "", flush=True)
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
