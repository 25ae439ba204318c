"""The overhead section: Genesis ``attention()`` against calling the chosen kernel directly, and the ComfyUI
override against ComfyUI's own ``attention_pytorch``, µs per call.

Small tensors ([1, 1, 8, 64]; for ComfyUI [1, 8, 64] with one head) for an already-seen signature, so what
shows is the CPU-side cost of dispatch, not the kernel: the best of interleaved rounds of many calls each.

ComfyUI's path is reproduced here (ComfyUI need not be installed): its ``wrap_attn`` decorator (which hands
the call to ``transformer_options["optimized_attention_override"]`` when there is one) around
``attention_pytorch`` (view [B, N, H, D], transpose, SDPA, transpose back, reshape; on CUDA SDPA runs inside
``sdpa_kernel`` with cuDNN first, as ComfyUI's ``comfy.ops`` does). With a ComfyUI checkout the real
``attention_pytorch`` is timed too, with and without the override.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from .._device import synchronize
from ..attn import dispatch, registry
from ..attn.types import AttentionCall
from ..interop import GenesisAttentionOverride
from .comfy_default import comfy_sdpa
from .report import say, verdict
from .verdicts import COMFY_OVERRIDE_TARGET_TEXT, comfy_override_verdicts


def _per_call_us(fns: Dict[str, Callable[[], object]], device: torch.device, calls: int = 2000,
                 rounds: int = 15) -> Dict[str, float]:
    """µs per call of each fn: the best of interleaved rounds of ``calls`` calls (host clock).

    The minimum, as ``timeit`` advises for host-side micro-benchmarks: other processes only ever add
    time, so the fastest round is the closest to the code's own cost (medians moved by several µs
    between runs on a shared 2-core machine)."""
    for fn in fns.values():
        for _ in range(min(200, calls)):
            fn()
    samples: Dict[str, List[float]] = {n: [] for n in fns}
    for _ in range(rounds):
        for n, fn in fns.items():
            synchronize(device)
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            synchronize(device)
            samples[n].append((time.perf_counter() - t0) / calls * 1e6)
    return {n: min(v) for n, v in samples.items()}


def bench_overhead(devices: List[torch.device], calls: int = 2000, rounds: int = 15) -> List[dict]:
    rows = []
    for device in devices:
        dtype = torch.float32 if device.type == "cpu" else torch.float16
        q, k, v = (torch.randn(1, 1, 8, 64, device=device, dtype=dtype) for _ in range(3))
        with torch.no_grad():
            dispatch.attention(q, k, v)  # plan (and, where measuring is on, the autotuner) happen here
            chosen = dispatch.last_backend()
            backend = registry.get(chosen)
            call = AttentionCall(q, k, v, None, 64 ** -0.5)
            fns = {
                "F.scaled_dot_product_attention(q, k, v)": lambda: F.scaled_dot_product_attention(q, k, v),
                f"backend '{chosen}'.run(call) (the chosen kernel)": lambda: backend.run(call),
                "genesis_core.attention(q, k, v)  [auto]": lambda: dispatch.attention(q, k, v),
                f"genesis_core.attention(..., backend='{chosen}')": lambda: dispatch.attention(q, k, v, backend=chosen),
            }
            us = _per_call_us(fns, device, calls=calls if device.type == "cpu" else max(1, calls // 4), rounds=rounds)
        names = list(fns)
        direct = us[names[0]] if chosen == "sdpa" else us[names[1]]
        for n in names:
            rows.append({"device": str(device), "dtype": str(dtype).replace("torch.", ""), "call": n,
                         "us_per_call": us[n], "overhead_us": us[n] - direct, "chosen": chosen})
    return rows


# ---------------------------------------------------------------- ComfyUI's attention_pytorch and the override


def _wrap_attn(func: Callable) -> Callable:
    """What ComfyUI's ``wrap_attn`` does: mark the call as inside the wrapper and, when the model's
    transformer_options carry an override, call ``override(func, *args, **kwargs)`` instead of ``func``."""
    def wrapper(*args, **kwargs):
        added = False
        try:
            if "_inside_attn_wrapper" not in kwargs:
                options = kwargs.get("transformer_options", None)
                added = True
                kwargs["_inside_attn_wrapper"] = True
                if options is not None and "optimized_attention_override" in options:
                    return options["optimized_attention_override"](func, *args, **kwargs)
            return func(*args, **kwargs)
        finally:
            if added:
                del kwargs["_inside_attn_wrapper"]

    return wrapper


def reproduced_attention_pytorch(device: torch.device) -> Callable:
    """ComfyUI's ``attention_pytorch`` call path, reproduced (see the module docstring)."""
    sdpa = comfy_sdpa(device)

    @_wrap_attn
    def attention_pytorch(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                          skip_output_reshape=False, **kwargs):
        if skip_reshape:
            b, _, _, dim_head = q.shape
        else:
            b, _, dim_head = q.shape
            dim_head //= heads
            q, k, v = (t.view(b, -1, heads, dim_head).transpose(1, 2) for t in (q, k, v))
        if mask is not None:
            mask = mask.unsqueeze(0) if mask.ndim == 2 else mask
            mask = mask.unsqueeze(1) if mask.ndim == 3 else mask
        out = sdpa(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
        if not skip_output_reshape:
            out = out.transpose(1, 2).reshape(b, -1, heads * dim_head)
        return out

    return attention_pytorch


def bench_comfy_override(devices: List[torch.device], calls: int = 2000, rounds: int = 15,
                         comfyui: Optional[str] = None) -> List[dict]:
    """µs per call of ComfyUI's ``attention_pytorch`` (reproduced; with ``comfyui``, a checkout, also the
    real one) with the model's transformer_options empty and with the Genesis override (``auto``) in them,
    on [1, 8, 64] tensors with one head. Each override row's ``overhead_us`` is over the same function
    without the override."""
    rows = []
    for device in devices:
        dtype = torch.float32 if device.type == "cpu" else torch.float16
        q, k, v = (torch.randn(1, 8, 64, device=device, dtype=dtype) for _ in range(3))
        override = GenesisAttentionOverride("auto")
        plain, with_override = {}, {"optimized_attention_override": override}
        paths = {"reproduced": reproduced_attention_pytorch(device)}
        note = None
        if comfyui:
            from .comfy_e2e import comfy_attention_function

            try:
                paths["ComfyUI's own"] = comfy_attention_function(comfyui, device, "attention_pytorch")
            except Exception as exc:  # a checkout that does not import: the reproduced path still runs
                note = f"ComfyUI's own attention_pytorch not timed: {type(exc).__name__}: {exc}"
        fns = {}
        for label, fn in paths.items():
            fns[(label, False)] = lambda fn=fn: fn(q, k, v, 1, transformer_options=plain)
            fns[(label, True)] = lambda fn=fn: fn(q, k, v, 1, transformer_options=with_override)
        with torch.no_grad():
            fns[(next(iter(paths)), True)]()  # the override's first call: checks, plans (and, on CUDA, tunes)
            us = _per_call_us(fns, device, calls=calls if device.type == "cpu" else max(1, calls // 4),
                              rounds=rounds)
        served = ", ".join(sorted({b for _, c in override.run_table() for b in c}))
        for (label, with_genesis), t in us.items():
            name = (f"{label} attention_pytorch + Genesis override" if with_genesis
                    else f"{label} attention_pytorch (ComfyUI's default)")
            rows.append({"device": str(device), "dtype": str(dtype).replace("torch.", ""), "call": name,
                         "path": label, "genesis": with_genesis, "us_per_call": t,
                         "overhead_us": t - us[(label, False)], "chosen": served if with_genesis else None,
                         "note": note})
    return rows


def print_comfy_override(rows: List[dict]) -> None:
    if not rows:
        return
    say("\nComfyUI attention call ([1,8,64], 1 head, already-seen signature), us per call:")
    for r in rows:
        say(f"  {r['device']:<6} {r['call']:<58} {r['us_per_call']:8.2f} us  ({r['overhead_us']:+.2f})")
    for note in dict.fromkeys(r["note"] for r in rows if r.get("note")):
        say(f"  {note}")
    for device, path, ok, over in comfy_override_verdicts(rows):
        verdict(ok, f"ComfyUI override on {device} ({path} attention_pytorch): {over:+.2f} us per call over "
                    f"ComfyUI's own path", COMFY_OVERRIDE_TARGET_TEXT)
