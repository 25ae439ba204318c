"""End to end with ComfyUI's own model classes (random weights): ComfyUI's default attention against the Genesis
override at quality exact / high / fast (each with AUTO); and, on Wan, the autotuner's timings against plain timings.

Run on the lent H200 with ComfyUI's ``comfy/`` package at ``$COMFYUI_PATH`` (only ``comfy/`` is imported; its
pure-Python needs, einops and psutil, may sit in ``$COMFYUI_PATH/_deps``), at most ~360 s::

    COMFYUI_PATH=/tmp/comfyui PYTHONPATH=/tmp/site:$PWD/.sage_src:$PWD python3 scripts/gpu/comfy_e2e_gpu.py --out $OUT

Models (bfloat16 on CUDA; built from ComfyUI's classes with ``comfy.ops.disable_weight_init`` and random weights,
no downloads):

* Wan 2.1 1.3B (``comfy.ldm.wan.model.WanModel``: dim 1536, 30 layers, 12 heads, ffn 8960, text 512 x 4096,
  patch (1, 2, 2)) at 480x832, 81 frames: latent 16 x 21 x 60 x 104, 32760 tokens; CFG, so one step is one
  forward of cond + uncond as a batch of 2 (what ComfyUI's sampler runs when they fit together);
* SDXL's UNet (``openaimodel.UNetModel`` with ComfyUI's SDXL configuration) at 1024^2: latent 128 x 128, CFG
  batch of 2, 77 x 2048 context;
* Flux (``comfy.ldm.flux.model.Flux``, dev configuration: 19 double + 38 single blocks, hidden 3072, 24 heads) at
  1024^2: 4096 image + 512 text tokens, guidance-distilled, so one step is one forward of batch 1.

For each model: the first call of each variant (the autotuner measures there) timed apart; one more warm-up call;
then the variants timed in alternation (rotated order each round, CUDA events), medians = s/step. A 4-step Euler
loop over ComfyUI's own model_sampling (the model's sampling type and shift, ComfyUI's "simple" schedule) from
the same noise for each variant; the relative L2 difference of the final (denoised) latent to ComfyUI's default.

Wan's autotuner check: the first 12-head 32760-token self-attention q/k/v exactly as ComfyUI hands them to the
override are kept; on them: ComfyUI's own attention_pytorch, plain F.scaled_dot_product_attention (on the same
views and on contiguous copies), and every Genesis backend that serves them (median of 20 CUDA-event timings
each); the autotuner's stored ms for that signature; and step time / 30 layers. Hypotheses tested on the same
tensors: cuDNN's first call (graph building) inside a sample, the GPU clock after idling, back-to-back L2 reuse
(against an L2 flush between calls), another stream busy meanwhile, PyTorch choosing a sub-kernel by layout. The
kernels that run are named with torch.profiler: for Genesis' ``sdpa`` as the autotuner times it, for ComfyUI's
attention_pytorch on the same tensors, and inside one forward of the model.

Every phase checks the time budget (``--budget-s``) and a watchdog writes what exists and exits before the hard
limit. Writes ``comfy_e2e_gpu.json`` under ``--out`` and prints a verdict table last (PASS/FAIL per target).
``--cpu-dry-run``: tiny configurations of the same classes on CPU in float32, same code path (tests run it).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _limits import sync, time_limit  # noqa: E402

from genesis_core._timing import time_runs  # noqa: E402
from genesis_core.attn import autotune, registry  # noqa: E402
from genesis_core.attn.types import AttentionCall  # noqa: E402
from genesis_core.interop import GenesisAttentionOverride  # noqa: E402

LEVELS = ("exact", "high", "fast")
TARGETS = {"wan_fastest": 1.3, "wan_exact": 1.1, "not_slower": 1.01}  # speed-ups; 1% timing noise allowed
AGREE = 0.15  # the autotuner's ms and a plain timing of the same backend agree within 15%
RESULT: dict = {"models": {}, "checks": {}, "errors": [], "notes": []}


class OutOfTime(Exception):
    pass


# ---------------------------------------------------------------- setup


def setup_comfy(cpu: bool) -> Path:
    raw = os.environ.get("COMFYUI_PATH", ".comfyui")
    path = Path(raw) if Path(raw).is_absolute() else (REPO / raw)
    if not (path / "comfy" / "ldm" / "wan" / "model.py").is_file():
        raise SystemExit(f"SETUP FAILED: no ComfyUI comfy/ package at {path} (set COMFYUI_PATH)")
    if (path / "_deps").is_dir():
        sys.path.insert(0, str(path / "_deps"))
    sys.path.insert(0, str(path))
    missing = [m for m in ("einops", "psutil", "numpy") if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"SETUP FAILED: ComfyUI's comfy/ needs {', '.join(missing)} (pip install --no-deps "
                         f"--target $COMFYUI_PATH/_deps {' '.join(missing)})")
    from comfy.cli_args import args

    if cpu:
        args.cpu = True
    import comfy.model_management  # noqa: F401  (device detection happens here)
    return path


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


class Clock:
    def __init__(self, budget_s: float):
        self.t0 = time.monotonic()
        self.deadline = self.t0 + budget_s

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def check(self, need_s: float = 0.0, what: str = "") -> None:
        if self.left() < need_s:
            raise OutOfTime(f"time budget spent before {what}" if what else "time budget spent")

    def elapsed(self) -> float:
        return time.monotonic() - self.t0


def timed_s(fn, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def median_ms(fn, device: torch.device, reps: int, warmup: int = 3):
    for _ in range(warmup):
        fn()
    samples = time_runs(fn, device, reps)
    return statistics.median(samples), samples


def random_weights(model: torch.nn.Module, seed: int) -> None:
    """ComfyUI's disable_weight_init leaves weights empty: variance-preserving values (1/sqrt(fan_in)), norm
    scales 1, biases 0, so activations stay O(1) through the depth."""
    gens = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() <= 1:
                p.fill_(0.0 if name.endswith("bias") else 1.0)
            else:  # drawn on the parameter's own device: Flux's 12B values would take minutes on the host
                gen = gens.setdefault(p.device, torch.Generator(device=p.device).manual_seed(seed))
                p.normal_(0.0, 1.0 / math.sqrt(max(1, p[0].numel())), generator=gen)


# ---------------------------------------------------------------- the models


def build(name: str, cpu: bool, device: torch.device, dtype: torch.dtype, opts):
    """(model, sampling, inputs, info): ComfyUI's model class with random weights, its model_sampling, and a
    function making the conditioning for a batch."""
    import comfy.model_sampling as ms
    import comfy.ops

    ops = comfy.ops.disable_weight_init
    g = torch.Generator(device="cpu").manual_seed(7)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    if name == "wan":
        from comfy.ldm.wan.model import WanModel

        cfg = (dict(dim=64, ffn_dim=128, freq_dim=32, num_heads=4, num_layers=2, text_len=16, text_dim=32) if cpu
               else dict(dim=1536, ffn_dim=8960, freq_dim=256, num_heads=12, num_layers=30, text_len=512, text_dim=4096))
        latent = (16, 3, 8, 8) if cpu else (16, 21, 60, 104)
        model = WanModel(model_type="t2v", patch_size=(1, 2, 2), in_dim=16, out_dim=16, qk_norm=True,
                         cross_attn_norm=True, eps=1e-6, device=device, dtype=dtype, operations=ops, **cfg)
        cond = [rnd(1, cfg["text_len"], cfg["text_dim"]) for _ in range(2)]  # cond, uncond

        class Sampling(ms.ModelSamplingDiscreteFlow, ms.CONST):
            pass

        sampling = Sampling(type("Config", (), {"sampling_settings": {"shift": 8.0}})())
        extra = lambda b: {"context": torch.cat(cond[:b])}  # noqa: E731
        tokens = latent[1] * (latent[2] // 2) * (latent[3] // 2)
        info = dict(cfg, batch=2, cfg_scale=5.0, tokens=tokens, layers=cfg["num_layers"], heads=cfg["num_heads"])
    elif name == "flux":
        from comfy.ldm.flux.model import Flux

        double, single = (1, 1) if cpu else (opts.flux_double, opts.flux_single)
        cfg = (dict(hidden_size=64, num_heads=4, axes_dim=[4, 6, 6], context_in_dim=32, vec_in_dim=16, txt=16) if cpu
               else dict(hidden_size=3072, num_heads=24, axes_dim=[16, 56, 56], context_in_dim=4096, vec_in_dim=768, txt=512))
        txt = cfg.pop("txt")
        latent = (16, 8, 8) if cpu else (16, 128, 128)
        model = Flux(in_channels=16, out_channels=16, mlp_ratio=4.0, depth=double, depth_single_blocks=single, theta=10000,
                     patch_size=2, qkv_bias=True, guidance_embed=True, device=device, dtype=dtype, operations=ops, **cfg)
        ctx, y = rnd(1, txt, cfg["context_in_dim"]), rnd(1, cfg["vec_in_dim"])
        guidance = torch.full((1,), 3.5, device=device, dtype=dtype)

        class Sampling(ms.ModelSamplingFlux, ms.CONST):
            pass

        sampling = Sampling(None)
        extra = lambda b: {"context": ctx, "y": y, "guidance": guidance}  # noqa: E731
        tokens = (latent[1] // 2) * (latent[2] // 2) + txt
        info = dict(double_blocks=double, single_blocks=single, hidden=cfg["hidden_size"], heads=cfg["num_heads"],
                    batch=1, cfg_scale=1.0, tokens=tokens, text_tokens=txt)
    else:  # sdxl
        from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

        if cpu:
            cfg = dict(model_channels=32, num_res_blocks=[1, 1], channel_mult=[1, 2], transformer_depth=[0, 1],
                       transformer_depth_middle=1, transformer_depth_output=[0, 0, 1, 1], context_dim=32,
                       num_head_channels=16, adm_in_channels=40)
            latent, ctx_len = (4, 16, 16), 7
        else:  # ComfyUI's SDXL configuration (comfy/model_detection.py, supported_models.SDXL)
            cfg = dict(model_channels=320, num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4],
                       transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_middle=10,
                       transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], context_dim=2048,
                       num_head_channels=64, adm_in_channels=2816)
            latent, ctx_len = (4, 128, 128), 77
        model = UNetModel(image_size=32, in_channels=4, out_channels=4, use_spatial_transformer=True, legacy=False,
                          num_classes="sequential", use_linear_in_transformer=True, use_temporal_attention=False,
                          use_temporal_resblock=False, use_checkpoint=False, dtype=dtype, device=device,
                          operations=ops, **cfg)
        cond = [(rnd(1, ctx_len, cfg["context_dim"]), rnd(1, cfg["adm_in_channels"])) for _ in range(2)]

        class Sampling(ms.ModelSamplingDiscrete, ms.EPS):
            pass

        sampling = Sampling(None)
        extra = lambda b: {"context": torch.cat([c for c, _ in cond[:b]]), "y": torch.cat([y for _, y in cond[:b]])}  # noqa: E731
        info = dict(model_channels=cfg["model_channels"], batch=2, cfg_scale=5.0,
                    tokens=(latent[1] // 2) * (latent[2] // 2), context_tokens=ctx_len)
    random_weights(model, seed=11)
    model.eval()
    sampling = sampling.to(device)
    info["latent"] = list(latent)
    info["parameters_M"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
    return model, sampling, extra, info


def make_denoise(model, sampling, extra, info, device, dtype):
    """denoise(x, sigma, options) -> the CFG-combined denoised latent, as ComfyUI's sampler computes one step:
    cond and uncond as one batch (where the model uses CFG), calculate_input -> model -> calculate_denoised."""
    b, scale = info["batch"], info["cfg_scale"]

    def denoise(x, sigma, options):
        xin = x.repeat(b, *([1] * (x.dim() - 1)))
        s = torch.full((b,), float(sigma), device=device, dtype=torch.float32)
        xc = sampling.calculate_input(s, xin).to(dtype)
        t = sampling.timestep(s).float()
        with torch.no_grad():
            out = model(xc, t, transformer_options=dict(options), **extra(b)).float()
        den = sampling.calculate_denoised(s, out, xin)
        if b == 1:
            return den
        cond, uncond = den.chunk(2)
        return uncond + (cond - uncond) * scale

    return denoise


def simple_sigmas(sampling, steps: int) -> list:
    """ComfyUI's "simple" schedule: evenly spaced through the model's sigma table, then 0."""
    table = sampling.sigmas
    ss = len(table) / steps
    return [float(table[-(1 + int(i * ss))]) for i in range(steps)] + [0.0]


def euler(denoise, sampling, options, noise, steps: int, clock: Clock):
    sigmas = simple_sigmas(sampling, steps)
    x = sampling.noise_scaling(torch.full((1,), sigmas[0], device=noise.device), noise, torch.zeros_like(noise))
    for i in range(steps):
        clock.check(what="a sampler step")
        den = denoise(x, sigmas[i], options)
        x = den if sigmas[i + 1] == 0 else x + (x - den) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    return x


def variants() -> dict:
    out = {"comfy": {}}
    for level in LEVELS:
        out[level] = {"optimized_attention_override": GenesisAttentionOverride("auto", quality=level)}
    return out


def run_model(name: str, opts, device, dtype, clock: Clock, capture=None, reserve_s: float = 0.0) -> dict:
    """Time one model: first calls, alternated s/step, the sampler's latent difference. ``reserve_s``: time kept
    for what runs after this model (rounds beyond the second are dropped to keep it)."""
    import comfy.ldm.modules.attention as comfy_attention

    res: dict = {"comfy_attention": getattr(comfy_attention.optimized_attention, "__name__", "?")}
    RESULT["models"][name] = res
    t0 = time.monotonic()
    model, sampling, extra, info = build(name, opts.cpu_dry_run, device, dtype, opts)
    res.update(info=info, build_s=round(time.monotonic() - t0, 2))
    denoise = make_denoise(model, sampling, extra, info, device, dtype)
    g = torch.Generator(device="cpu").manual_seed(3)
    noise = torch.randn(1, *info["latent"], generator=g).to(device)
    sigma_mid = simple_sigmas(sampling, 4)[1]
    vs = variants()
    if capture is not None:  # catch the self-attention as ComfyUI hands it, during ComfyUI's own first call
        vs["comfy"] = {"optimized_attention_override": capture}
    first = {}
    for v, options in vs.items():
        clock.check(what=f"{name} first call ({v})")
        first[v] = timed_s(lambda: denoise(noise, sigma_mid, options), device)
        if v == "comfy" and capture is not None:
            vs["comfy"] = {}
    res["first_call_s"] = first
    for v, options in vs.items():  # one more warm-up each (FA4/cuDNN configurations built by now)
        clock.check(what=f"{name} warm-up")
        denoise(noise, sigma_mid, options)
    names = list(vs)
    samples = {v: [] for v in names}
    for r in range(opts.rounds):
        per_round = sum(statistics.median(x) for x in samples.values() if x)
        need = 1.3 * per_round * (1 + opts.steps) + reserve_s  # this round, the sampler, what comes after
        if r >= 2 and clock.left() < need:  # keep time for the sampler: fewer rounds, said in the JSON
            RESULT["notes"].append(f"{name}: {r} timing rounds instead of {opts.rounds} (time budget)")
            break
        clock.check(what=f"{name} timing round {r + 1}")
        for v in names[r % len(names):] + names[:r % len(names)]:
            samples[v].append(time_runs(lambda: denoise(noise, sigma_mid, vs[v]), device, 1)[0] / 1e3)
    res["s_per_step"] = {v: statistics.median(s) for v, s in samples.items()}
    res["samples_s"] = samples
    res["speedup"] = {v: res["s_per_step"]["comfy"] / res["s_per_step"][v] for v in LEVELS}
    res["served"] = {v: [[s, c] for s, c in vs[v]["optimized_attention_override"].run_table()] for v in LEVELS}
    if name == "flux" and not opts.cpu_dry_run and (info["double_blocks"], info["single_blocks"]) != (19, 38):
        # A double block (two streams, own weights) and a single block do about the same work per token.
        scale = 57 / (info["double_blocks"] + info["single_blocks"])
        res["extrapolated_full_flux_s_per_step"] = {v: t * scale for v, t in res["s_per_step"].items()}
        RESULT["notes"].append(f"flux: {info['double_blocks']}+{info['single_blocks']} blocks timed; the full "
                               f"19+38 is extrapolated by block count (x{scale:.2f}), embeddings included in the scale")
    res["sampler"] = f"Euler, {opts.steps} steps, ComfyUI's simple schedule, CFG {info['cfg_scale']}"
    try:
        latents = {}
        for v in names:
            clock.check(need_s=opts.steps * 1.5 * res["s_per_step"][v], what=f"{name} sampler ({v})")
            latents[v] = euler(denoise, sampling, vs[v], noise, opts.steps, clock).float()
        base = latents["comfy"]
        res["latent_finite"] = {v: bool(torch.isfinite(x).all()) for v, x in latents.items()}
        res["latent_rel_diff"] = {v: float(torch.linalg.vector_norm(latents[v] - base) / torch.linalg.vector_norm(base))
                                  for v in LEVELS}
    except OutOfTime as exc:
        res["latent_rel_diff_error"] = str(exc)
        RESULT["notes"].append(f"{name}: {exc}")
    res["_model"] = (model, denoise, noise, sigma_mid)  # kept for the Wan checks, dropped before the JSON
    return res


# ---------------------------------------------------------------- Wan: the autotuner against plain timings


class Capture:
    """An override that keeps the first self-attention call's arguments (q, k, v, heads) exactly as ComfyUI
    hands them, and lets ComfyUI's own function serve every call."""

    def __init__(self, tokens: int):
        self.tokens = tokens
        self.args = None

    def __call__(self, func, *args, **kwargs):
        q, k = args[0], args[1]
        if self.args is None and q.dim() == 3 and q.shape[1] == self.tokens and k.shape[1] == self.tokens:
            heads = args[3] if len(args) > 3 else kwargs.get("heads")
            self.args = (q, k, args[2] if len(args) > 2 else kwargs["v"], heads)
            self.func = func
        return func(*args, **kwargs)


