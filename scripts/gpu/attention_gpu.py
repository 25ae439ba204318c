"""GPU check of the attention backends: availability, which kernel runs, accuracy per backend and shape.

Run on the lent GPU: ``python scripts/gpu/attention_gpu.py`` (writes attention_gpu.json under $OUT if set).
Prints one row per (shape, backend): relative error against a float64 reference on a slice of heads,
and whether the backend served the call itself. Exits non-zero when a backend that served a call
is over its tolerance (sage included: that is how an inaccurate shape is found).
"""
from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from genesis_core.attn import attention, last_backend, registry  # noqa: E402
from genesis_core.attn.types import AttentionCall  # noqa: E402
from genesis_core.info import print_backends_table  # noqa: E402

SHAPES = {  # name: (B, H, Nq, Nk, D)
    "sd15_self_d40": (2, 8, 4096, 4096, 40),
    "sd15_cross_d40": (2, 8, 4096, 77, 40),
    "sd15_self_d160": (2, 8, 256, 256, 160),
    "sdxl_self": (2, 10, 4096, 4096, 64),
    "sdxl_cross77": (2, 10, 4096, 77, 64),
    "sdxl_cross77_h20": (2, 20, 1024, 77, 64),
    "flux": (1, 24, 4608, 4608, 128),
    "short_nk_64": (1, 8, 1024, 64, 64),
    "nk_128": (1, 8, 1024, 128, 64),
    "nk_200": (1, 8, 1024, 200, 128),
    "head96": (1, 8, 1024, 1024, 96),
    "nk_96": (1, 8, 1024, 96, 64),
    "nk_192": (1, 8, 1024, 192, 64),
    "nk_320": (1, 8, 1024, 320, 128),
    "nk_4097": (1, 8, 1024, 4097, 64),
}
NAMES = ["flash", "sage", "xformers", "sdpa", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "sdpa_math", "pytorch"]


def ref_slice(q, k, v, heads=2):
    q, k, v = (t[:1, :heads].double() for t in (q, k, v))
    return torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, -1) @ v


def main() -> int:
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    print_backends_table()
    rows, bad = [], []
    for dtype in (torch.bfloat16, torch.float16):
        for sname, (b, h, nq, nk, d) in SHAPES.items():
            g = torch.Generator(device="cuda").manual_seed(hash(sname) & 0xFFFF)
            q = torch.randn(b, h, nq, d, device="cuda", dtype=dtype, generator=g)
            k = torch.randn(b, h, nk, d, device="cuda", dtype=dtype, generator=g)
            v = torch.randn(b, h, nk, d, device="cuda", dtype=dtype, generator=g)
            ref = ref_slice(q, k, v)
            for name in NAMES:
                be = registry.get(name)
                call = AttentionCall(q, k, v, None, d ** -0.5)
                why = be.reason_for(call)
                if why is not None and name == "sage" and "key length" in why:
                    # evidence for the refusal rule: what the kernel returns when run anyway
                    out = be.run(call)
                    err = ((out[:1, :2].double() - ref).abs().max() / ref.abs().max()).item()
                    why += f" [run anyway: rel_err {err:.2e}]"
                if why is not None:
                    rows.append(dict(dtype=str(dtype)[6:], shape=sname, backend=name, served=None, rel_err=None, reason=why))
                    continue
                k0 = k.clone()
                out = attention(q, k, v, backend=name)
                torch.cuda.synchronize()
                served = last_backend()
                err = ((out[:1, :2].double() - ref).abs().max() / ref.abs().max()).item()
                mutated = not torch.equal(k0, k)
                tol = be.tolerance.get(dtype, 5e-2)
                rows.append(dict(dtype=str(dtype)[6:], shape=sname, backend=name, served=served, rel_err=err,
                                 tol=tol, mutated_key=mutated))
                if served == name and (err > tol or mutated or not torch.isfinite(out).all()):
                    bad.append(rows[-1])
    for r in rows:
        if r["served"] is None:
            print(f"{r['dtype']:9s} {r['shape']:18s} {r['backend']:15s} -- {r['reason']}")
        else:
            flag = "" if r["served"] == r["backend"] else f" (served by {r['served']})"
            print(f"{r['dtype']:9s} {r['shape']:18s} {r['backend']:15s} rel_err {r['rel_err']:.2e} tol {r['tol']:.0e}"
                  f"{' KEY MUTATED' if r['mutated_key'] else ''}{flag}")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "attention_gpu.json"), "w") as f:
            json.dump({"rows": rows, "over_tolerance": bad, "torch": torch.__version__,
                       "gpu": torch.cuda.get_device_name()}, f, indent=1)
    print(f"\n{len(bad)} served calls over tolerance:")
    for r in bad:
        print("  ", r)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
