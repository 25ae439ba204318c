"""GenesisMultiGPU: make a MODEL run its sampling across GPUs (CFG branches, sequence shards, or both), scoped to
a clone of that model; the workers are Ray actors on this machine or on a Ray cluster."""
from __future__ import annotations

from typing import Tuple

from ..genesis_core._log import log_once
from ..genesis_core.attn import QUALITY_LEVELS, backend_name
from ..genesis_core.comfyui import ComfyUINodeInterface, register_comfyui_node
from ..genesis_core.interop.comfy_parallel import MultiGPUModelFunction, ParallelSettings, sequence_support
from ._common import ATTENTION_CHOICES, tooltip

MODES = ["cfg", "sequence", "both"]
NODE = "GenesisMultiGPU"
QUALITY_TOOLTIP = (
    "Quality budget of each worker's attention, as on the Genesis Attention Switch: exact (only kernels in the "
    "model's own precision), high (also SageAttention's INT8 kernels), fast (also FP8 kernels); lower levels are "
    "checked against a float64 reference on the live inputs. A Genesis Attention Switch on this model governs "
    "instead (its quality and exact steps, one choice for both). An explicit lossy attention (sage) runs at least "
    "at the level it needs. Ring blocks (ring > 1) always run exact: they need a log-sum-exp only PyTorch's SDPA "
    "returns."
)


def parse_gpus(text: str, use_gpu: bool, address: str) -> Tuple[int, tuple]:
    """``(count, ids)`` from the ``gpus`` input: "" (every GPU: this machine's, or the cluster's with an address),
    "N" (a count) or "0,2,3" (these GPUs of this machine)."""
    text = (text or "").strip()
    if not text:
        if not use_gpu:
            raise ValueError(f"{NODE}: input 'gpus' must give the number of CPU workers when workers = cpu; got ''")
        if address:
            from ..genesis_core.parallel.ray_workers import connect

            return int(connect(address)["resources"].get("GPU", 0)), ()
        import torch

        return torch.cuda.device_count(), ()
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not all(p.isdigit() for p in parts):
        raise ValueError(f"{NODE}: input 'gpus' must be empty, a count such as 4, or GPU indices such as 0,1,3; "
                         f"got {text!r}")
    if len(parts) == 1 and "," not in text:
        return int(parts[0]), ()
    ids = tuple(int(p) for p in parts)
    if len(set(ids)) != len(ids):
        raise ValueError(f"{NODE}: input 'gpus' names a GPU twice: {text!r}")
    if address:
        raise ValueError(f"{NODE}: GPU indices ({text!r}) only apply to this machine; with a Ray address give a "
                         "count and Ray places the workers")
    return len(ids), ids


def degrees(mode: str, count: int, ring: int) -> Tuple[int, int, int]:
    """``(cfg, ulysses, ring)`` for a mode and a worker count (raises ValueError with a sentence)."""
    if mode not in MODES:
        raise ValueError(f"{NODE}: input 'mode' must be one of {MODES}; got {mode!r}")
    if count < 2:
        raise ValueError(f"{NODE}: needs at least 2 workers to split anything; input 'gpus' gives {count}")
    cfg = 1 if mode == "sequence" else 2
    if mode == "cfg" and count != 2:
        raise ValueError(f"{NODE}: mode 'cfg' runs cond and uncond on exactly 2 workers; input 'gpus' gives {count} "
                         "(use mode 'both' to shard each branch's tokens too)")
    if count % cfg:
        raise ValueError(f"{NODE}: mode 'both' splits the workers into 2 CFG branches; {count} is odd")
    seq = count // cfg
    if mode == "cfg":
        return 2, 1, 1
    if ring < 1 or seq % ring:
        raise ValueError(f"{NODE}: input 'ring' ({ring}) must divide the {seq} workers of each branch")
    return cfg, seq // ring, ring