def kernel_table(fn, device, reps: int = 1) -> list:
    """[(kernel name, calls, total device us)] of what ``fn`` runs, longest first (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(reps):
            fn()
        sync(device)
    rows = []
    for e in prof.key_averages():
        dev_us = getattr(e, "self_device_time_total", None)
        if dev_us is None:
            dev_us = getattr(e, "self_cuda_time_total", 0.0)
        if device.type == "cuda" and not dev_us:
            continue
        if device.type != "cuda":
            dev_us = e.self_cpu_time_total
        rows.append((e.key, e.count, float(dev_us)))
    return sorted(rows, key=lambda r: -r[2])


ATTN_WORDS = ("flash", "fmha", "attention", "attn", "cudnn", "sdpa", "sm90_", "fwd", "softmax")


def attention_kernels(rows: list) -> list:
    return [r for r in rows if any(w in r[0].lower() for w in ATTN_WORDS) and "gemm" not in r[0].lower()
            and "elementwise" not in r[0].lower()][:6]


def wan_check(res: dict, capture: Capture, device, dtype, clock: Clock, reps: int) -> dict:
    out: dict = {}
    RESULT["checks"]["wan_autotuner"] = out
    if capture.args is None:
        out["error"] = "no 32760-token self-attention call was seen"
        return out
    q, k, v, heads = capture.args
    b, n, hd = q.shape
    d = hd // heads
    qv, kv, vv = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    call = AttentionCall(qv, kv, vv, None, d ** -0.5)
    out["shape"] = f"B{b} H{heads} N{n} D{d} {str(dtype).replace('torch.', '')}"
    out["strides"] = {"q": list(q.stride()), "q_bhnd_view": list(qv.stride()),
                      "contiguous_bnhd": bool(q.is_contiguous())}
    sig = autotune.signature(call)
    entry = autotune.lookup(sig) or {}
    out["signature"] = sig
    out["autotuner_ms"] = dict(entry.get("ms", {}))
    out["autotuner_chosen"] = entry.get("chosen")
    out["autotuner_rejected"] = dict(entry.get("rejected", {}))
    step = res["s_per_step"]["comfy"]
    layers = res["info"]["layers"]
    out["comfy_step_s"] = step
    out["step_ms_per_layer"] = step * 1e3 / layers
    plain: dict = {}
    out["plain_ms"] = plain
    fns = {
        "comfy attention_pytorch (ComfyUI's own function)": lambda: capture.func(q, k, v, heads, _inside_attn_wrapper=True),
        "F.sdpa on the BHND views": lambda: F.scaled_dot_product_attention(qv, kv, vv),
    }
    qc, kc, vc = (t.contiguous() for t in (qv, kv, vv))
    fns["F.sdpa on contiguous BHND copies"] = lambda: F.scaled_dot_product_attention(qc, kc, vc)
    for bk in registry.all_backends():
        if bk.reason_for(call) is None and bk.name not in ("pytorch", "sdpa_math"):
            fns[f"genesis {bk.name}.run(call)"] = (lambda bk=bk: bk.run(call))
    for label, fn in fns.items():
        try:
            clock.check(need_s=2.0, what=f"timing {label}")
            with time_limit(min(40, max(5, int(clock.left() - 30)))):
                med, samples = median_ms(fn, device, reps)
            plain[label] = {"median_ms": med, "first3": statistics.median(samples[:3]),
                            "last3": statistics.median(samples[-3:])}
        except OutOfTime:
            raise
        except Exception as exc:
            plain[label] = {"error": one_line(exc)}
    # the autotuner's own loop, now, outside the model (same inputs)
    try:
        clock.check(need_s=6.0, what="re-measuring with the autotuner")
        names = [n for n in ("sdpa", "sdpa_cudnn", "sdpa_flash") if registry.get(n).reason_for(call) is None]
        fresh = autotune.measure(call, names)
        out["autotuner_again_ms"] = dict(fresh.get("ms", {}))
    except OutOfTime:
        raise
    except Exception as exc:
        out["autotuner_again_error"] = one_line(exc)
    out["hypotheses"] = hypotheses(call, q, k, v, heads, capture, device, clock, reps)
    # which kernels run: Genesis' sdpa as the autotuner times it, ComfyUI's function, and inside the model
    kern: dict = {}
    out["kernels"] = kern
    try:
        kern["genesis sdpa.run(call)"] = attention_kernels(kernel_table(lambda: registry.get("sdpa").run(call), device))
        if registry.get("sdpa_cudnn").reason_for(call) is None:
            kern["genesis sdpa_cudnn.run(call)"] = attention_kernels(
                kernel_table(lambda: registry.get("sdpa_cudnn").run(call), device))
        kern["comfy attention_pytorch"] = attention_kernels(kernel_table(fns[next(iter(fns))], device))
        clock.check(need_s=3 * step + 2, what="profiling a model forward")
        model, denoise, noise, sigma = res["_model"]
        rows = kernel_table(lambda: denoise(noise, sigma, {}), device)
        kern["in the model (ComfyUI default), one step"] = attention_kernels(rows)
        # Self-attention runs once per layer (cond and uncond in one call): its kernels show `layers` calls
        # (cross-attention too, far shorter). Device time per call here is what the model really pays.
        out["in_model_attention"] = [{"kernel": r[0], "calls": r[1], "us_per_call": r[2] / max(1, r[1])}
                                     for r in attention_kernels(rows)]
        out["in_model_device_ms"] = sum(r[2] for r in rows) / 1e3
    except OutOfTime:
        raise
    except Exception as exc:
        kern["error"] = one_line(exc)
    out["verdict"] = judge(out, layers)
    return out


def hypotheses(call, q, k, v, heads, capture, device, clock, reps) -> dict:
    """The autotuner's candidate explanations, each timed on the captured tensors."""
    h: dict = {}
    if device.type != "cuda":
        h["note"] = "CPU dry run: clocks, L2 and streams are GPU questions; only the code path runs"
    sdpa = registry.get("sdpa").run
    cudnn = registry.get("sdpa_cudnn")
    order = getattr(torch._C, "_get_sdp_priority_order", None)
    if order is not None:  # PyTorch's own order for plain SDPA, and the one ComfyUI's comfy.ops sets per call
        try:
            from torch.nn.attention import SDPBackend

            names = {int(v): k for k, v in SDPBackend.__members__.items()}
        except Exception:
            names = {}
        h["sdpa_priority_plain"] = [names.get(int(x), str(x)) for x in order()]
    import comfy.ops

    h["sdpa_priority_comfy"] = [str(x) for x in getattr(comfy.ops, "SDPA_BACKEND_PRIORITY", [])] or "plain SDPA"
    cudnn_ok = cudnn.reason_for(call) is None

    def attempt(key, fn, need_s=3.0):  # one hypothesis; a failure is recorded and the next one runs
        try:
            clock.check(need_s=need_s, what=key)
            h[key] = fn()
        except OutOfTime:
            raise
        except Exception as exc:
            h[key] = {"error": one_line(exc)}

    steady, _ = median_ms(lambda: sdpa(call), device, 5)

    def first_calls():
        # cuDNN builds an execution graph per new shape: a shape never seen before, first call vs steady
        n2 = max(call.q_len // 2, call.q_len - 64)
        c2 = AttentionCall(call.q[:, :, :n2], call.k[:, :, :n2], call.v[:, :, :n2], None, call.scale)
        out = {}
        for name, fn in (("sdpa", lambda: sdpa(c2)), ("sdpa_cudnn", lambda: cudnn.run(c2))):
            if name == "sdpa_cudnn" and not cudnn_ok:
                continue
            first = time_runs(fn, device, 1)[0]
            out[name] = {"first": first, "steady": median_ms(fn, device, 5, warmup=1)[0], "tokens": n2}
        return out

    def after_idle():  # clocks after idling: one call after 2 s of sleep vs steady
        time.sleep(2.0 if device.type == "cuda" else 0.0)
        return {"after_2s_idle": time_runs(lambda: sdpa(call), device, 1)[0], "steady": steady}

    def l2_flushed():  # back to back vs a 256 MB write between calls (events around the attention only)
        flush = torch.empty(256 * 2 ** 20, dtype=torch.uint8, device=device)
        pairs = []
        for _ in range(reps):
            flush.zero_()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            sdpa(call)
            e.record()
            pairs.append((s, e))
        torch.cuda.synchronize(device)
        return {"flushed": statistics.median(s.elapsed_time(e) for s, e in pairs), "back_to_back": steady}

    def busy_stream():  # another stream busy: big matmuls on a side stream while sdpa is timed
        side = torch.cuda.Stream(device)
        a = torch.randn(8192, 8192, device=device, dtype=call.dtype)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(40):
                a @ a
        busy = statistics.median(time_runs(lambda: sdpa(call), device, 5))
        torch.cuda.synchronize(device)
        return {"side_stream_busy": busy, "alone": steady}

    def accepts():  # which sub-kernels PyTorch's SDPA accepts for the views and for contiguous copies
        params = torch.backends.cuda.SDPAParams
        out = {}
        for label, (qq, kk, vv) in (("views", (call.q, call.k, call.v)),
                                    ("contiguous", tuple(t.contiguous() for t in (call.q, call.k, call.v)))):
            try:
                prm = params(qq, kk, vv, None, 0.0, False, False)
            except TypeError:
                prm = params(qq, kk, vv, None, 0.0, False)
            out[label] = {kname: bool(getattr(torch.backends.cuda, f"can_use_{kname}")(prm, False))
                          for kname in ("flash_attention", "efficient_attention", "cudnn_attention")
                          if hasattr(torch.backends.cuda, f"can_use_{kname}")}
        out["cudnn_sdp_enabled"] = bool(torch.backends.cuda.cudnn_sdp_enabled())
        return out

    attempt("first_call_ms", first_calls)
    attempt("after_idle_sdpa_ms", after_idle)
    if device.type == "cuda":
        attempt("l2_sdpa_ms", l2_flushed)
        attempt("busy_stream_sdpa_ms", busy_stream)
        attempt("sdpa_accepts", accepts, need_s=1.0)
    return h


def _numbers(tree, path: str = ""):
    """(dotted path, number) for every number in nested dicts."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _numbers(v, f"{path}.{k}" if path else str(k))
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield path, float(tree)


def _close(a, b) -> bool:
    return bool(a) and bool(b) and abs(a - b) / b <= AGREE


def judge(out: dict, layers: int) -> str:
    """Which figure is wrong, from the numbers (sentences; each names what it compares)."""
    tuned, again, plain = out.get("autotuner_ms", {}), out.get("autotuner_again_ms", {}), out.get("plain_ms", {})
    p = {n: plain.get(f"genesis {n}.run(call)", {}).get("median_ms") for n in ("sdpa", "sdpa_cudnn", "sdpa_flash")}
    comfy = plain.get("comfy attention_pytorch (ComfyUI's own function)", {}).get("median_ms")
    lines = []
    for name in ("sdpa", "sdpa_cudnn"):
        t = tuned.get(name)
        if not (p[name] and t):
            continue
        if _close(t, p[name]):
            lines.append(f"the autotuner's {name} {t:.2f} ms agrees with a plain timing ({p[name]:.2f} ms)")
            continue
        why = f"the autotuner's {name} {t:.2f} ms DISAGREES with a plain timing ({p[name]:.2f} ms)"
        if _close(again.get(name), p[name]):
            why += (f"; measured again outside the model it gives {again[name]:.2f} ms, so the conditions of the "
                    "in-model measurement made the difference")
        elif again.get(name):
            why += f"; the autotuner's own loop gives {again[name]:.2f} ms again now, so its method is off"
        found = [f"{path} = {x:.2f} ms" for path, x in _numbers(out.get("hypotheses", {}))
                 if _close(x, t) and not path.endswith(("steady", "alone", "back_to_back", "tokens"))]
        if found:
            why += "; reproduced by " + ", ".join(found)
        lines.append(why)
    per_layer = out.get("step_ms_per_layer")
    if comfy and per_layer:
        lines.append(f"ComfyUI's own attention_pytorch takes {comfy:.2f} ms per call on these tensors; the step / "
                     f"{layers} layers is {per_layer:.2f} ms per layer, {per_layer - comfy:.2f} ms of it not attention")
        same = [n for n in ("sdpa_cudnn", "sdpa_flash", "sdpa") if _close(comfy, p[n])]
        if same and same[0] != "sdpa" and not _close(comfy, p["sdpa"]):
            lines.append(f"ComfyUI's attention_pytorch runs what Genesis' {same[0]} runs, not what Genesis' sdpa runs "
                         f"(ComfyUI's comfy.ops calls SDPA under sdpa_kernel with cuDNN first; Genesis' sdpa is plain "
                         f"SDPA under PyTorch's default order): a per-call budget taken from ComfyUI's step time "
                         f"describes {same[0]}, and the autotuner's sdpa row is a different kernel, not a wrong timing")
        elif _close(comfy, p["sdpa"]):
            lines.append("ComfyUI's attention_pytorch and Genesis' sdpa take the same time on these tensors")
    model_rows = out.get("in_model_attention") or []
    if model_rows and comfy:
        top = model_rows[0]
        lines.append(f"inside the model the longest attention kernel is {top['kernel'][:60]} at "
                     f"{top['us_per_call'] / 1e3:.2f} ms per call")
    return "; ".join(lines) or "not enough numbers to judge"


# ---------------------------------------------------------------- report


def verdicts() -> list:
    rows = []
    for name, res in RESULT["models"].items():
        sp = res.get("speedup")
        if not sp:
            rows.append((None, f"{name}: no timing ({res.get('error', 'not run')})", ""))
            continue
        if name == "wan":
            best = max(LEVELS, key=lambda lv: sp[lv])
            rows.append((sp[best] >= TARGETS["wan_fastest"], f"wan fastest level ({best}) x{sp[best]:.2f}",
                         f">= x{TARGETS['wan_fastest']}"))
            rows.append((sp["exact"] >= TARGETS["wan_exact"], f"wan exact x{sp['exact']:.2f}", f">= x{TARGETS['wan_exact']}"))
        else:
            for lv in LEVELS:
                rows.append((sp[lv] * TARGETS["not_slower"] >= 1.0, f"{name} {lv} x{sp[lv]:.2f}",
                             "not slower than ComfyUI (1% noise)"))
    chk = RESULT["checks"].get("wan_autotuner", {})
    for name in ("sdpa", "sdpa_cudnn"):
        p = chk.get("plain_ms", {}).get(f"genesis {name}.run(call)", {}).get("median_ms")
        t = chk.get("autotuner_ms", {}).get(name)
        if p and t:
            rows.append((abs(t - p) / p <= AGREE, f"autotuner {name} {t:.2f} ms vs plain {p:.2f} ms",
                         f"within {AGREE:.0%}"))
    return rows


def report(out_dir: Path, clock: Clock) -> None:
    RESULT["elapsed_s"] = round(clock.elapsed(), 1)
    clean = {k: v for k, v in RESULT.items() if k != "models"}
    clean["models"] = {n: {k: v for k, v in r.items() if not k.startswith("_")} for n, r in RESULT["models"].items()}
    clean["autotune_timings"] = autotune.timings()
    clean["verdicts"] = [{"ok": ok, "what": w, "target": t} for ok, w, t in verdicts()]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "comfy_e2e_gpu.json").write_text(json.dumps(clean, indent=2, default=str))
    print()
    for name, res in clean["models"].items():
        if "s_per_step" not in res:
            print(f"{name}: {res.get('error', 'incomplete')}")
            continue
        sps = res["s_per_step"]
        print(f"{name} ({res['info'].get('tokens')} tokens, batch {res['info']['batch']}), s/step: " + ", ".join(
            f"{v} {sps[v]:.4f}" for v in sps) + "; first call s: " + ", ".join(
            f"{v} {t:.2f}" for v, t in res["first_call_s"].items()))
        if "latent_rel_diff" in res:
            print(f"  latent rel diff after {res['sampler']}: " + ", ".join(
                f"{v} {d:.2e}" for v, d in res["latent_rel_diff"].items()))
    chk = clean["checks"].get("wan_autotuner")
    if chk:
        print(f"wan autotuner check ({chk.get('shape')}): {chk.get('verdict')}")
        for label, row in chk.get("plain_ms", {}).items():
            print(f"  {label:52s} {row.get('median_ms', float('nan')):8.3f} ms" if "median_ms" in row
                  else f"  {label:52s} {row.get('error')}")
        if chk.get("autotuner_ms") or chk.get("autotuner_again_ms"):
            print("  autotuner in the model: " + ", ".join(f"{n} {t:.3f}" for n, t in chk.get("autotuner_ms", {}).items())
                  + " ms; measured again now: " + ", ".join(
                      f"{n} {t:.3f}" for n, t in chk.get("autotuner_again_ms", {}).items()) + " ms")
        for hname, val in chk.get("hypotheses", {}).items():
            print(f"  {hname}: {json.dumps(val, default=str)[:150]}")
        for row in chk.get("in_model_attention", [])[:3]:
            print(f"  in the model: {row['kernel'][:60]} x{row['calls']} {row['us_per_call'] / 1e3:.3f} ms per call")
        for key, rows in chk.get("kernels", {}).items():
            if isinstance(rows, list):
                print(f"  kernels, {key}: " + "; ".join(f"{r[0][:70]} x{r[1]}" for r in rows[:3]))
    for e in clean["errors"]:
        print(f"ERROR {e}")
    print(f"\n{'verdict':7s} {'what':58s} target")
    for ok, what, target in verdicts():
        print(f"{({True: 'PASS', False: 'FAIL', None: 'SKIP'})[ok]:7s} {what:58s} {target}")
    print(f"elapsed {clock.elapsed():.0f} s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--cpu-dry-run", action="store_true")
    ap.add_argument("--models", default="wan,sdxl,flux")
    ap.add_argument("--budget-s", type=float, default=330.0, help="soft budget; the watchdog stops at +20 s")
    ap.add_argument("--rounds", type=int, default=5, help="alternated timing rounds per model (>= 2 are kept)")
    ap.add_argument("--steps", type=int, default=4, help="sampler steps for the latent difference")
    ap.add_argument("--reps", type=int, default=20, help="timings per kernel in the Wan check")
    ap.add_argument("--flux-double", type=int, default=19)
    ap.add_argument("--flux-single", type=int, default=38)
    ap.add_argument("--keep-cache", action="store_true",
                    help="use the autotuner's usual cache (default: a fresh one, so it measures inside the model)")
    opts = ap.parse_args(argv)
    out_dir = Path(opts.out)
    clock = Clock(opts.budget_s)
    if not opts.keep_cache:
        os.environ["GENESIS_CACHE_DIR"] = tempfile.mkdtemp(prefix="genesis-e2e-cache-")
        autotune.reload()
    RESULT["autotune_cache"] = str(autotune.cache_dir())
    if opts.cpu_dry_run:
        os.environ.setdefault("GENESIS_AUTOTUNE_BUDGET_MS", "150")
        autotune.set_mode("all")  # measure on CPU too, so the dry run takes the GPU run's path
        device, dtype = torch.device("cpu"), torch.float32
        opts.reps = min(opts.reps, 3)
    else:
        if not torch.cuda.is_available():
            print("SETUP FAILED: no CUDA device (use --cpu-dry-run on CPU)")
            return 2
        device, dtype = torch.device("cuda"), torch.bfloat16
    setup_comfy(opts.cpu_dry_run)
    RESULT["environment"] = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0) if device.type == "cuda"
                             else "cpu", "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
                             "dtype": str(dtype), "backends": {b["name"]: b["available"] for b in registry.report()}}

    def watchdog():
        print(f"WATCHDOG: {opts.budget_s + 20:.0f} s passed; writing what exists and stopping", flush=True)
        try:
            report(out_dir, clock)
        finally:
            os._exit(3)

    timer = threading.Timer(opts.budget_s + 20, watchdog)
    timer.daemon = True
    timer.start()
    models = [m.strip() for m in opts.models.split(",") if m.strip()]
    for i, name in enumerate(models):
        capture = None
        reserve = (0.0 if opts.cpu_dry_run else 50.0 * (len(models) - 1 - i) + (40.0 if name == "wan" else 0.0))
        try:
            if name == "wan":
                capture = Capture(tokens=(3 * 4 * 4) if opts.cpu_dry_run else 32760)
            res = run_model(name, opts, device, dtype, clock, capture, reserve)
            if name == "wan":
                wan_check(res, capture, device, dtype, clock, opts.reps)
        except OutOfTime as exc:
            RESULT["models"].setdefault(name, {})["error"] = str(exc)
            RESULT["errors"].append(f"{name}: {exc}")
        except Exception as exc:
            RESULT["models"].setdefault(name, {})["error"] = one_line(exc)
            RESULT["errors"].append(f"{name}: {one_line(exc)}\n{traceback.format_exc(limit=4)}")
        finally:
            RESULT["models"].get(name, {}).pop("_model", None)
            if capture is not None:
                capture.args = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    timer.cancel()
    report(out_dir, clock)
    return 0 if not RESULT["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
