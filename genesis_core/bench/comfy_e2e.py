"""Optional: ComfyUI's own Flux model end to end, ComfyUI's default attention against Genesis AUTO.

The only bench module that knows where ComfyUI lives: it reads ``COMFYUI_PATH`` (or ``--comfyui``) and
imports ``comfy`` from that checkout, inside :func:`bench_e2e_comfyui` only. Without a checkout the
section is skipped; nothing else in the bench (or the engine) imports ComfyUI.
"""
from __future__ import annotations

import os
import statistics
import sys
from typing import List, Optional

import torch

from .._timing import time_runs
from ..attn import dispatch
from .kernels import same_as_baseline
from .verdicts import e2e_verdict

# ComfyUI's attention functions (comfy.ldm.modules.attention) -> the Genesis backend running the same kernel
COMFY_ATTENTION_BACKEND = {"attention_pytorch": "sdpa", "attention_sage": "sage", "attention_xformers": "xformers",
                           "attention_flash": "flash"}

ENV_COMFYUI = "COMFYUI_PATH"


def comfyui_path(explicit: Optional[str] = None) -> Optional[str]:
    """The ComfyUI checkout to use: ``explicit`` (``--comfyui``), else ``$COMFYUI_PATH``, else None (skip)."""
    return explicit or os.environ.get(ENV_COMFYUI) or None


def _import_comfyui(path: str, device: torch.device):
    """Import ComfyUI's model code from a checkout (``COMFYUI_PATH``); ComfyUI's own arguments stay default
    (``--cpu`` added on a machine without CUDA). Already-imported ComfyUI (inside ComfyUI) is used as is."""
    if "comfy.ldm.flux.model" not in sys.modules:
        if not os.path.isfile(os.path.join(path, "comfy", "ldm", "flux", "model.py")):
            raise FileNotFoundError(f"COMFYUI_PATH {path!r} holds no comfy/ldm/flux/model.py")
        if path not in sys.path:
            sys.path.insert(0, path)
        saved = sys.argv
        sys.argv = [saved[0]] + ([] if device.type == "cuda" else ["--cpu"])
        try:
            import comfy.options

            comfy.options.enable_args_parsing()  # ComfyUI parses sys.argv (set above), not ours
            import comfy.ldm.flux.model  # noqa: F401
        finally:
            sys.argv = saved
    import comfy.ldm.modules.attention as comfy_attention
    import comfy.ops
    from comfy.ldm.flux.model import Flux

    return Flux, comfy.ops, comfy_attention


def comfy_attention_function(path: str, device: torch.device, name: str = "attention_pytorch"):
    """One of ComfyUI's own attention functions, ``comfy.ldm.modules.attention.<name>``, from a checkout
    (the overhead section times the Genesis override against it)."""
    _, _, comfy_attention = _import_comfyui(path, device)
    return getattr(comfy_attention, name)


def bench_e2e_comfyui(path: str, device: torch.device, dtype: torch.dtype, size: str, double: int, single: int,
                      reps: int, seed: int) -> List[dict]:
    """ComfyUI's own Flux model (random weights, ``double`` + ``single`` blocks): ComfyUI's default attention
    against Genesis AUTO through ``transformer_options["optimized_attention_override"]``, alternately."""
    from ..interop.comfy_adapter import GenesisAttentionOverride

    Flux, ops, comfy_attention = _import_comfyui(path, device)
    if size == "flux":  # Flux.1 dims; 1024x1024 image -> 128x128 latent -> 4096 tokens, + 512 text tokens
        hidden, heads, lat, txt = 3072, 24, 128, 512
    else:
        hidden, heads, lat, txt = 256, 2, 32, 64
    torch.manual_seed(seed)
    model = Flux(operations=ops.disable_weight_init, dtype=dtype, device=device, in_channels=16, out_channels=16,
                 vec_in_dim=768, context_in_dim=4096, hidden_size=hidden, mlp_ratio=4.0, num_heads=heads,
                 depth=double, depth_single_blocks=single, axes_dim=[16, 56, 56], theta=10000, patch_size=2,
                 qkv_bias=True, guidance_embed=True).eval()
    with torch.no_grad():
        for p in model.parameters():  # disable_weight_init leaves weights uninitialised
            p.normal_(0.0, 0.02)
    x = torch.randn(1, 16, lat, lat, device=device, dtype=dtype)
    ctx = torch.randn(1, txt, 4096, device=device, dtype=dtype)
    y = torch.randn(1, 768, device=device, dtype=dtype)
    ts = torch.tensor([0.5], device=device, dtype=dtype)
    guidance = torch.tensor([3.5], device=device, dtype=dtype)
    override = GenesisAttentionOverride("auto")
    default_name = getattr(comfy_attention.optimized_attention, "__name__", str(comfy_attention.optimized_attention))
    variants = {
        f"ComfyUI default attention ({default_name})": {},
        "Genesis AUTO (optimized_attention_override)": {"optimized_attention_override": override},
    }
    outs, samples = {}, {n: [] for n in variants}
    with torch.no_grad():
        for name, opts in variants.items():
            outs[name] = model(x, ts, ctx, y=y, guidance=guidance, transformer_options=dict(opts)).float()
            model(x, ts, ctx, y=y, guidance=guidance, transformer_options=dict(opts))
        for _ in range(reps):
            for name, opts in variants.items():
                samples[name].append(time_runs(
                    lambda: model(x, ts, ctx, y=y, guidance=guidance, transformer_options=dict(opts)), device, 1)[0])
    served = dispatch.last_backend()
    base_name, gen_name = list(variants)

    def forward_with(opts):
        return lambda: model(x, ts, ctx, y=y, guidance=guidance, transformer_options=dict(opts))

    same, why = same_as_baseline(forward_with(variants[base_name]), forward_with(variants[gen_name]), device,
                                 COMFY_ATTENTION_BACKEND.get(default_name), served)
    diff = float(torch.linalg.vector_norm(outs[gen_name] - outs[base_name]) / torch.linalg.vector_norm(outs[base_name]))
    base_ms = statistics.median(samples[base_name])
    n_tokens = (lat // 2) ** 2 + txt
    rows = []
    for name in variants:
        ms = statistics.median(samples[name])
        rows.append({"variant": name, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
                     "size": f"ComfyUI Flux, {double} double + {single} single blocks, {n_tokens} tokens, "
                             f"hidden {hidden} ({heads} heads x {hidden // heads})",
                     "ms": ms, "vs_baseline": ms / base_ms, "rel_diff_vs_baseline": 0.0 if name == base_name else diff,
                     "attention_backend": None if name == base_name else served,
                     "genesis_calls": None if name == base_name else override.calls})
    rows[1].update(same_as_baseline=same, same_as_baseline_why=why)
    rows[1]["target_ok"], rows[1]["verdict"] = e2e_verdict(rows)
    return rows
