"""Local worker processes joined in one torch.distributed group, kept alive between runs (no Ray needed).

:class:`LocalProcessGroup` spawns ``world_size`` processes on this machine (``torch.multiprocessing`` spawn),
joins them with ``torch.distributed`` (gloo on CPU, NCCL on GPUs; rendezvous on 127.0.0.1), and runs a
module-level function ``fn(ctx, *args)`` on every rank, returning the results in rank order. Used by the tests and
by ``scripts/gpu/scaleout.py``; ComfyUI runs place their workers with Ray instead (:mod:`.ray_workers`).

A rank that raises or dies fails the run with an error naming the rank, and the whole group is shut down (the
survivors' collectives cannot complete); the next :class:`LocalProcessGroup` starts fresh processes.
"""
from __future__ import annotations

import os
import queue
import socket
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

__all__ = ["LocalProcessGroup", "WorkerContext", "WorkerFailed", "free_port"]


class WorkerFailed(RuntimeError):
    """A worker raised or died; ``rank`` names it."""

    def __init__(self, message: str, rank: Optional[int] = None):
        super().__init__(message)
        self.rank = rank


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class WorkerContext:
    """What a function run by :meth:`LocalProcessGroup.run` receives first: its rank and a per-process cache."""

    rank: int
    world_size: int
    device: str
    cache: Dict[str, Any] = field(default_factory=dict)


def _worker_main(rank, world, port, backend, device, inq, outq, env, timeout_s):
    os.environ.update(env or {})
    import datetime

    import torch
    import torch.distributed as dist

    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    init = dict(backend=backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                timeout=datetime.timedelta(seconds=timeout_s))
    if backend == "nccl":
        init["device_id"] = torch.device(device)
    try:
        dist.init_process_group(**init)
    except Exception as exc:  # noqa: BLE001 (reported to the parent, which names the rank)
        outq.put((-1, rank, False, f"could not join the process group: {exc!r}"))
        return
    outq.put((-1, rank, True, os.getpid()))
    ctx = WorkerContext(rank, world, device)
    while True:
        task = inq.get()
        if task is None:
            break
        task_id, fn, args = task
        try:
            outq.put((task_id, rank, True, fn(ctx, *args)))
        except BaseException:  # noqa: BLE001
            outq.put((task_id, rank, False, traceback.format_exc(limit=12)))
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass


class LocalProcessGroup:
    """``world_size`` local processes in one torch.distributed group (see the module docstring).

    Args:
        world_size: number of processes (ranks).
        backend: ``"gloo"`` (CPU tensors) or ``"nccl"`` (one GPU per rank).
        devices: the torch device of each rank; default ``cpu`` for gloo, ``cuda:<rank>`` for NCCL.
        env: environment variables set in every worker before torch.distributed starts.
        timeout_s: collective timeout inside the workers, and the default wait of :meth:`run`.
    """

    def __init__(self, world_size: int, backend: str = "gloo", devices: Optional[Sequence[str]] = None,
                 env: Optional[Dict[str, str]] = None, timeout_s: float = 120.0):
        import torch.multiprocessing as mp

        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive int; got {world_size!r}")
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be 'gloo' or 'nccl'; got {backend!r}")
        if devices is None:
            devices = [f"cuda:{r}" if backend == "nccl" else "cpu" for r in range(world_size)]
        if len(devices) != world_size:
            raise ValueError(f"devices must name one device per rank ({world_size}); got {list(devices)}")
        self.world_size, self.backend, self.devices = world_size, backend, list(devices)
        self.timeout_s = float(timeout_s)
        ctx = mp.get_context("spawn")
        self._out = ctx.Queue()
        self._ins = [ctx.Queue() for _ in range(world_size)]
        port = free_port()
        self._procs = [ctx.Process(target=_worker_main, daemon=True,
                                   args=(r, world_size, port, backend, self.devices[r], self._ins[r], self._out,
                                         dict(env or {}), self.timeout_s))
                       for r in range(world_size)]
        for p in self._procs:
            p.start()
        self._next = 0
        self.closed = False
        try:
            self._collect(-1, self.timeout_s + 60, "joining the process group")
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "LocalProcessGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def put(self, obj: Any) -> Any:
        """What :meth:`run` should pass for ``obj`` (the object itself; Ray's pool stores it once instead)."""
        return obj

    @property
    def pids(self) -> List[Optional[int]]:
        return [p.pid for p in self._procs]

    def _collect(self, task_id: int, timeout: float, what: str) -> List[Any]:
        results: Dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while len(results) < self.world_size:
            try:
                tid, rank, ok, value = self._out.get(timeout=0.2)
            except queue.Empty:
                for r, p in enumerate(self._procs):
                    if r not in results and not p.is_alive():
                        raise WorkerFailed(f"rank {r} (pid {p.pid}) died with exit code {p.exitcode} while "
                                           f"{what}", rank=r)
                if time.monotonic() > deadline:
                    missing = [r for r in range(self.world_size) if r not in results]
                    raise WorkerFailed(f"ranks {missing} gave no answer within {timeout:.0f} s while {what}",
                                       rank=missing[0])
                continue
            if tid != task_id:
                continue  # a late answer of an earlier, failed run
            if not ok:
                dead = self._dead_rank(wait_s=1.5)  # a peer's crash often surfaces first as this rank's error
                if dead is not None and dead != rank:
                    p = self._procs[dead]
                    raise WorkerFailed(f"rank {dead} (pid {p.pid}) died with exit code {p.exitcode} while {what}; "
                                       f"rank {rank} then failed: {value.strip().splitlines()[-1]}", rank=dead)
                raise WorkerFailed(f"rank {rank} failed while {what}:\n{value}", rank=rank)
            results[rank] = value
        return [results[r] for r in range(self.world_size)]

    def _dead_rank(self, wait_s: float) -> Optional[int]:
        deadline = time.monotonic() + wait_s
        while True:
            for r, p in enumerate(self._procs):
                if not p.is_alive():
                    return r
            if time.monotonic() > deadline:
                return None
            time.sleep(0.05)

    def run(self, fn: Callable[..., Any], *args: Any, per_rank: Optional[Sequence[tuple]] = None,
            timeout: Optional[float] = None) -> List[Any]:
        """Run ``fn(ctx, *args, *per_rank[rank])`` on every rank; return the results in rank order.

        ``fn`` must be a module-level function (it is pickled by reference). A failure shuts the group down and
        raises :class:`WorkerFailed` naming the rank.
        """
        if self.closed:
            raise RuntimeError("this LocalProcessGroup is closed (a worker failed or close() was called); "
                               "start a new one")
        if per_rank is not None and len(per_rank) != self.world_size:
            raise ValueError(f"per_rank must give one argument tuple per rank ({self.world_size}); got {len(per_rank)}")
        task_id = self._next
        self._next += 1
        for r, q in enumerate(self._ins):
            q.put((task_id, fn, tuple(args) + (tuple(per_rank[r]) if per_rank is not None else ())))
        try:
            return self._collect(task_id, self.timeout_s if timeout is None else timeout,
                                 f"running {getattr(fn, '__name__', fn)!s}")
        except BaseException:
            self.close()
            raise

    def close(self, grace_s: float = 5.0) -> None:
        """Stop every worker (politely, then by terminating the ones still running)."""
        if self.closed:
            return
        self.closed = True
        for q in self._ins:
            try:
                q.put(None)
            except Exception:  # noqa: BLE001
                pass
        deadline = time.monotonic() + grace_s
        for p in self._procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self._procs:
            if p.is_alive():
                p.terminate()
                p.join(2.0)
            if p.is_alive():
                p.kill()
                p.join(1.0)
