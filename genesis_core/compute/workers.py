"""Workers: what one registered backend is, how it is built, and how jobs run on its own threads.

* :class:`Worker`: a name, a backend, a torch device, for ONNX/WebGPU the ONNX Runtime runner; call
  telemetry (its row of ``stats()``); up to ``THREADS_PER_WORKER`` threads kept for the executor's life (started with the worker's
  CUDA device current);
* :func:`build_worker`: a Worker from ``register_backend``'s arguments, with their checks;
  :func:`detected_worker`: one for a detected torch backend used without registering;
* :func:`run_jobs`: ``job(i)`` for every worker at once, each on a free thread of its worker's own or on a
  fresh one, every exception collected;
* where tensors go: :func:`mover`, :func:`return_target`, :func:`prepare` (a split's arguments moved off
  other GPUs before any split starts); :func:`current_worker` and the thread-local it reads.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_all
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ._tree import first_tensor, map_tensors
from .backends import TORCH_DEVICE_TYPE, BackendStatus, ComputeBackend, available_backends, backend_status
from .errors import BackendUnavailableError

BackendLike = Union[ComputeBackend, str]
DeviceLike = Union[torch.device, str, int, None]
INPUT = "input"  # return_device default: results go where the first input tensor came from
THREADS_PER_WORKER = 4  # threads a worker keeps for parallel calls (one is enough unless it appears twice in one)
ONNX_OPTIONS = ("providers", "provider_options", "cache_dir", "opset_version", "exporter", "max_sessions",
                "log_severity", "session_config")

local = threading.local()  # .worker: the name of the worker running this thread's function


def current_worker() -> Optional[str]:
    """Name of the worker running the calling thread's function (inside ``execute_on_backend``), or None."""
    return getattr(local, "worker", None)


@dataclass
class Worker:
    """One registered backend: its device and, for ONNX/WebGPU, the ONNX Runtime runner."""

    name: str
    backend: ComputeBackend
    device: torch.device
    runner: Any = None  # OnnxRunner for ONNX and WEBGPU
    options: Dict[str, Any] = field(default_factory=dict)
    calls: int = 0
    errors: int = 0
    total_s: float = 0.0
    last_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    pool: Optional[ThreadPoolExecutor] = field(default=None, repr=False)
    pool_pid: int = 0
    busy: int = 0  # jobs running or queued on ``pool``

    def record(self, seconds: float, failed: bool = False) -> None:
        """Count one call (telemetry for :meth:`HeterogeneousExecutor.stats`)."""
        with self.lock:
            self.calls += 1
            self.total_s += seconds
            if failed:
                self.errors += 1
            else:
                self.last_s = seconds

    def stats(self) -> Dict[str, Any]:
        """This worker's row of :meth:`HeterogeneousExecutor.stats`."""
        with self.lock:
            row: Dict[str, Any] = {
                "backend": self.backend.value, "device": str(self.device), "calls": self.calls, "errors": self.errors,
                "total_s": self.total_s, "mean_ms": (self.total_s / self.calls * 1e3) if self.calls else 0.0,
                "last_ms": self.last_s * 1e3,
            }
        if self.runner is not None:
            s = self.runner.stats
            row.update(exports=s.exports, export_s=s.export_s, session_hits=s.session_hits,
                       disk_hits=s.disk_hits, sessions=s.sessions, providers=list(self.options.get("providers", [])),
                       active_providers=list(s.extra.get("active_providers", [])))
        return row

    def reset_stats(self) -> None:
        with self.lock:
            self.calls = self.errors = 0
            self.total_s = self.last_s = 0.0

    def reserve(self) -> Optional[ThreadPoolExecutor]:
        """One of this worker's own threads for a job, or None when all ``THREADS_PER_WORKER`` are taken.

        The threads are kept until :meth:`close`: what libraries build per thread on first use (PyTorch's
        cuDNN attention graph cache, cuBLAS handles, the current CUDA context) is built once per thread, not
        on every parallel call (fresh threads per call cost ~100 ms a call on two H100s). A job is only handed
        a thread that is free now, never queued behind another job: when None comes back the caller runs it on
        a fresh thread, so splits of one call all run at once and a call made from inside ``fn`` (directly or
        from a thread ``fn`` waits on) cannot deadlock on a busy worker. Pair with :meth:`release`.
        """
        with self.lock:
            if self.pool is None or self.pool_pid != os.getpid():  # new, or a forked child's dead copy
                self.pool = ThreadPoolExecutor(max_workers=THREADS_PER_WORKER,
                                               thread_name_prefix=f"genesis-{self.name}",
                                               initializer=_thread_init, initargs=(self.device,))
                self.pool_pid, self.busy = os.getpid(), 0
            if self.busy >= THREADS_PER_WORKER:
                return None
            self.busy += 1
            return self.pool

    def release(self, pool: ThreadPoolExecutor) -> None:
        with self.lock:
            if pool is self.pool:
                self.busy -= 1

    def close(self) -> None:
        with self.lock:
            pool, self.pool, self.busy = self.pool, None, 0
        if pool is not None and self.pool_pid == os.getpid():
            pool.shutdown(wait=False)  # queued jobs still run; idle threads exit


