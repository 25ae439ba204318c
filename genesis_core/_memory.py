"""How much memory a device has free, and a guard that says so before a large allocation. Leaf module."""
from __future__ import annotations

import os
from typing import Optional

import torch


def available_bytes(device) -> Optional[int]:
    """Bytes free for new tensors on ``device`` (CUDA: the driver's free memory plus what PyTorch's cache holds
    unused; CPU: the kernel's MemAvailable, else physical pages), or None when it cannot be known."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(device)
            idx = device.index if device.index is not None else torch.cuda.current_device()
            cached = torch.cuda.memory_reserved(idx) - torch.cuda.memory_allocated(idx)
            return int(free + max(cached, 0))
        except Exception:
            return None
    if device.type == "cpu":
        try:
            with open("/proc/meminfo", encoding="ascii") as fh:
                for line in fh:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (AttributeError, ValueError, OSError):
            return None
    return None


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def too_big(need_bytes: int, device, fraction: float = 0.8) -> Optional[str]:
    """Why allocating ``need_bytes`` on ``device`` should not be tried (over ``fraction`` of what is free), or
    None when it fits or the free memory cannot be known."""
    free = available_bytes(device)
    if free is None or need_bytes <= free * fraction:
        return None
    return (f"needs {gib(need_bytes)} on {torch.device(device)}, but only {gib(free)} is free "
            f"(limit {fraction:.0%} of free memory)")


def scores_refusal(elements: int, bytes_per_element: int, device, share: float = 0.5) -> Optional[str]:
    """Why a kernel that materialises ``elements`` attention scores (``bytes_per_element`` each, scores and
    softmax together) should not run on ``device``: over ``share`` of its free memory. None when it fits."""
    need = elements * bytes_per_element
    free = available_bytes(device)
    if free is None or need <= free * share:
        return None
    return (f"would materialise {need / 2**30:.1f} GiB of attention scores "
            f"({free / 2**30:.1f} GiB free on {torch.device(device)})")
