"""What the GPU scripts share: a per-kernel time limit (SIGALRM in the main thread) and a device sync."""
from __future__ import annotations

import contextlib
import signal

import torch


class Timeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int):
    """Raise Timeout in the main thread after ``seconds`` (whenever Python code runs again)."""
    def handler(signum, frame):
        raise Timeout(f"over {seconds} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