@register_comfyui_node(NODE, display_name="Genesis Multi-GPU")
class GenesisMultiGPU(ComfyUINodeInterface):
    """MODEL -> a clone whose every model call runs on several GPUs (or CPU workers) placed by Ray."""

    CATEGORY = "genesis/parallel"
    DESCRIPTION = (
        "Runs the model's sampling across GPUs. 'cfg' computes cond and uncond on two GPUs at once (nothing to "
        "gain when CFG = 1); 'sequence' cuts the image/video tokens across the GPUs (Ulysses all-to-all, plus a "
        "ring when 'ring' > 1; ComfyUI's Flux, Wan, SD3 / SD3.5 and HunyuanVideo / HunyuanImage 2.1 models; others "
        "are refused with the reason); 'both' does the two. Each GPU gets its own copy of "
        "the model once; per step only latents and conditioning travel. The result equals one GPU's within float "
        "tolerance. Empty Ray address: workers on this machine; an address joins a Ray cluster of several hosts. "
        "Only the returned model changes (a clone); the ComfyUI process keeps its own copy of the weights. The "
        "workers' attention runs at 'quality', or at a Genesis Attention Switch's quality and exact steps when the "
        "model has one."
    )
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("A clone of the model whose sampling runs across the chosen GPUs.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", tooltip("The diffusion model to spread (it is cloned, never changed in place).")),
                "mode": (list(MODES), tooltip(
                    "cfg: cond and uncond on two GPUs (needs CFG > 1). sequence: the tokens cut across the GPUs "
                    "(Flux, Wan, SD3, HunyuanVideo). both: two CFG branches, each cutting its tokens across half "
                    "the GPUs.",
                    default="cfg")),
                "gpus": ("STRING", tooltip(
                    "Which workers: a count (2, 4, 8), GPU indices of this machine (0,1,3), or empty for every GPU "
                    "(this machine's, or the cluster's when a Ray address is set).", default="2")),
                "ring": ("INT", tooltip(
                    "Ring degree inside each sequence group (1 = Ulysses all-to-all only). Use a ring when the "
                    "model's heads do not divide among the GPUs, or across hosts.", default=1, min=1, max=64)),
                "ray_address": ("STRING", tooltip(
                    "Empty: Ray runs embedded on this machine. Otherwise the Ray cluster to join, e.g. "
                    "ray://head:10001 or head:6379 (RAY_ADDRESS is used when this is empty and it is set).",
                    default="")),
            },
            "optional": {
                "workers": (["gpu", "cpu"], tooltip(
                    "gpu: one GPU per worker (NCCL). cpu: CPU workers (gloo), for machines without GPUs.",
                    default="gpu")),
                "attention": (list(ATTENTION_CHOICES), tooltip(
                    "Genesis attention backend for each worker's local attention (auto = measured choice).",
                    default="auto")),
                "quality": (list(QUALITY_LEVELS), tooltip(QUALITY_TOOLTIP, default="exact")),
            },
        }

    def execute(self, model, mode: str = "cfg", gpus: str = "2", ring: int = 1, ray_address: str = "",
                workers: str = "gpu", attention: str = "auto", quality: str = "exact"):
        if not hasattr(model, "clone") or not hasattr(model, "model_options"):
            raise ValueError(f"{NODE}: input 'model' must be a ComfyUI MODEL; got a {type(model).__name__}")
        if workers not in ("gpu", "cpu"):
            raise ValueError(f"{NODE}: input 'workers' must be 'gpu' or 'cpu'; got {workers!r}")
        try:
            backend = backend_name(attention)
        except ValueError as exc:
            raise ValueError(f"{NODE}: input 'attention': {exc}") from None
        if quality not in QUALITY_LEVELS:
            raise ValueError(f"{NODE}: input 'quality' must be one of {', '.join(QUALITY_LEVELS)}; got {quality!r}")
        address = (ray_address or "").strip()
        use_gpu = workers == "gpu"
        count, ids = parse_gpus(gpus, use_gpu, address)
        cfg, ulysses, ring_degree = degrees(mode, count, int(ring))
        diffusion_model = getattr(getattr(model, "model", None), "diffusion_model", None)
        if ulysses * ring_degree > 1 and diffusion_model is not None:
            reason = sequence_support(diffusion_model, ulysses, ring_degree)
            if reason:
                raise ValueError(f"{NODE}: mode '{mode}' cannot split this model: {reason}")
        settings = ParallelSettings(cfg=cfg, ulysses=ulysses, ring=ring_degree, use_gpu=use_gpu, address=address,
                                    gpu_ids=ids, backend=backend, quality=quality)
        patched = model.clone()
        previous = patched.model_options.get("model_function_wrapper")
        if previous is not None and not isinstance(previous, MultiGPUModelFunction):
            log_once((NODE, "replaces-wrapper", type(previous).__name__),
                     f"{NODE} replaces another node's model function wrapper ({type(previous).__name__}) on this model")
        patched.set_model_unet_function_wrapper(MultiGPUModelFunction(settings))
        return (patched,)
