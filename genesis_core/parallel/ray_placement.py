"""``parallel_execute`` placed by Ray: data splits on the GPUs (or CPUs) of one host or many, results in order.

:func:`ray_parallel_execute` runs ``fn(split)`` (a tuple split is unpacked into arguments) for each split as one
Ray task holding one GPU (``use_gpu``) or one CPU, spread over the cluster's hosts, and returns the results in
split order, moved to the CPU (or ``return_device``). Tensors in a split travel through Ray's object store and are
moved to the task's GPU before ``fn`` runs. When splits fail, every other split still finishes, then
:class:`RayPlacementError` names each failed split with its host, GPU and error.

It is the placement the spec's ``HeterogeneousExecutor.parallel_execute`` gains for several hosts; Ray is
imported only when it runs (``pip install comfyui-genesis[ray]``).
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple

from .ray_workers import _code_paths, _ray, connect

__all__ = ["ray_parallel_execute", "place_splits", "RayPlacementError"]


def place_splits(fn: Callable[..., Any], data_splits: Sequence[Any], backends: Optional[Sequence[Any]],
                 return_device: Optional[Any], address: Optional[str]) -> List[Any]:
    """``HeterogeneousExecutor.parallel_execute(..., placement="ray")``: check its arguments, then
    :func:`ray_parallel_execute` with one GPU per split (``backends`` None or all ``"cuda"``) or one CPU (all
    ``"cpu"``)."""
    if not isinstance(data_splits, (list, tuple)) or not data_splits:
        raise ValueError(f"data_splits must be a non-empty list or tuple; got {type(data_splits).__name__}")
    kinds = {str(getattr(b, "value", b)).split(":")[0] for b in backends} if backends else {"cuda"}
    if len(kinds) != 1 or not kinds <= {"cuda", "cpu"}:
        raise ValueError(f"with placement='ray', backends must be all 'cuda' or all 'cpu' (or None for GPUs); "
                         f"got {sorted(kinds)}")
    if backends is not None and len(backends) != len(data_splits):
        raise ValueError(f"data_splits and backends must have the same length; got {len(data_splits)} splits "
                         f"and {len(backends)} backends")
    target = None if return_device is None else str(return_device)
    return ray_parallel_execute(fn, list(data_splits), address=address, use_gpu=kinds == {"cuda"},
                                return_device=target)


class RayPlacementError(RuntimeError):
    """Some splits failed; ``failures`` lists ``(split index, where, error text)``."""

    def __init__(self, failures: List[Tuple[int, str, str]], total: int):
        self.failures = failures
        lines = [f"split {i} on {where}: {err}" for i, where, err in failures]
        super().__init__(f"{len(failures)} of {total} split(s) failed on Ray workers:\n  " + "\n  ".join(lines))


def _run_split(sys_path, use_gpu: bool, fn, split, return_device: Optional[str]):
    import os
    import socket
    import sys
    import traceback

    for p in reversed(list(sys_path)):
        if p not in sys.path:
            sys.path.insert(0, p)
    import ray as _r
    import torch

    where = f"host {socket.gethostname()} ({_r.util.get_node_ip_address()}), pid {os.getpid()}"
    gpus = _r.get_gpu_ids()
    if gpus:
        where += f", GPU {','.join(str(g) for g in gpus)}"
    device = torch.device("cuda:0" if use_gpu else "cpu")

    def move(x, dev):
        if isinstance(x, torch.Tensor):
            return x.to(dev)
        if isinstance(x, (list, tuple)):
            return type(x)(move(v, dev) for v in x)
        if isinstance(x, dict):
            return {k: move(v, dev) for k, v in x.items()}
        return x

    try:
        args = split if isinstance(split, tuple) else (split,)
        out = fn(*move(args, device))
        return True, where, move(out, torch.device(return_device or "cpu"))
    except Exception:  # noqa: BLE001 (reported with the split's index and place)
        return False, where, traceback.format_exc(limit=6).strip().splitlines()[-1]


def ray_parallel_execute(fn: Callable[..., Any], data_splits: Sequence[Any], *, address: Optional[str] = None,
                         use_gpu: bool = True, strategy: str = "SPREAD", return_device: Optional[str] = None,
                         timeout_s: float = 3600.0) -> List[Any]:
    """Run ``fn`` on every split, one Ray task (one GPU or one CPU) per split, on any host of the cluster.

    Args:
        fn: a function Ray can pickle (module-level, or defined in ``__main__``).
        data_splits: a list or tuple; a tuple split is unpacked into positional arguments.
        address: the Ray cluster (empty/None: embedded Ray here, or ``RAY_ADDRESS``); joined by
            :func:`~genesis_core.parallel.ray_workers.connect`, which keeps Ray on this machine on 127.0.0.1.
        use_gpu: one GPU per split (tensors moved to it) or one CPU.
        strategy: Ray scheduling: ``"SPREAD"`` (default: over the hosts) or ``"DEFAULT"``.
        return_device: where results land (default ``"cpu"``).
    Returns: the results in split order. Raises RayPlacementError naming every failed split.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable; got {type(fn).__name__}")
    if not isinstance(data_splits, (list, tuple)) or len(data_splits) == 0:
        raise ValueError("data_splits must be a non-empty list or tuple")
    ray = _ray()
    connect(address)
    task = ray.remote(_run_split).options(num_gpus=1 if use_gpu else 0, num_cpus=1, scheduling_strategy=strategy,
                                          max_retries=0)
    paths = _code_paths()
    fn_ref = ray.put(fn)
    futures = [task.remote(paths, use_gpu, fn_ref, split, return_device) for split in data_splits]
    results: List[Any] = [None] * len(futures)
    failures: List[Tuple[int, str, str]] = []
    for i, f in enumerate(futures):
        try:
            ok, where, value = ray.get(f, timeout=timeout_s)
        except Exception as exc:  # noqa: BLE001 (the task's process died, or the wait ran out)
            failures.append((i, "a Ray worker", f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"))
            continue
        if ok:
            results[i] = value
        else:
            failures.append((i, where, value))
    if failures:
        raise RayPlacementError(failures, len(futures))
    return results
