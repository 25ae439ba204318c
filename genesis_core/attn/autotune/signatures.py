"""The autotuner's keys: a call's signature, and the environment its measurements depend on.

A *signature* is (device and GPU name, dtype, B·H bucket, Nq bucket, Nk bucket, head_dim, GQA group, mask
kind, memory layout). Buckets are half-octaves (…, 4096, 5793, 8192, …), so the many token counts of one
model share a handful of measurements. The *environment* names what timings move with: for accelerators
the GPU names, torch/CUDA/HIP/cuDNN and kernel package versions; for CPU torch and the processor.
"""
from __future__ import annotations

import math
from typing import Dict, List

import torch

from ..types import AttentionCall

# Distributions whose versions key the accelerator cache (a new kernel build is a new environment).
KERNEL_DISTRIBUTIONS = ("flash-attn", "flash_attn_3", "fa3-fwd", "flash-attn-4", "flash-attn-cute",
                        "sageattention", "xformers", "triton", "nvidia-cudnn-frontend")

_envs: Dict[str, dict] = {}
_device_names: Dict[int, str] = {}


def bucket(n: int) -> int:
    """Half-octave bucket (upper bound) of a size: exact up to 16, then 2**(k/2) rounded up."""
    if n <= 16:
        return int(n)
    return int(math.ceil(2 ** (math.ceil(2 * math.log2(n) - 1e-9) / 2) - 1e-6))


def device_label(device: torch.device) -> str:
    """``"cuda:<GPU name>"`` on CUDA (so the choice follows the card, not its index), else the device type."""
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        name = _device_names.get(idx)
        if name is None:
            name = _device_names[idx] = torch.cuda.get_device_name(idx)
        return f"cuda:{name}"
    return device.type


def layout_tag(t: torch.Tensor) -> str:
    """Memory layout of a BHND view: ``BHND`` (contiguous), ``BNHD`` (transposed) or ``strided``."""
    if t.is_contiguous():
        return "BHND"
    if t.transpose(1, 2).is_contiguous():
        return "BNHD"
    return "strided"


def signature(call: AttentionCall) -> str:
    """The autotuner's key for ``call`` (see the module docstring)."""
    dv = "" if call.v_head_dim == call.head_dim else f"/{call.v_head_dim}"
    gqa = f" gqa{call.heads // call.kv_heads}" if call.gqa else ""
    return (
        f"{device_label(call.device)} {str(call.dtype).replace('torch.', '')} "
        f"BH{bucket(call.batch * call.heads)} Nq{bucket(call.q_len)} Nk{bucket(call.kv_len)} "
        f"D{call.head_dim}{dv}{gqa} mask={call.mask_kind} {layout_tag(call.q)}"
    )


def kind_of(sig_or_type: str) -> str:
    """Which cache file a signature (or device type) belongs to: ``"cpu"`` or ``"accel"``."""
    return "cpu" if sig_or_type == "cpu" or sig_or_type.startswith("cpu ") else "accel"


def accel_env_is_cheap() -> bool:
    # GPU names need a CUDA context; never create one just to read a cache (a CPU-only run on a GPU box).
    return not torch.cuda.is_available() or torch.cuda.is_initialized()


def environment(kind: str = "accel") -> dict:
    """What the measurements depend on. ``"accel"``: GPU names, torch/CUDA/HIP/cuDNN and kernel package
    versions; ``"cpu"``: torch and the processor (CPU choices do not move with the GPU or its kernels)."""
    env = _envs.get(kind)
    if env is None:
        from ..backends._common import package_version
        from ... import __version__ as genesis_version

        if kind == "cpu":
            import platform

            env = {"kind": "cpu", "genesis": genesis_version, "torch": torch.__version__,
                   "machine": platform.machine(), "processor": platform.processor()}
        else:
            gpus: List[str] = []
            cudnn = None
            if torch.cuda.is_available():
                try:
                    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                    cudnn = torch.backends.cudnn.version()
                except Exception:
                    gpus = ["unknown"]
            env = {"kind": "accel", "genesis": genesis_version, "torch": torch.__version__,
                   "cuda": torch.version.cuda, "hip": getattr(torch.version, "hip", None), "cudnn": cudnn,
                   "gpus": gpus, "packages": {d: package_version(d) for d in KERNEL_DISTRIBUTIONS}}
        _envs[kind] = env
    return env
