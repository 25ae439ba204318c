"""Device helpers shared by the attention autotuner, the benchmarks and the executor."""
from __future__ import annotations

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` (CUDA/ROCm, MPS, XPU, Ascend NPU); a no-op on CPU and others."""
    kind = device.type
    if kind == "cuda":
        torch.cuda.synchronize(device)
    elif kind == "mps" and hasattr(torch, "mps"):
        torch.mps.synchronize()
    elif kind == "xpu" and hasattr(torch, "xpu"):
        torch.xpu.synchronize(device)
    elif kind == "npu" and hasattr(torch, "npu"):
        torch.npu.synchronize(device)
