"""Run by ComfyUI-Manager after cloning: install requirements.txt with this interpreter, then report accelerators.

Never installs or upgrades torch. Prints which attention kernels and compute backends are present,
and for each missing one the pip line that would add it.
"""
from __future__ import annotations

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PIP_HINTS = {
    "flash": "pip install fa3-fwd   (FlashAttention-3 on Hopper; or PyTorch's built-in FlashAttention is used)",
    "fa3": "pip install fa3-fwd   (Hopper GPUs, bf16, forward only)",
    "fa2": "pip install flash-attn --no-build-isolation   (Ampere or newer)",
    "fa4": "pip install 'flash-attn-4[cu13]'   (Hopper/Blackwell; not verified by Genesis on hardware yet)",
    "sage": "build SageAttention 2 from github.com/thu-ml/SageAttention (pip has only 1.0.6: pip install sageattention)",
    "fa3_fp8": "pip install fa3-fwd triton   (Hopper; Genesis quantises with its own Triton kernels)",
    "fp8_cudnn": "pip install nvidia-cudnn-frontend triton   (Hopper or newer, cuDNN >= 9.1)",
    "xformers": "pip install xformers   (must match your torch build: see xformers' install notes)",
    "onnx": "pip install onnx onnxruntime   (onnxruntime-gpu for CUDA)",
    "webgpu": "pip install wgpu   (needs a Vulkan/Metal/D3D12 driver)",
}
_TORCH_NAMES = ("torch", "torchvision", "torchaudio")


def _requirements() -> list:
    path = os.path.join(HERE, "requirements.txt")
    reqs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            name = line.split("=")[0].split("<")[0].split(">")[0].split("[")[0].strip().lower()
            if line and name not in _TORCH_NAMES:
                reqs.append(line)
    return reqs


def main() -> int:
    reqs = _requirements()
    if reqs:
        print(f"[Genesis] installing {', '.join(reqs)} with {sys.executable}")
        subprocess.check_call([sys.executable, "-m", "pip", "install", *reqs])
    else:
        print("[Genesis] no extra Python packages needed (torch comes from ComfyUI)")
    sys.path.insert(0, HERE)
    try:
        from genesis_core.info import get_interface_info
    except Exception as exc:  # torch missing or broken: say so, do not try to fix torch
        print(f"[Genesis] could not import the engine ({type(exc).__name__}: {exc}); is torch installed?")
        return 1
    info = get_interface_info()
    print("[Genesis] attention backends:")
    for name, b in info["multi_attention"]["backends"].items():
        status = "present" if b["available"] else f"missing: {b['reason']}"
        hint = "" if b["available"] or name not in PIP_HINTS else f"\n            -> {PIP_HINTS[name]}"
        print(f"  {name:15s} {status}{hint}")
    print("[Genesis] compute backends:")
    for name, d in info["heterogeneous_compute"]["details"].items():
        status = "present " + ", ".join(d["devices"]) if d["available"] else f"missing: {d['reason']}"
        hint = "" if d["available"] or name not in PIP_HINTS else f"\n            -> {PIP_HINTS[name]}"
        print(f"  {name:8s} {status}{hint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
