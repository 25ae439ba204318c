"""Where does the time of an FP8 attention call go? Device time per kernel and host time per call of the
``fa3_fp8`` and ``fp8_cudnn`` whole paths (quantise, attend, dequantise) on Flux and Wan 480p shapes, inputs as
ComfyUI makes them (contiguous [B, N, H, D], BHND views). About 20 s on the lent H200:

    PYTHONPATH=/tmp/site:$PWD python3 scripts/gpu/fp8_profile.py --out $OUT

Per backend and shape: the CUDA time of every kernel the call launches (torch.profiler, 10 calls), the
wall time per call back to back (what a model pays when the GPU is the bottleneck), and the host time per call
(the Python side alone: launches queued behind a ~1 s sleep kernel, so the GPU never waits for them; a path that
synchronises with the device waits for the sleep instead, and is reported as such). For ``fa3_fp8`` also the
host time of its two parts (the quantiser alone; FA3's FP8 call alone on quantised inputs) and the functions that
spend its host time (cProfile of 20 queued calls, by own time). Writes fp8_profile.json and prints a table.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _limits import kernel_times  # noqa: E402

from genesis_core.attn import registry  # noqa: E402
from genesis_core.attn.types import AttentionCall  # noqa: E402

SHAPES = {"flux": (1, 24, 4608, 128), "wan480": (1, 40, 32760, 128)}
BACKENDS = ("fa3_fp8", "fp8_cudnn", "fa3", "sdpa_cudnn")
CALLS = 10


def make_call(b, h, n, d):
    q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
    return AttentionCall(q, k, v, None, d ** -0.5)


def kernels(run, call):
    return kernel_times(lambda: run(call), CALLS)[:8]


def wall_ms(run, call, reps=20):
    for _ in range(3):
        run(call)
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        run(call)
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps


def host_us(run, call, reps=20):
    torch.cuda.synchronize()
    torch.cuda._sleep(int(2e9))  # ~1 s of GPU work in front: every launch below only queues
    t0 = time.perf_counter()
    for _ in range(reps):
        run(call)
    host = (time.perf_counter() - t0) / reps * 1e6
    torch.cuda.synchronize()
    return host


def host_parts(call):
    """fa3_fp8's host time split: the quantiser alone, FA3's FP8 call alone, and cProfile's top functions."""
    from genesis_core.attn.backends import fa3_fp8
    from genesis_core.attn.quant import fp8

    def quantize(c):
        return fp8.quantize_qkv(c.q, c.k, c.v, fa3_fp8.GRANULARITY, fa3_fp8.SMOOTH_K)

    qkv = quantize(call)
    parts = {"quantize_host_us": host_us(quantize, call),
             "attend_host_us": host_us(lambda c: fa3_fp8.attend(qkv, c.scale), call)}
    torch.cuda.synchronize()
    torch.cuda._sleep(int(2e9))
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(20):
        fa3_fp8.run(call)
    prof.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(14)
    parts["cprofile_top"] = buf.getvalue().splitlines()[-24:]
    return parts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=".")
    args = p.parse_args(argv)
    result, lines = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}, []
    for shape, dims in SHAPES.items():
        call = make_call(*dims)
        for name in BACKENDS:
            b = registry.get(name)
            why = b.available() or b.reason_for(call)
            if why is not None:
                lines.append(f"{shape:7s} {name:11s} not run: {why}")
                continue
            try:
                row = {"shape": shape, "backend": name, "wall_ms": wall_ms(b.run, call),
                       "host_us": host_us(b.run, call), "kernels": kernels(b.run, call)}
            except Exception as exc:  # noqa: BLE001 - report and go on
                lines.append(f"{shape:7s} {name:11s} failed: {type(exc).__name__}: {str(exc)[:120]}")
                continue
            if name == "fa3_fp8":
                try:
                    row["host_parts"] = host_parts(call)
                except Exception as exc:  # noqa: BLE001 - report and go on
                    row["host_parts"] = {"failed": f"{type(exc).__name__}: {str(exc)[:200]}"}
            result["rows"].append(row)
            row["waits_for_device"] = row["host_us"] * 20 > 0.25e6  # 20 calls took a good part of the sleep
            host = "waits for the device" if row["waits_for_device"] else f"{row['host_us']:7.1f} us"
            lines.append(f"{shape:7s} {name:11s} {row['wall_ms']:8.3f} ms/call back to back, host {host}")
            lines += [f"        {k['us_per_call']:9.1f} us x{k['calls']} {k['kernel']}" for k in row["kernels"]]
            hp = row.get("host_parts")
            if hp:
                lines += [f"        host parts: {k} = {v:.1f}" for k, v in hp.items() if isinstance(v, float)]
                lines += ["        " + x for x in hp.get("cprofile_top", [])]
                lines += [f"        {hp['failed']}"] if "failed" in hp else []
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "fp8_profile.json"), "w") as f:
        json.dump(result, f, indent=1)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
