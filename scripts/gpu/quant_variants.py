"""Why does the FP8 quantiser's statistics launch read slower than its cast launch? Launch settings tried on
the lent H200 (Flux and Wan 480p shapes, ComfyUI's BNHD layout), each checked bit for bit against the
shipped settings:

    PYTHONPATH=/tmp/site:$PWD python3 scripts/gpu/quant_variants.py --out $OUT

Per variant of the statistics launch (warps per program, elements per tile, token chunks per head; k smoothing
on or off): the device time of ``_stats`` and ``_cast`` (torch.profiler, 10 calls; the chunks per head and the
tile are the cast's too) and whether q8, k8, v8, the descales and the k mean equal the shipped settings' bytes,
with the compiled statistics kernel's registers/spills per thread (what decides how many programs an SM holds).
Writes quant_variants.json and prints a table. About 30 s.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _limits import kernel_times  # noqa: E402
from genesis_core.attn.quant import fp8  # noqa: E402

SHAPES = {"flux": (1, 24, 4608, 128), "wan480": (1, 40, 32760, 128)}
CALLS = 10


def kernel_us(fn):
    fn()
    torch.cuda.synchronize()
    return {r["kernel"]: r["us_per_call"] for r in kernel_times(fn, CALLS) if r["kernel"] in ("_stats", "_cast")}


VARIANTS = [(8, 4096, 64), (4, 4096, 64), (4, 2048, 64), (8, 4096, 32), (4, 4096, 32), (4, 4096, 16),
            (4, 8192, 32), (2, 4096, 32), (8, 2048, 32)]


def compiled_info(launcher):
    for c in launcher.compiled.values():
        return f"{getattr(c, 'n_regs', None)}/{getattr(c, 'n_spills', None)}"
    return None


def one_variant(kern, launchers, q, k, v, smooth, nw, tile, chunks, shape):
    """Time one launch setting of the statistics launch (the cast keeps its own)."""
    kern.TILE, kern.MAX_CHUNKS = tile, chunks
    stats = kern.Launcher(kern._stats, launchers[0].names, nw)
    kern._STATS = kern._STATS_SMOOTH = stats
    kern._plans.clear()

    def call():
        return fp8.quantize_qkv(q, k, v, "head", smooth)

    try:
        res = call()
        us = kernel_us(call)
    except Exception as exc:  # noqa: BLE001 - report and go on
        return {"failed": f"{shape} smooth={smooth} warps={nw} tile={tile} chunks={chunks} failed: "
                          f"{type(exc).__name__}: {str(exc)[:160]}"}
    parts = [res.q.view(torch.uint8), res.k.view(torch.uint8), res.v.view(torch.uint8), res.descale]
    if res.k_mean is not None:
        parts.append(res.k_mean)
    return {"shape": shape, "smooth_k": smooth, "warps": nw, "tile": tile, "chunks": chunks, "parts": parts,
            "stats_us": us.get("_stats"), "cast_us": us.get("_cast"), "compiled": {"stats": compiled_info(stats)}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=".")
    args = p.parse_args(argv)
    kern = fp8._kernels()
    launchers = (kern._STATS, kern._STATS_SMOOTH)
    kept = (kern.TILE, kern.MAX_CHUNKS)
    rows, lines = [], []
    for shape, (b, h, n, d) in SHAPES.items():
        q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
        k = k + 3.0  # a channel offset, as DiT activations have: smoothing has work to do
        for smooth in (True, False):
            shipped = (kern.SMOOTH_WARPS if smooth else kern.NUM_WARPS,) + kept
            base = None
            for nw, tile, chunks in [shipped] + [v_ for v_ in VARIANTS if v_ != shipped]:
                row = one_variant(kern, launchers, q, k, v, smooth, nw, tile, chunks, shape)
                if "failed" in row:
                    lines.append(row["failed"])
                    continue
                parts = row.pop("parts")
                if base is None:
                    base = parts
                row["same_bytes"] = all(torch.equal(x, y) for x, y in zip(parts, base))
                rows.append(row)
                ci = row["compiled"]
                lines.append(f"{shape:7s} smooth={smooth!s:5s} warps={nw:2d} tile={tile:5d} chunks={chunks:3d} "
                             f"stats {row['stats_us'] or 0:8.1f} us  cast {row['cast_us'] or 0:8.1f} us  "
                             f"same={row['same_bytes']}  regs/spills stats {ci.get('stats')}")
        del q, k, v
    kern.TILE, kern.MAX_CHUNKS = kept
    kern._STATS, kern._STATS_SMOOTH = launchers
    kern._plans.clear()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "quant_variants.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
