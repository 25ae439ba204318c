"""How much memory a device has free, and a guard that says so before a large allocation. Leaf module."""
from __future__ import annotations

import os
from typing import Optional

import torch


def available_bytes(device) -> Optional[int]:
    """Bytes free for new tensors on ``device`` (CUDA: the driver's free memory plus what PyTorch's cache holds
    unused; CPU: the kernel's MemAvailable, else physical pages, and never more than the process's memory cgroup
    still allows, as in a container), or None when it cannot be known."""
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
        free = _host_available()
        room = cgroup_headroom()
        if free is None or room is None:
            return free if room is None else room
        return min(free, room)
    return None


def _host_available() -> Optional[int]:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


_NO_LIMIT = 1 << 60  # cgroup v1 writes "no limit" as a number near 2**63


def _read_int(path: str) -> Optional[int]:
    try:
        with open(path, encoding="ascii") as fh:
            text = fh.read().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return None if value >= _NO_LIMIT else value


def _read_stat(path: str, key: str) -> int:
    try:
        with open(path, encoding="ascii") as fh:
            for line in fh:
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0


def cgroup_headroom(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> Optional[int]:
    """Bytes this process's memory cgroup (v2 or v1) and its ancestors still allow it to grow by: the tightest
    limit minus usage, plus the inactive page cache the kernel reclaims first. None where no limit is set or it
    cannot be read (not Linux, no cgroup filesystem). ``proc_cgroup`` and ``root`` are for tests."""
    try:
        with open(proc_cgroup, encoding="ascii") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    best: Optional[int] = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            mounts = (root, os.path.join(root, "unified"))
            files = ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):
            mounts = (os.path.join(root, "memory"),)
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        limit_name, usage_name, cache_key = files
        for mount in mounts:
            # from the process's own group up to the root: every level's limit applies
            level = path.rstrip("/")
            while True:
                base = mount + level
                limit = _read_int(os.path.join(base, limit_name))
                if limit is not None:
                    usage = _read_int(os.path.join(base, usage_name)) or 0
                    room = max(0, limit - usage) + _read_stat(os.path.join(base, "memory.stat"), cache_key)
                    best = room if best is None else min(best, room)
                if not level:
                    break
                level = level.rsplit("/", 1)[0]
    return best


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def scores_refusal(elements: int, bytes_per_element: int, device, share: float = 0.5) -> Optional[str]:
    """Why a kernel that materialises ``elements`` attention scores (``bytes_per_element`` each, scores and
    softmax together) should not run on ``device``: over ``share`` of its free memory. None when it fits."""
    need = elements * bytes_per_element
    free = available_bytes(device)
    if free is None or need <= free * share:
        return None
    return (f"would materialise {need / 2**30:.1f} GiB of attention scores "
            f"({free / 2**30:.1f} GiB free on {torch.device(device)})")


def over_limit(need_bytes: int, device, fraction: float = 0.8) -> Optional[str]:
    """Why allocating ``need_bytes`` on ``device`` should not be tried, naming the size and the limit, worded to
    follow "needs": ``"4.00 GiB, over the limit of 3.20 GiB on cpu (80% of the 4.00 GiB free)"``; None when it
    fits or the free memory cannot be known. For checks of user-given sizes before they reach the allocator."""
    free = available_bytes(device)
    if free is None or need_bytes <= free * fraction:
        return None
    return (f"{gib(need_bytes)}, over the limit of {gib(free * fraction)} on {torch.device(device)} "
            f"({fraction:.0%} of the {gib(free)} free)")
