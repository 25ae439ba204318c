"""Wan-32k: which kernel does plain SDPA run, and is it faster than SDPA pinned to cuDNN? (alternated, many reps)"""
import os, statistics, sys
import torch
sys.path.insert(0, os.getcwd())
from torch.profiler import ProfilerActivity, profile
from genesis_core.attn import registry
from genesis_core._timing import time_runs
from genesis_core.attn.types import AttentionCall

dev = torch.device("cuda")
for shape in [(1, 40, 32760, 32760, 128), (1, 40, 32768, 32768, 128), (1, 24, 4608, 4608, 128)]:
    b, h, n, m, d = shape
    q, k, v = (torch.randn(b, h, x, d, device=dev, dtype=torch.bfloat16) for x in (n, m, m))
    call = AttentionCall(q, k, v, None, d ** -0.5)
    fns = {name: (lambda r: (lambda: r(call)))(registry.get(name).run) for name in ("sdpa", "sdpa_cudnn", "sdpa_flash")}
    with torch.no_grad():
        for name, f in fns.items():
            f(); torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                f(); torch.cuda.synchronize()
            kernels = sorted({e.name[:90] for e in prof.events() if e.device_type.name == "CUDA"})
            print(shape, name, "kernels:", kernels)
        reps = 12 if n > 10000 else 60
        s = {k_: [] for k_ in fns}
        for r in range(reps):
            items = list(fns.items()); items = items[r % 3:] + items[:r % 3]
            for name, f in items:
                s[name].append(time_runs(f, dev, 1)[0])
        print(shape, {k_: (round(statistics.median(x), 3), round(min(x), 3), round(max(x), 3)) for k_, x in s.items()})
