"""Peak of the memory PyTorch's CPU allocator hands out while a function runs (for memory-bound tests).

Read from the profiler's memory events (every allocation and free, with its size, in order), so it sees
torch tensors, unlike tracemalloc, and it does not depend on what the C allocator keeps or returns, unlike RSS.
"""
from __future__ import annotations

from typing import Any, Callable, Tuple

from torch.profiler import ProfilerActivity, profile


def peak_bytes(fn: Callable[[], Any]) -> Tuple[int, Any]:
    """(highest number of bytes allocated at once above the level at the start, fn's result)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    level = peak = 0
    for _, n in events:
        level += n
        peak = max(peak, level)
    return peak, result
