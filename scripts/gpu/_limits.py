"""What the GPU scripts share: a per-kernel time limit (SIGALRM in the main thread), a device sync, and the device
time per call of every kernel a function launches (torch.profiler)."""
from __future__ import annotations

import contextlib
import signal

import torch


class Timeout(TimeoutError):
    pass


@contextlib.contextmanager
def time_limit(seconds: int):
    """Raise Timeout in the main thread after ``seconds`` (at least 1; whenever Python code runs again)."""
    def handler(signum, frame):
        raise Timeout(f"over {seconds} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(max(1, int(seconds)))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kernel_times(fn, calls: int):
    """Device time per call of every kernel ``fn()`` launches at least once per call, slowest first: rows of
    ``{"kernel", "calls" (per call), "us_per_call"}`` from torch.profiler over ``calls`` calls (CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0 and e.count >= calls:
            rows.append({"kernel": e.key[:90], "calls": e.count // calls, "us_per_call": t / calls})
    return sorted(rows, key=lambda r: -r["us_per_call"])
