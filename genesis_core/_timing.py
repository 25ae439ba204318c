"""Timing primitives shared by the attention autotuner and the benchmarks. Leaf module (torch, ``_device``).

* :func:`time_runs`: milliseconds of single runs (CUDA events on CUDA, else a host clock around a
  synchronize);
* :func:`repeat`: ``times`` calls as one function, for samples of short calls;
* :func:`inner_count`: how many back-to-back calls make one sample, from the fastest call's time;
* :func:`rotated`: the order of round ``r`` of interleaved timing (no candidate keeps a fixed place);
* :func:`alternate`: two functions timed in strict alternation, medians per call.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, List, Sequence, Tuple, TypeVar

import torch

from ._device import synchronize

T = TypeVar("T")

SAMPLE_MS = 0.5  # a sample of short calls lasts about this long: clock and launch granularity stay out
MAX_INNER = 50


def time_runs(fn: Callable[[], object], device: torch.device, reps: int) -> List[float]:
    """Milliseconds of ``reps`` runs of ``fn``: CUDA events on CUDA, else perf_counter around a synchronize."""
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) for s, e in events]
    out = []
    for _ in range(reps):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def repeat(fn: Callable[[], object], times: int) -> Callable[[], None]:
    """A function that calls ``fn`` ``times`` times, keeping no result alive."""
    def run() -> None:
        for _ in range(times):
            fn()

    return run


def inner_count(fastest_ms: float) -> int:
    """Back-to-back calls per timed sample when the fastest call takes ``fastest_ms``: about
    ``SAMPLE_MS`` worth, between 1 and ``MAX_INNER``. Use one count for every candidate of a comparison,
    so launch and clock overheads are amortised alike."""
    return int(max(1, min(MAX_INNER, SAMPLE_MS / max(fastest_ms, 1e-4))))


def rotated(items: Sequence[T], r: int) -> List[T]:
    """``items`` rotated by ``r`` places: round ``r`` of interleaved timing starts with a different
    candidate, so none always runs right after one that thrashes caches or changes clocks."""
    items = list(items)
    if not items:
        return items
    k = r % len(items)
    return items[k:] + items[:k]


def alternate(first: Callable[[], object], second: Callable[[], object], n_inner: int, rounds: int,
              device: torch.device) -> Tuple[float, float]:
    """Median ms per call of ``first`` and of ``second``, timed in strict alternation (``n_inner`` calls per
    sample, who goes first swapping every round), so drift and clocks hit both alike."""
    pair = (first, second)
    samples: List[List[float]] = [[], []]
    with torch.no_grad():
        for r in range(rounds):
            for i in ((0, 1) if r % 2 == 0 else (1, 0)):
                samples[i].append(time_runs(repeat(pair[i], n_inner), device, 1)[0] / n_inner)
    return statistics.median(samples[0]), statistics.median(samples[1])
