#!/usr/bin/env python
"""Sequence-parallel scale-out: one GPU against 2 / 4 / 8 on DiT blocks of real model sizes, bf16.

Workloads (``--workloads``; weights and inputs from fixed seeds, the same on every rank):

* ``wan-32k`` / ``wan-75k``: Wan 2.1 1.3B-configuration blocks (dim 1536, 12 heads x 128, FFN 8960, text 512
  tokens) at 32760 tokens (480p x 81 frames) and 75600 (720p x 81): self-attention over the shards through
  ``genesis_core.parallel.sequence_attention`` (Ulysses; ring where 12 heads do not divide: 8 GPUs = Ulysses 4
  x ring 2), cross-attention to the text local on every rank, FFN on the shard;
* ``flux-4608``: Flux-configuration double-stream (joint text 512 + image 4608) and single-stream blocks
  (hidden 3072, 24 heads x 128, MLP x4), the text tokens joint in front.

The blocks are written here with plain ``nn.Linear`` (no RoPE, no modulation: those are elementwise and do
not change what scales); ``--blocks`` of each kind are timed and a step is extrapolated to the model's depth
(Wan 30 blocks; Flux 19 double + 38 single), one model call, no CFG. For each GPU count: s/step, scaling
efficiency ``t1 / (n * tn)``, the share of a step spent in the all-to-all / ring collectives (a separate
instrumented pass with a device synchronise around each collective), peak memory per GPU, and the largest
difference of the gathered output against the one-GPU output of the same blocks (bf16 tolerance).

``--gpus 1`` runs in this process and needs neither Ray nor torch.distributed; more GPUs start local NCCL
workers (``genesis_core.parallel.launch.LocalProcessGroup``), no Ray. NVLink multicast stays off in every
process (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1).

Usage (repo root): ``python scripts/gpu/scaleout.py --gpus 1,2,4,8 --json $OUT/scaleout.json``;
``--cpu-dry-run``: the same logic on CPU processes with gloo and tiny shapes (what the test runs).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

for _k, _v in {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}.items():
    os.environ[_k] = _v
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SHAPES = {  # name: (family, tokens, dim, heads, ffn, text tokens, depth per kind)
    "wan-32k": ("wan", 32760, 1536, 12, 8960, 512, {"block": 30}),
    "wan-75k": ("wan", 75600, 1536, 12, 8960, 512, {"block": 30}),
    "flux-4608": ("flux", 4608, 3072, 24, 12288, 512, {"double": 19, "single": 38}),
}
DRY_SHAPES = {
    "wan-32k": ("wan", 150, 64, 4, 96, 16, {"block": 30}),
    "wan-75k": ("wan", 301, 96, 6, 128, 16, {"block": 30}),  # 6 heads: 4 ranks = Ulysses 2 x ring 2
    "flux-4608": ("flux", 97, 64, 4, 128, 12, {"double": 19, "single": 38}),
}


# ---------------------------------------------------------------- the blocks


class WanBlock(nn.Module):
    def __init__(self, dim, heads, ffn):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.o = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.cq, self.ckv, self.co = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(approximate="tanh"), nn.Linear(ffn, dim))

    def heads_of(self, t):
        b, n, c = t.shape
        return t.view(b, n, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, x, txt, self_attn, local_attn):
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        a = self_attn(self.heads_of(q), self.heads_of(k), self.heads_of(v), 0)
        x = x + self.o(a.transpose(1, 2).flatten(2))
        ck, cv = self.ckv(txt).chunk(2, dim=-1)
        c = local_attn(self.heads_of(self.cq(self.norm3(x))), self.heads_of(ck), self.heads_of(cv))
        x = x + self.co(c.transpose(1, 2).flatten(2))
        return x + self.ffn(self.norm2(x))


class FluxDouble(nn.Module):
    def __init__(self, dim, heads, ffn):
        super().__init__()
        self.heads = heads
        self.img_norm, self.txt_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.img_qkv, self.txt_qkv = nn.Linear(dim, 3 * dim), nn.Linear(dim, 3 * dim)
        self.img_o, self.txt_o = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.img_mlp = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(approximate="tanh"), nn.Linear(ffn, dim))
        self.txt_mlp = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(approximate="tanh"), nn.Linear(ffn, dim))

    def forward(self, img, txt, self_attn):
        h = lambda t: t.view(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)  # noqa: E731
        iq, ik, iv = self.img_qkv(self.img_norm(img)).chunk(3, dim=-1)
        tq, tk, tv = self.txt_qkv(self.txt_norm(txt)).chunk(3, dim=-1)
        nt = txt.shape[1]
        a = self_attn(torch.cat((h(tq), h(iq)), 2), torch.cat((h(tk), h(ik)), 2), torch.cat((h(tv), h(iv)), 2), nt)
        a = a.transpose(1, 2).flatten(2)
        txt = txt + self.txt_o(a[:, :nt])
        img = img + self.img_o(a[:, nt:])
        return img + self.img_mlp(img), txt + self.txt_mlp(txt)


class FluxSingle(nn.Module):
    def __init__(self, dim, heads, ffn):
        super().__init__()
        self.heads, self.dim, self.ffn = heads, dim, ffn
        self.norm = nn.LayerNorm(dim)
        self.linear1, self.linear2 = nn.Linear(dim, 3 * dim + ffn), nn.Linear(dim + ffn, dim)

    def forward(self, x, nt, self_attn):
        qkv, mlp = torch.split(self.linear1(self.norm(x)), [3 * self.dim, self.ffn], dim=-1)
        h = lambda t: t.view(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = qkv.chunk(3, dim=-1)
        a = self_attn(h(q), h(k), h(v), nt).transpose(1, 2).flatten(2)
        return x + self.linear2(torch.cat((a, F.gelu(mlp, approximate="tanh")), dim=-1))


def build(name, shapes, blocks, device, dtype):
    family, n, dim, heads, ffn, nt, _ = shapes[name]
    torch.manual_seed(0)
    if family == "wan":
        mods = {"block": nn.ModuleList([WanBlock(dim, heads, ffn) for _ in range(blocks)])}
    else:
        mods = {"double": nn.ModuleList([FluxDouble(dim, heads, ffn) for _ in range(blocks)]),
                "single": nn.ModuleList([FluxSingle(dim, heads, ffn) for _ in range(blocks)])}
    for m in mods.values():
        for p in m.parameters():
            with torch.no_grad():
                p.mul_(0.5)
        m.to(device=device, dtype=dtype).eval()
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(1, n, dim, generator=gen) * 0.5).to(device=device, dtype=dtype)
    txt = (torch.randn(1, nt, dim, generator=gen) * 0.5).to(device=device, dtype=dtype)
    return family, mods, x, txt


# ---------------------------------------------------------------- one run (1 GPU in-process, or one rank)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_blocks(name, shapes, blocks, device, dtype, iters, mesh=None, instrument=False):
    """Time each block kind on this rank; return timings, the gathered output (shard 0), peak memory."""
    from genesis_core.attn.dispatch import attention
    from genesis_core.parallel import gather_tokens, sequence_attention, split_tokens
    from genesis_core.parallel import sequence as seqmod

    family, mods, x, txt = build(name, shapes, blocks, device, dtype)
    nt = txt.shape[1]
    real = [x.shape[1]]
    if mesh is not None:
        x, _, real = split_tokens(x, mesh.shard_index, mesh.sequence_degree, dim=1)

        def self_attn(q, k, v, joint):
            return sequence_attention(q, k, v, mesh, real=real, joint_front=joint)
    else:
        def self_attn(q, k, v, joint):
            return attention(q, k, v)

    comm = {"s": 0.0, "calls": 0}
    original = seqmod._all_to_all
    if instrument and mesh is not None:
        def timed(t, group):
            _sync(device)
            t0 = time.perf_counter()
            out = original(t, group)
            _sync(device)
            comm["s"] += time.perf_counter() - t0
            comm["calls"] += 1
            return out
        seqmod._all_to_all = timed

    def one_pass():
        with torch.no_grad():
            out = {}
            if family == "wan":
                y = x
                t0 = time.perf_counter()
                for b in mods["block"]:
                    y = b(y, txt, self_attn, lambda q, k, v: attention(q, k, v))
                _sync(device)
                out["block"] = time.perf_counter() - t0
                return out, y
            img, t = x, txt
            t0 = time.perf_counter()
            for b in mods["double"]:
                img, t = b(img, t, self_attn)
            _sync(device)
            out["double"] = time.perf_counter() - t0
            z = torch.cat((t, img), dim=1)
            t0 = time.perf_counter()
            for b in mods["single"]:
                z = b(z, nt, self_attn)
            _sync(device)
            out["single"] = time.perf_counter() - t0
            return out, z[:, nt:]

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        one_pass()  # warm-up: kernels, NCCL communicators, the autotuner's first measurement
        times = {}
        for _ in range(iters):
            t, y = one_pass()
            for k, v in t.items():
                times.setdefault(k, []).append(v)
        if instrument and mesh is not None:
            comm["s"], comm["calls"] = 0.0, 0
            t_instr, _ = one_pass()
            comm["pass_s"] = sum(t_instr.values())
    finally:
        seqmod._all_to_all = original
    if mesh is not None:
        y = gather_tokens(y, real, group=mesh.sequence_group, dim=1)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    per_block = {k: statistics.median(v) / blocks for k, v in times.items()}
    return {"per_block_s": per_block, "peak_bytes": peak, "comm": comm, "out": y.float().cpu()}


def _rank_worker(ctx, name, shapes, blocks, dtype_name, iters, ulysses, ring):
    from genesis_core.parallel import build_mesh

    key = ("mesh", ulysses, ring)
    if key not in ctx.cache:
        ctx.cache[key] = build_mesh(cfg=1, ulysses=ulysses, ring=ring)
    device = torch.device(ctx.device)
    r = run_blocks(name, shapes, blocks, device, getattr(torch, dtype_name), iters, ctx.cache[key], instrument=True)
    if ctx.rank != 0:
        r["out"] = None
    return r


def mesh_for(n, heads):
    """Ulysses as wide as the heads allow, the rest on a ring."""
    u = n
    while heads % u:
        u //= 2
    return u, n // u


def step_seconds(per_block, depth):
    return sum(per_block[k] * depth[k] for k in per_block)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpus", default="1,2,4,8", help="comma list of GPU counts to run (1 = this process alone)")
    ap.add_argument("--workloads", default="wan-32k,wan-75k,flux-4608")
    ap.add_argument("--blocks", type=int, default=2, help="blocks of each kind to time (a step is extrapolated)")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--json", default=None, help="where to write the report (default $OUT/scaleout.json)")
    ap.add_argument("--cpu-dry-run", action="store_true", help="CPU processes, gloo, tiny shapes")
    args = ap.parse_args(argv)
    dry = args.cpu_dry_run
    counts = [int(c) for c in args.gpus.split(",") if c.strip()]
    shapes = DRY_SHAPES if dry else SHAPES
    dtype_name = "float32" if dry else "bfloat16"
    if not dry:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device; use --cpu-dry-run on a CPU machine")
        have = torch.cuda.device_count()
        too_many = [c for c in counts if c > have]
        if too_many:
            print(f"skipping GPU counts {too_many}: this machine has {have} GPU(s)", flush=True)
            counts = [c for c in counts if c <= have]
    report = {"device": "cpu (dry run)" if dry else torch.cuda.get_device_name(0), "torch": torch.__version__,
              "dtype": dtype_name, "blocks_timed": args.blocks, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "nccl_env": NCCL_ENV, "runs": []}
    started = time.monotonic()
    for name in [w.strip() for w in args.workloads.split(",") if w.strip()]:
        family, n, dim, heads, ffn, nt, depth = shapes[name]
        base = None
        for count in counts:
            t0 = time.monotonic()
            if count == 1:
                device = torch.device("cpu" if dry else "cuda:0")
                r = run_blocks(name, shapes, args.blocks, device, getattr(torch, dtype_name), args.iters)
                results, mesh = [r], (1, 1)
            else:
                from genesis_core.parallel.launch import LocalProcessGroup

                u, ring = mesh_for(count, heads)
                mesh = (u, ring)
                with LocalProcessGroup(count, backend="gloo" if dry else "nccl", env=NCCL_ENV, timeout_s=900) as pool:
                    results = pool.run(_rank_worker, name, shapes, args.blocks, dtype_name, args.iters, u, ring,
                                       timeout=1200)
                r = results[0]
            per_block = {k: max(res["per_block_s"][k] for res in results) for k in r["per_block_s"]}
            step = step_seconds(per_block, depth)
            row = {"workload": name, "tokens": n, "text_tokens": nt, "gpus": count, "ulysses": mesh[0],
                   "ring": mesh[1], "per_block_s": per_block, "step_s_extrapolated": step,
                   "peak_gib_per_gpu": [None if res["peak_bytes"] is None else res["peak_bytes"] / 2**30
                                        for res in results],
                   "wall_s": time.monotonic() - t0}
            if count == 1:
                base = {"step": step, "out": r["out"]}
            else:
                comm = [res["comm"] for res in results]
                row["collective_share"] = max(c["s"] / c["pass_s"] for c in comm if c.get("pass_s"))
                row["collective_calls_per_pass"] = comm[0]["calls"]
            if base is not None and count > 1:
                row["speedup"] = base["step"] / step
                row["efficiency"] = base["step"] / (count * step)
                diff = (r["out"] - base["out"]).abs()
                row["max_abs_diff_vs_1gpu"] = diff.max().item()
                row["rel_diff_vs_1gpu"] = (diff.norm() / base["out"].norm()).item()
            print(json.dumps(row), flush=True)
            report["runs"].append(row)
    report["total_s"] = time.monotonic() - started
    path = args.json or (os.path.join(os.environ["OUT"], "scaleout.json") if os.environ.get("OUT") else None)
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {path}", flush=True)
    bad = [r for r in report["runs"] if r.get("rel_diff_vs_1gpu", 0) > (1e-4 if dry else 3e-2)]
    if bad:
        print(f"FAIL: {len(bad)} run(s) differ from one GPU beyond tolerance", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
