"""Where do the SageAttention kernels (and the other lossy backends) write NaN or lose accuracy? A sweep of small
shapes on the lent H200 (about 30-60 s):

    PYTHONPATH=/tmp/site:/tmp/sage:$PWD python3 scripts/gpu/sage_edges.py --out $OUT

The first H200 runs (2026-12-01/02) saw NaN from ``sage2_fp16`` at q [1, 1, 1, 40], k/v [1, 1, 2, 40] and from
every SageAttention kernel with a single key; the third, with ``--heads 1``, from ``sage2_fp16`` now and then at
33-56 keys (two heads never showed it there: sweep both; ``--ignore-limits`` runs the cells a backend's declared
limits refuse, to check those limits again). For each backend that runs here and each (Nq, Nk, head_dim, dtype)
of a grid around the kernels' block sizes, this calls the backend's ``run`` directly (no dispatch guard) on
output memory filled with NaN first, and records whether the output is finite and its relative L2 error and
cosine against float64. Writes sage_edges.json (every cell) and prints, per backend, the cells that failed
(non-finite, or over its quality level's thresholds) grouped by what they share.

``--cpu-dry-run``: the same logic with the backends that serve on the CPU (tiny grid; the CI runs it).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from genesis_core.attn import quality, registry  # noqa: E402
from genesis_core.attn.types import AttentionCall  # noqa: E402

# fp8_cudnn is left out by default: cuDNN builds one graph per signature (seconds each), and 968 signatures did not
# finish in 180 s on the H200 (2026-12-02); name it with --backends for a smaller grid.
GPU_BACKENDS = ("sage", "sage2_fp8", "sage2_fp16", "sage2_triton", "fa3_fp8")
CPU_BACKENDS = ("pytorch", "sdpa")
LEVEL = {"exact": "exact", "int8": "fast", "fp8": "fast"}
GPU_GRID = dict(nq=(1, 2, 3, 15, 16, 17, 63, 64, 65, 128, 129),
                nk=(1, 2, 3, 15, 16, 17, 33, 48, 63, 64, 127, 128, 129, 300),
                d=(40, 64, 80, 128), dtype=(torch.float16, torch.bfloat16))
CPU_GRID = dict(nq=(1, 3), nk=(1, 2), d=(16,), dtype=(torch.float32,))


def reference(q, k, v, scale):
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    return torch.softmax(s, dim=-1) @ v.double()


def errors(out, ref):
    o, r = out.double().flatten(), ref.flatten()
    if not bool(torch.isfinite(o).all()):
        return None, None
    rel = float((o - r).norm() / r.norm().clamp_min(1e-30))
    cos = float(o @ r / (o.norm() * r.norm()).clamp_min(1e-30))
    return rel, cos


def sweep(name, grid, device, heads=2, seed=0, ignore_limits=False):
    b = registry.get(name)
    level = LEVEL[b.precision]
    cells = []
    g = torch.Generator(device="cpu").manual_seed(seed)
    for nq, nk, d, dtype in itertools.product(grid["nq"], grid["nk"], grid["d"], grid["dtype"]):
        q = torch.randn(1, nq, heads, d, generator=g).to(device, dtype).transpose(1, 2)  # BHND views of BNHD
        k = torch.randn(1, nk, heads, d, generator=g).to(device, dtype).transpose(1, 2)
        v = torch.randn(1, nk, heads, d, generator=g).to(device, dtype).transpose(1, 2)
        call = AttentionCall(q, k, v, None, d ** -0.5)
        cell = {"nq": nq, "nk": nk, "d": d, "dtype": str(dtype).replace("torch.", "")}
        why = b.reason_for(call)
        if why is not None and ignore_limits:
            cell["limits_refuse"] = why
        elif why is not None:
            cell["refused"] = why
            cells.append(cell)
            continue
        try:
            torch.full((q.numel() * 2,), float("nan"), dtype=dtype, device=device)  # poison what the allocator reuses
            out = b.run(call)
            if device.type == "cuda":
                torch.cuda.synchronize()
            rel, cos = errors(out, reference(q, k, v, call.scale))
            max_rel, min_cos = quality.thresholds(level, dtype, b.tolerance.get(dtype))
            cell.update(finite=rel is not None, rel=rel, cos=cos,
                        ok=rel is not None and rel <= max_rel and cos >= min_cos)
        except Exception as exc:  # noqa: BLE001 - report and go on
            cell.update(error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}", ok=False)
        cells.append(cell)
    return cells


def summary(name, cells):
    bad = [c for c in cells if c.get("ok") is False]
    ran = [c for c in cells if "refused" not in c]
    lines = [f"{name}: {len(ran)} ran, {len(cells) - len(ran)} refused by limits, {len(bad)} failed"]
    for key in ("nq", "nk", "d", "dtype"):
        values = sorted({c[key] for c in bad}, key=str)
        if values:
            share = {val: sum(1 for c in bad if c[key] == val) for val in values}
            total = {val: sum(1 for c in ran if c[key] == val) for val in values}
            lines.append(f"  by {key}: " + ", ".join(f"{val}: {share[val]}/{total[val]}" for val in values))
    for c in bad[:12]:
        what = "NaN/Inf" if c.get("finite") is False else c.get("error") or f"rel {c['rel']:.3g} cos {c['cos']:.5f}"
        lines.append(f"  nq {c['nq']} nk {c['nk']} d {c['d']} {c['dtype']}: {what}")
    return lines


def write(out, result):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "sage_edges.json"), "w") as f:
        json.dump(result, f, indent=1)


def int_list(text: str) -> tuple:
    """``"40,64"`` -> (40, 64): positive integers, comma-separated (argparse reports anything else)."""
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=".")
    p.add_argument("--cpu-dry-run", action="store_true")
    p.add_argument("--backends", default=None, help="comma-separated subset (default: all of the sweep's)")
    p.add_argument("--dims", type=int_list, default=None, help="comma-separated head dims in place of the grid's")
    p.add_argument("--nq", type=int_list, default=None, help="comma-separated query lengths in place of the grid's")
    p.add_argument("--nk", type=int_list, default=None, help="comma-separated key lengths in place of the grid's")
    p.add_argument("--heads", type=int, default=2, help="heads per call (default 2)")
    p.add_argument("--ignore-limits", action="store_true", help="run the cells the backend's limits refuse too")
    args = p.parse_args(argv)
    device = torch.device("cpu" if args.cpu_dry_run else "cuda")
    grid, names = (CPU_GRID, CPU_BACKENDS) if args.cpu_dry_run else (GPU_GRID, GPU_BACKENDS)
    for key, values in (("d", args.dims), ("nq", args.nq), ("nk", args.nk)):
        if values:
            grid = dict(grid, **{key: values})
    names = args.backends.split(",") if args.backends else names
    result = {"device": str(device), "args": vars(args), "grid": {k: [str(x) for x in v] for k, v in grid.items()},
              "backends": {}}
    t0 = time.perf_counter()
    for name in names:
        why = registry.get(name).available()
        if why is not None:
            result["backends"][name] = {"unavailable": why}
            print(f"{name}: not run ({why})", flush=True)
            continue
        cells = sweep(name, grid, device, heads=args.heads, ignore_limits=args.ignore_limits)
        result["backends"][name] = {"cells": cells}
        print("\n".join(summary(name, cells)), flush=True)
        write(args.out, result)  # after every backend: a run stopped by its time limit keeps what it measured
    result["elapsed_s"] = time.perf_counter() - t0
    write(args.out, result)
    print(f"elapsed {result['elapsed_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
