"""GPU check of GenesisAttentionSwitch inside a real ComfyUI: sample a small model with every attention choice.

Run on the lent GPU from the repository root, with a ComfyUI checkout carried as ``.comfyui/``::

    source scripts/gpu/setup.sh            # if wheels are carried
    COMFYUI_PATH=.comfyui python3 scripts/gpu/comfy_gpu.py

The model is an SD1.5-style UNet built from ComfyUI's own classes (random weights, head_dim 64, 4096 image
tokens at the first level, 77 context tokens), sampled with ComfyUI's own sampler (euler, 4 steps, CFG) on
CUDA, in float16 and bfloat16. For each attention choice it patches a clone of the model through the node,
samples, and compares with the unpatched model. Prints one row per (dtype, choice): relative error, which
Genesis backends served the calls, the override's call count, and the sampling time.

Exit status: 0 all good; 1 a choice that served its calls differs from the unpatched model beyond its
tolerance, the override was not called, or the original model changed; 2 setup failed (missing module or
checkout; the message says which). Details go to $OUT/comfy_gpu.json when OUT is set.

ComfyUI needs ``torchsde`` (pure Python) besides what the GPU image has; carry it with
``pip install --no-deps --target .comfyui/_deps torchsde trampoline``: this script puts ``$COMFYUI_PATH/_deps``
on sys.path. ``--device cpu`` runs the same check on CPU in float32 (a dry run of the script itself).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHOICES = ["auto", "flash", "sage", "xformers", "sdpa", "pytorch"]
# Relative error of the sampled latent vs the unpatched model (both in the same dtype) that a choice may show.
TOLERANCE = {"sage": 0.15, "default": 0.03}  # sage quantises q/k to int8; fp16 sampling drifts a little
TOLERANCE_FP32 = 1e-4


def fail_setup(message: str) -> None:
    print(f"SETUP FAILED: {message}")
    sys.exit(2)


def setup_comfy(device: str):
    raw = os.environ.get("COMFYUI_PATH", ".comfyui")
    path = Path(raw) if Path(raw).is_absolute() else (REPO / raw)
    if not (path / "comfy" / "ldm" / "modules" / "attention.py").is_file():
        fail_setup(f"no ComfyUI checkout at {path} (set COMFYUI_PATH)")
    deps = path / "_deps"
    if deps.is_dir():
        sys.path.insert(0, str(deps))
    sys.path.insert(0, str(path))
    missing = [m for m in ("torchsde", "einops", "safetensors", "yaml", "scipy", "tqdm", "psutil", "PIL", "transformers")
               if importlib.util.find_spec(m) is None]
    if missing:
        fail_setup(f"ComfyUI needs {', '.join(missing)}; carry them (see this script's docstring)")
    os.chdir(path)
    from comfy.cli_args import args

    if device == "cpu":
        args.cpu = True
    import comfy.model_management  # noqa: F401  (device detection happens here)
    return path


def load_pack():
    name = "genesis_gpu_pack"
    spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def tiny_model(dtype, device):
    import torch
    import comfy.model_patcher
    import comfy.supported_models

    cfg = {"context_dim": 256, "model_channels": 128, "use_linear_in_transformer": True, "adm_in_channels": None,
           "use_temporal_attention": False, "in_channels": 4, "out_channels": 4, "num_res_blocks": [1, 1],
           "channel_mult": [1, 2], "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
           "transformer_depth_middle": 1, "use_spatial_transformer": True, "legacy": False, "image_size": 64,
           "use_checkpoint": False}
    config = comfy.supported_models.SD15(cfg)
    config.unet_config["num_heads"] = -1
    config.unet_config["num_head_channels"] = 64  # head_dim 64: what flash and sage kernels serve
    config.set_inference_dtype(dtype, None)
    model = config.get_model({})
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # ComfyUI's ops skip weight init
            p.copy_((torch.randn(p.shape, generator=gen) * 0.03).to(p.dtype))
    load = torch.device(device)
    return comfy.model_patcher.ModelPatcher(model, load_device=load, offload_device=torch.device("cpu"))


def sample(model, size: int, steps: int = 4):
    import torch
    import comfy.sample

    gen = torch.Generator().manual_seed(1)
    latent = torch.randn(1, 4, size, size, generator=gen)
    noise = torch.randn(1, 4, size, size, generator=gen)
    pos = [[torch.randn(1, 77, 256, generator=gen), {}]]
    neg = [[torch.randn(1, 77, 256, generator=gen), {}]]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = comfy.sample.sample(model, noise, steps, 5.0, "euler", "normal", pos, neg, latent, seed=1, disable_pbar=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out.float(), time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--size", type=int, default=None, help="latent side (default 64 on cuda, 16 on cpu)")
    opts = parser.parse_args()

    import torch

    if opts.device == "cuda" and not torch.cuda.is_available():
        fail_setup("no CUDA device visible to torch")
    setup_comfy(opts.device)
    pack = load_pack()
    switch_cls = pack.NODE_CLASS_MAPPINGS["GenesisAttentionSwitch"]
    dispatch = importlib.import_module(pack.__name__ + ".genesis_core.attn.dispatch")
    registry = importlib.import_module(pack.__name__ + ".genesis_core.attn.registry")
    report = {r["name"]: r for r in registry.report()}
    size = opts.size or (64 if opts.device == "cuda" else 16)
    dtypes = [torch.float16, torch.bfloat16] if opts.device == "cuda" else [torch.float32]
    gpu = torch.cuda.get_device_name(0) if opts.device == "cuda" else "cpu"
    print(f"device: {gpu}; torch {torch.__version__}; ComfyUI sampler euler x4, latent {size}x{size}")
    for name in CHOICES:
        row = report.get(name, {})
        print(f"  {name:9s} {'available' if row.get('available') else 'missing: ' + str(row.get('reason'))}"
              f"{'  [' + str(row.get('version')) + ']' if row.get('version') else ''}")

    rows, bad = [], []
    for dtype in dtypes:
        model = tiny_model(dtype, opts.device)
        before = repr(model.model_options)
        baseline, t_base = sample(model, size)
        if not torch.isfinite(baseline).all():
            fail_setup(f"the unpatched model gives non-finite output in {dtype}")
        for choice in CHOICES:
            patched = switch_cls().execute(model, choice)[0]
            override = patched.model_options["transformer_options"].get("optimized_attention_override")
            out, t = sample(patched, size)
            err = float((out - baseline).norm() / baseline.norm())
            served = {}
            for _, per in getattr(override, "last_run", []):
                for k, n in per.items():
                    served[k] = served.get(k, 0) + n
            tol = TOLERANCE_FP32 if dtype == torch.float32 else TOLERANCE.get(choice, TOLERANCE["default"])
            # The tolerance belongs to whoever served: a fallback to sdpa is held to sdpa's.
            if choice == "sage" and "sage" not in served:
                tol = TOLERANCE_FP32 if dtype == torch.float32 else TOLERANCE["default"]
            calls = getattr(override, "calls", 0)
            ok = err <= tol and calls > 0 and getattr(override, "fallback_calls", 1) == 0 and bool(torch.isfinite(out).all())
            row = {"dtype": str(dtype).replace("torch.", ""), "choice": choice, "rel_err": err, "tolerance": tol,
                   "served": served, "calls": calls, "fallback_calls": getattr(override, "fallback_calls", None),
                   "seconds": round(t, 3), "baseline_seconds": round(t_base, 3), "ok": ok}
            rows.append(row)
            if not ok:
                bad.append(row)
        if repr(model.model_options) != before:
            bad.append({"dtype": str(dtype), "choice": "original model", "error": "model_options changed"})
        again, _ = sample(model, size)
        if not torch.equal(again, baseline):
            bad.append({"dtype": str(dtype), "choice": "original model",
                        "error": f"unpatched sampling changed after patching (rel {float((again - baseline).norm() / baseline.norm()):.2e})"})

    print()
    print(f"{'dtype':9s} {'choice':9s} {'rel err':>9s} {'tol':>7s} {'calls':>6s} {'time s':>7s} {'base s':>7s}  served by")
    for r in rows:
        served = ", ".join(f"{k} x{n}" for k, n in r["served"].items()) or "-"
        print(f"{r['dtype']:9s} {r['choice']:9s} {r['rel_err']:9.2e} {r['tolerance']:7.0e} {r['calls']:6d} "
              f"{r['seconds']:7.3f} {r['baseline_seconds']:7.3f}  {served}{'' if r['ok'] else '   <-- FAIL'}")
    for b in bad:
        if "error" in b:
            print(f"FAIL {b['dtype']} {b['choice']}: {b['error']}")
    out_dir = os.environ.get("OUT")
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "comfy_gpu.json").write_text(json.dumps({"device": gpu, "torch": torch.__version__,
                                                                  "rows": rows, "failures": bad}, indent=2, default=str))
    print(f"\n{len(rows) - len([b for b in bad if 'rel_err' in b])}/{len(rows)} ok")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
