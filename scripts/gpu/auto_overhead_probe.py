"""Why does the bench's AUTO row read slower than the kernel it chose? Time the same call four ways, interleaved."""
import statistics, sys, os, torch
sys.path.insert(0, os.getcwd())
from genesis_core.attn import dispatch, registry
from genesis_core.attn.types import AttentionCall
import torch.nn.functional as F
from genesis_core._timing import repeat, time_runs
dev = torch.device("cuda")
for (b, h, n, m, d) in [(1, 24, 4608, 4608, 128), (2, 10, 4096, 77, 64)]:
    q = torch.randn(b, h, n, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(b, h, m, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn(b, h, m, d, device=dev, dtype=torch.bfloat16)
    call = AttentionCall(q, k, v, None, d ** -0.5)
    run = registry.get("sdpa").run
    fns = {"F.sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
           "run(call)": lambda: run(call),
           "attention(auto)": lambda: dispatch.attention(q, k, v),
           "attention(sdpa)": lambda: dispatch.attention(q, k, v, backend="sdpa")}
    with torch.no_grad():
        for f in fns.values():
            f(); f()
        torch.cuda.synchronize()
        for inner in (1, 10):
            s = {k_: [] for k_ in fns}
            for r in range(30):
                items = list(fns.items()); items = items[r % 4:] + items[:r % 4]
                for name, f in items:
                    s[name].append(time_runs(repeat(f, inner), dev, 1)[0] / inner)
            print((b, h, n, m, d), f"inner={inner}", {k_: round(statistics.median(x), 4) for k_, x in s.items()},
                  "served", dispatch.last_backend())