def _thread_init(device: torch.device) -> None:
    if device.type == "cuda":
        try:  # the thread's CUDA context, before the first cuBLAS call asks for one
            torch.cuda.set_device(device)
        except Exception:  # noqa: BLE001 - a failing initializer breaks the pool; the job will say what is wrong
            pass


def run_jobs(job: Callable[[int], None], workers: List[Worker]) -> List[Optional[BaseException]]:
    """Run ``job(i)`` for each ``workers[i]`` concurrently and wait for all; returns each job's exception or None.

    One job runs in the calling thread. Otherwise each runs on a free thread of its worker's own
    (:meth:`Worker.reserve`), else on a fresh thread, so all jobs of a call run at once.
    """
    n = len(workers)
    if n == 1:
        try:
            job(0)
        except Exception as exc:
            return [exc]
        return [None]
    futures: List[Any] = [None] * n
    spill = []
    for i in range(n):  # each job on a free thread of its worker's own, else on a fresh one
        pool = workers[i].reserve()
        if pool is not None:
            try:
                futures[i] = pool.submit(job, i)
            except RuntimeError:  # shut down meanwhile (close(), the worker replaced): a fresh thread
                workers[i].release(pool)
            else:
                futures[i].add_done_callback(lambda _f, w=workers[i], p=pool: w.release(p))
        if futures[i] is None:
            spill.append(i)
    if spill:
        extra = ThreadPoolExecutor(max_workers=len(spill), thread_name_prefix="genesis-extra")
        for i in spill:
            futures[i] = extra.submit(job, i)
        extra.shutdown(wait=False)
    wait_all(futures)
    return [fut.exception() for fut in futures]  # all done: waited for above


# ---------------------------------------------------------------- building a worker


def build_worker(key: str, b: ComputeBackend, device: DeviceLike, status: BackendStatus,
                 options: Dict[str, Any]) -> Worker:
    """The worker ``register_backend(b, device, name=key, **options)`` makes (``status``: b's detection)."""
    if b in TORCH_DEVICE_TYPE:
        if options:
            raise TypeError(f"ComputeBackend.{b.name} takes no options; got {', '.join(sorted(options))}")
        return Worker(key, b, torch_device(b, device, status))
    return _runtime_worker(key, b, device, status, options)


def detected_worker(key: str) -> Tuple[Optional[Worker], str]:
    """A worker for the torch backend named ``key`` on its first device when detection found it, else
    (None, why not, as a clause: "" when ``key`` names no backend)."""
    b = next((m for m in ComputeBackend if key in (m.value, m.name.lower())), None)
    if b is None:
        return None, ""
    status = backend_status(b)
    if b in TORCH_DEVICE_TYPE and status.available:
        return build_worker(b.value, b, None, status, {}), ""
    if status.available:
        return None, f" and runs only once registered (ComputeBackend.{b.name} takes runtime options)"
    return None, f" and is not available here: {status.reason or 'not detected'}"


def torch_device(b: ComputeBackend, device: DeviceLike, status: BackendStatus) -> torch.device:
    """The torch device a ``b`` worker computes on: ``device`` checked against b, or b's first device."""
    kind = TORCH_DEVICE_TYPE[b]
    if device is None:
        return torch.device(status.devices[0])
    if isinstance(device, int):
        dev = torch.device(kind, device)
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device must be a torch device, a device string or an index; got {device!r}") \
                from exc
    if dev.type != kind:
        raise ValueError(f"device for ComputeBackend.{b.name} must be a {kind!r} device; got {str(dev)!r}")
    if kind == "cpu":
        return torch.device("cpu")
    index = dev.index or 0
    if index >= len(status.devices):
        raise ValueError(f"device {str(dev)!r} does not exist; ComputeBackend.{b.name} has "
                         f"{', '.join(status.devices)}")
    return torch.device(kind, index)


def _runtime_worker(key: str, b: ComputeBackend, device: DeviceLike, status: BackendStatus,
                    options: Dict[str, Any]) -> Worker:
    from .onnx import OnnxRunner  # onnx/onnxruntime stay out of `import genesis_core`

    unknown = sorted(set(options) - set(ONNX_OPTIONS))
    if unknown:
        raise TypeError(f"unknown option(s) for ComputeBackend.{b.name}: {', '.join(unknown)}; "
                        f"accepted: {', '.join(ONNX_OPTIONS)}")
    opts = dict(options)
    if b is ComputeBackend.WEBGPU:
        if not status.details.get("onnxruntime_ep"):
            onnx_reason = "; ".join(status.details.get("routes_missing", [])) or "no WebGpuExecutionProvider"
            raise BackendUnavailableError(
                b, "a WebGPU adapter exists (wgpu), but running arbitrary functions on WebGPU needs ONNX "
                   f"Runtime's WebGpuExecutionProvider ({onnx_reason}); the wgpu route offers "
                   "genesis_core.compute.webgpu.scaled_dot_product_attention",
                available_backends())
        opts.setdefault("providers", ["WebGpuExecutionProvider", "CPUExecutionProvider"])
        ort_status = backend_status(ComputeBackend.ONNX)
    else:
        opts.setdefault("providers", ["CPUExecutionProvider"])
        ort_status = status
    known = set(ort_status.devices)
    for p in opts["providers"]:
        pname = p[0] if isinstance(p, tuple) else p
        if pname not in known:
            raise ValueError(f"provider {pname!r} is not in this onnxruntime build; available: "
                             f"{', '.join(sorted(known))}")
    if device is not None:
        device = torch.device(device)
    runner = OnnxRunner(device=device, **opts)
    return Worker(key, b, runner.device, runner=runner, options=opts)


# ---------------------------------------------------------------- where tensors go


def mover(device: Optional[torch.device]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function moving a tensor to ``device`` (unchanged when already there, or when ``device`` is None)."""
    if device is None:
        return lambda t: t
    return lambda t: t if t.device == device else t.to(device)


def return_target(inputs: Any, return_device: DeviceLike, worker: Worker) -> Optional[torch.device]:
    """Where results go: ``"input"`` = the device of the first tensor in ``inputs`` (the worker's if none),
    ``None`` = where they were computed, anything else = that device."""
    if isinstance(return_device, str) and return_device == INPUT:
        first = first_tensor(inputs)
        return first.device if first is not None else worker.device
    return torch.device(return_device) if return_device is not None else None


def prepare(split: Any, worker: Worker, return_device: DeviceLike) -> Tuple[Tuple[Any, ...], DeviceLike]:
    """A parallel split's arguments with tensors from *another GPU* already on the worker's device, and its
    return device resolved (``"input"`` = where its first tensor was).

    Runs in the calling thread before any split is started: a copy between GPUs waits for the work already
    queued on the source GPU, so made from the worker's thread after the source GPU's own split was queued,
    it would wait for that split and the GPUs would take turns (seen on two H100s). Host tensors still move
    in the worker threads, where the copies to different GPUs overlap.
    """
    args = split if isinstance(split, tuple) else (split,)
    return_device = return_target(args, return_device, worker)
    dev = worker.device
    if worker.runner is None and dev.type != "cpu":
        args = map_tensors(args, lambda t: t.to(dev) if t.device.type != "cpu" and t.device != dev else t)
    return args, return_device
