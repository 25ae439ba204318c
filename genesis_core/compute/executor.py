"""HeterogeneousExecutor: run functions on CUDA, CPU, NPU, MPS, ROCm, ONNX Runtime or WebGPU, alone or split.

Quick tour (the spec's section 2)::

    ex = HeterogeneousExecutor()
    y = ex.execute_on_backend("cpu", fn, x)                       # a detected backend works unregistered
    ex.register_backend(ComputeBackend.CUDA, torch.device("cuda:1"))  # registering chooses the device
    y = ex.execute_on_backend(ComputeBackend.CUDA, fn, x)         # y lands where x came from
    ys = ex.parallel_execute(fn, [x1, x2], [ComputeBackend.CPU, "cuda"])
    ys = ex.parallel_execute(fn, [x1, x2], placement="ray")       # on the GPUs of a Ray cluster's hosts
    y = ex.split_execute(fn, x, ["cpu", "cuda"], dim=0)           # split by measured throughput, gathered

This module is the public API (registration, execution, telemetry). Each registration is a *worker*
(``workers.py``) with a name (default: the backend's value); ``name=`` registers one backend several times.
Everywhere a backend is asked for, a ``ComputeBackend``, its value or a worker name works; a detected torch
backend (``cpu``, ``cuda``, ``mps``, ``npu``, ``rocm``) works unregistered, on its first device (ONNX Runtime
and WebGPU take runtime options: register them). ``split_plan.py`` divides a batch by measured throughput;
``placement.py`` runs models captured by ``fn`` where the data runs (:meth:`HeterogeneousExecutor.place`
is the explicit, zero-overhead alternative).
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .._device import synchronize
from .._log import log_once, logger
from ._tree import first_tensor, map_tensors
from .backends import TORCH_DEVICE_TYPE, ComputeBackend, available_backends, backend_status
from .errors import BackendNotRegisteredError, BackendUnavailableError, ParallelExecutionError
from .placement import ReplicaCache, ReplicaMode, reachable_modules
from .split_plan import SplitPlanner, batch_args, calibration_key, gather, owns_memory, plan_shares, slice_args
from .workers import (INPUT, THREADS_PER_WORKER, BackendLike, DeviceLike, Worker, build_worker, current_worker,
                      detected_worker, prepare, return_target, run_jobs, local as _local, mover as _mover)

__all__ = ["BackendLike", "BackendNotRegisteredError", "BackendUnavailableError", "DeviceLike", "HeterogeneousExecutor",
           "INPUT", "ParallelExecutionError", "THREADS_PER_WORKER", "Worker", "current_worker", "plan_shares"]


class HeterogeneousExecutor:
    """Runs functions on registered compute backends; thread-safe (the module docstring has the tour)."""

    _genesis_opaque = True  # model discovery does not search the executor (a node may hold one)
    SPLIT_MARGIN = 0.10  # a split "loses" when slower than the best single worker's prediction by more than this
    SPLIT_LOSSES = 2  # consecutive losing splits before a key drops to the best smaller set of workers
    SPLIT_STICKY = 0.05  # a refined plan replaces the last one only if a share moves by more than this of the batch

    def __init__(self) -> None:
        self._workers: Dict[str, Worker] = {}
        # Detected torch backends used without registering, by backend value (never listed by registered()).
        self._detected: Dict[str, Worker] = {}
        self._lock = threading.RLock()
        self._replicas = ReplicaCache()
        self._planner = SplitPlanner(knobs=self)  # throughput fits and split plans (split_plan.py)

    # -- registration -------------------------------------------------------------------------------
    def register_backend(self, backend: BackendLike, device: DeviceLike = None, *, name: Optional[str] = None,
                         **options: Any) -> str:
        """Register ``backend`` (on ``device``) and return the worker name.

        Args:
            backend: a :class:`ComputeBackend` or its value (``"cuda"``).
            device: torch device for CUDA/ROCM/CPU/NPU/MPS (default: the first device of that kind); for
                ONNX/WEBGPU, where input/output tensors live (default: from the first provider).
            name: worker name (default: the backend value); reuse a name to replace that worker.
            options: ONNX/WEBGPU only - ``providers``, ``provider_options``, ``cache_dir``,
                ``opset_version``, ``exporter`` (``"torchscript"``/``"dynamo"``/``"auto"``), ``max_sessions``,
                ``log_severity``, ``session_config`` (see :class:`~genesis_core.compute.onnx.OnnxRunner`).

        Raises:
            ValueError: unknown backend, or a device that does not belong to it.
            BackendUnavailableError: detection found the backend missing (message: the reason and what
                is available).
            TypeError: options given to a torch backend, or unknown option names.
        """
        b = ComputeBackend.parse(backend)
        status = backend_status(b)
        if not status.available:
            raise BackendUnavailableError(b, status.reason or "not detected", available_backends())
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise ValueError(f"name must be a non-empty string; got {name!r}")
        key = name if name is not None else b.value
        worker = build_worker(key, b, device, status, options)
        with self._lock:
            old = self._workers.get(key)
            if old is not None:
                logger.info("replacing compute worker %r", key)
            self._workers[key] = worker
            detected = self._detected.pop(key, None)  # the registered worker takes the name over
        for w in (old, detected):
            if w is not None:
                w.close()
        return key

    def unregister_backend(self, backend: BackendLike) -> None:
        """Remove a registered worker (:class:`BackendNotRegisteredError`, a KeyError, when it is not one)."""
        w = self._worker(backend, detected=False)
        with self._lock:
            self._workers.pop(w.name, None)
        w.close()

    def close(self) -> None:
        """Stop the workers' threads (idle ones exit now, busy ones after their call). The executor stays
        usable: a later parallel call starts them again. Also happens when the executor is collected."""
        with self._lock:
            workers = list(self._workers.values()) + list(self._detected.values())
        for w in workers:
            w.close()

    def registered(self) -> List[str]:
        """Registered worker names in registration order (detected backends used unregistered are not listed)."""
        with self._lock:
            return list(self._workers)

    def device_of(self, backend: BackendLike) -> torch.device:
        """The torch device a worker computes on (for ONNX: where its inputs and outputs live)."""
        return self._worker(backend).device

    def _worker(self, backend: BackendLike, detected: bool = True) -> Worker:
        """The worker for ``backend``: a registered one, else (``detected``) the detected torch backend of that
        name on its first device, made on first use; else :class:`BackendNotRegisteredError`."""
        with self._lock:
            if isinstance(backend, ComputeBackend):
                key = backend.value
            elif isinstance(backend, str):
                key = backend if backend in self._workers else backend.strip().lower()
            else:
                raise TypeError(f"backend must be a ComputeBackend or a worker name; got {type(backend).__name__}")
            worker = self._workers.get(key) or (self._detected.get(key) if detected else None)
            return worker if worker is not None else self._unregistered(backend, key, detected)

    def _unregistered(self, backend: BackendLike, key: str, detected: bool) -> Worker:
        """With ``detected``, a worker for the unregistered torch backend ``key`` when detection found it (made
        once, on its first device; lock held); else the error saying what this executor can serve."""
        worker, why = detected_worker(key) if detected else (None, "")
        if worker is not None:
            self._detected[key] = worker
            return worker
        registered = ", ".join(repr(n) for n in self._workers) or "none"
        usable = ", ".join(m.value for m in available_backends() if m in TORCH_DEVICE_TYPE) or "none"
        raise BackendNotRegisteredError(
            f"backend {str(backend)!r} is not registered with this executor{why}; registered: {registered}. "
            f"Detected torch backends run without registering: {usable}; register_backend() adds the others "
            f"(another device, ONNX Runtime, WebGPU, several workers of one backend).")

    # -- placement ----------------------------------------------------------------------------------
    def place(self, module: nn.Module, backend: BackendLike) -> nn.Module:
        """Move ``module`` *in place* to the worker's device and return it.

        The explicit alternative to automatic replicas: afterwards the module already lives where the data
        runs, so calls on that backend cost nothing extra. Use it when one device serves a module; for
        concurrent use on several devices, leave the module where it is and let the executor replicate.
        """
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module; got {type(module).__name__}")
        worker = self._worker(backend)
        if worker.runner is not None:
            raise ValueError(f"backend {worker.name!r} runs ONNX Runtime, which captures weights at export; "
                             "place() applies to torch backends (cuda, cpu, npu, mps, rocm)")
        self._replicas.clear(module)
        return module.to(worker.device)

    def release(self, module: Optional[nn.Module] = None) -> None:
        """Drop cached device replicas of captured models (one module's, or all)."""
        self._replicas.clear(module)

    # -- execution ----------------------------------------------------------------------------------
    def execute_on_backend(self, backend: BackendLike, fn: Callable[..., Any], *args: Any,
                           return_device: DeviceLike = INPUT, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` on ``backend`` and return its result.

        Every tensor in ``args``/``kwargs`` (nested lists, tuples, dicts) is moved to the worker's device;
        models that ``fn`` captures run there too (see ``placement.py``). On ONNX/WEBGPU workers ``fn`` runs in
        ONNX Runtime (exported once per input signature). Tensors in the result are moved to
        ``return_device``: by default where the first input tensor came from (the worker's device when
        there is none); ``None`` leaves them where they were computed.

        Raises:
            BackendNotRegisteredError: ``backend`` is neither registered nor a detected torch backend (a
                KeyError and a ValueError; lists the registered ones and those usable without registering).
            TypeError: ``fn`` is not callable.
        """
        worker = self._worker(backend)
        if not callable(fn):
            raise TypeError(f"fn must be callable; got {type(fn).__name__}")
        return self._execute(worker, fn, args, kwargs, return_device)[0]

    def _execute(self, worker: Worker, fn: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any],
                 return_device: DeviceLike, sync: bool = False) -> Tuple[Any, float]:
        target = return_target((args, kwargs), return_device, worker)
        previous = getattr(_local, "worker", None)
        _local.worker = worker.name
        t0 = time.perf_counter()
        try:
            if worker.runner is not None:
                out = worker.runner.run(fn, args, kwargs)
            else:
                out = self._run_torch(worker, fn, args, kwargs)
            if sync:
                synchronize(worker.device)
            out = map_tensors(out, _mover(target))
        except BaseException:
            worker.record(time.perf_counter() - t0, failed=True)
            raise
        finally:
            _local.worker = previous
        elapsed = time.perf_counter() - t0
        worker.record(elapsed)
        return out, elapsed

    def _run_torch(self, worker: Worker, fn: Callable[..., Any], args: Tuple[Any, ...],
                   kwargs: Dict[str, Any]) -> Any:
        dev = worker.device
        move = _mover(dev)
        args = map_tensors(args, move)
        kwargs = map_tensors(kwargs, move)
        modules = reachable_modules(fn)
        view = self._replicas.view(modules, dev) if modules else None
        if view:
            log_once(("replicas", worker.name, getattr(fn, "__qualname__", type(fn).__name__)),
                     f"running models captured by {getattr(fn, '__qualname__', type(fn).__name__)} on "
                     f"{dev} from cached device copies; executor.place(module, backend) moves them for good",
                     level=20)
        ctx = torch.cuda.device(dev) if dev.type == "cuda" else None
        if ctx is not None:
            ctx.__enter__()
        try:
            if view:
                with ReplicaMode(view):
                    return fn(*args, **kwargs)
            return fn(*args, **kwargs)
        finally:
            if ctx is not None:
                ctx.__exit__(None, None, None)

    # -- parallel -----------------------------------------------------------------------------------
    def parallel_execute(self, fn: Callable[..., Any], data_splits: Sequence[Any],
                         backends: Optional[Sequence[BackendLike]] = None, *, return_device: DeviceLike = INPUT,
                         placement: str = "local", address: Optional[str] = None) -> List[Any]:
        """Run ``fn`` on each split concurrently, split ``i`` on ``backends[i]``; results in split order.

        A split that is a ``tuple`` is unpacked into positional arguments; anything else is the single
        argument. The same backend may appear several times. When splits fail, every other split still
        finishes, then :class:`ParallelExecutionError` names each failed split and backend.

        ``placement="ray"``: one Ray task per split on the GPUs (``backends`` all ``"cpu"``: CPUs) of any host of a
        cluster (``address``; empty: embedded here) — :mod:`genesis_core.parallel.ray_placement`.

        Raises:
            TypeError: ``fn`` not callable, or ``data_splits``/``backends`` not lists or tuples.
            ValueError: no splits, different lengths, or an unknown ``placement``.
            BackendNotRegisteredError: a backend it cannot serve (before anything runs).
        """
        if not callable(fn):
            raise TypeError(f"fn must be callable; got {type(fn).__name__}")
        if placement == "ray":
            from ..parallel.ray_placement import place_splits  # Ray is optional: imported only here

            return place_splits(fn, data_splits, backends, None if return_device is INPUT else return_device, address)
        if placement != "local":
            raise ValueError(f"placement must be 'local' or 'ray'; got {placement!r}")
        if backends is None:
            raise TypeError("backends must be a list or tuple (one per split) with placement='local'; got None")
        splits = self._check_splits(data_splits, backends)
        workers = self._workers_for(backends)
        results, _ = self._run_parallel(fn, splits, workers, return_device, sync=False)
        return results

    def _workers_for(self, backends: Sequence[BackendLike]) -> List[Worker]:
        """The worker that runs each split, in split order: where the list of workers of a parallel call is
        built (a placement layer - Ray actors, remote hosts - would pick or wrap workers here; each worker's
        ``runner`` is how its calls run)."""
        return [self._worker(b) for b in backends]

    @staticmethod
    def _check_splits(data_splits: Sequence[Any], backends: Sequence[BackendLike]) -> List[Any]:
        for label, value in (("data_splits", data_splits), ("backends", backends)):
            if not isinstance(value, (list, tuple)):
                raise TypeError(f"{label} must be a list or tuple; got {type(value).__name__}")
        if len(data_splits) == 0:
            raise ValueError("data_splits must hold at least one split; got an empty sequence")
        if len(data_splits) != len(backends):
            raise ValueError(f"data_splits and backends must have the same length; got {len(data_splits)} splits "
                             f"and {len(backends)} backends")
        return list(data_splits)

    def _run_parallel(self, fn: Callable[..., Any], splits: List[Any], workers: List[Worker],
                      return_device: DeviceLike, sync: bool) -> Tuple[List[Any], List[float]]:
        n = len(splits)
        results: List[Any] = [None] * n
        times: List[float] = [0.0] * n

        # worker threads start with autograd on; carry the caller's no_grad / inference_mode over
        grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

        prepared: List[Any] = [None] * n
        for i, (split, w) in enumerate(zip(splits, workers)):
            try:
                prepared[i] = prepare(split, w, return_device)
            except Exception as exc:  # noqa: BLE001 - this split fails; the others still run
                prepared[i] = exc

        def one(i: int) -> None:
            if isinstance(prepared[i], BaseException):
                workers[i].record(0.0, failed=True)
                raise prepared[i]
            args, ret = prepared[i]
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                results[i], times[i] = self._execute(workers[i], fn, args, {}, ret, sync=sync)

        failures = [(i, workers[i].name, exc) for i, exc in enumerate(run_jobs(one, workers)) if exc is not None]
        if failures:
            err = ParallelExecutionError(failures, results, n)
            raise err from failures[0][2]
        return results, times

    # -- throughput split ---------------------------------------------------------------------------
    def split_execute(self, fn: Callable[..., Any], batch: Any, backends: Optional[Sequence[BackendLike]] = None,
                      *, dim: int = 0, return_device: DeviceLike = INPUT, calibrate: bool = True) -> Any:
        """Split one batch across several backends by measured throughput, run in parallel, gather.

        ``batch`` is a tensor or a tuple of positional arguments; every tensor in it is split along ``dim``
        (all must have the same size there), other values go to every part. The first time a
        ``(fn, per-row shapes, backends)`` combination is seen, each worker alone runs N/8 and N/2 rows (a
        warm-up of each, then the faster of two runs of each) to fit ``time = a + b * rows``; the shares then make all workers finish
        together (:func:`plan_shares`), and each real run refines ``b`` from what it observed. Results
        (tensors, or tuples/lists/dicts of them) are concatenated along ``dim`` on ``return_device``.
        ``calibrate=False`` splits evenly (before any measurement exists).

        Raises the errors of :meth:`parallel_execute`, plus ValueError for tensors that disagree on the
        size of ``dim``.
        """
        if not callable(fn):
            raise TypeError(f"fn must be callable; got {type(fn).__name__}")
        workers = self._split_workers(backends)
        args, total = batch_args(batch, dim)
        keyed = self._keyed(fn, args, workers, dim, calibrate)
        counts = self._plan(fn, args, total, workers, dim, keyed)
        used = [(w, c) for w, c in zip(workers, counts) if c > 0]
        splits, start = [], 0
        for _, c in used:
            splits.append(slice_args(args, dim, start, c))
            start += c
        t0 = time.perf_counter()
        results, times = self._run_parallel(fn, splits, [w for w, _ in used], return_device, sync=True)
        wall = time.perf_counter() - t0
        if keyed is not None and self._planner.sizes_known(keyed[0], [(w.name, c) for w, c in used]):
            self._planner.refine(keyed[0], [(w.name, c, t) for (w, c), t in zip(used, times)])
            if len(used) > 1:
                self._planner.check_paid_off(keyed[0], [w.name for w, _ in used], total, wall)
        if return_device is None:
            home = first_tensor(results[0])
            results = [map_tensors(r, _mover(home.device if home is not None else None)) for r in results]
        if len(results) == 1 and owns_memory(results[0], args):
            return results[0]  # one worker ran it all (a restricted split): no concatenating copy
        return gather(results, dim)

    def split_plan(self, fn: Callable[..., Any], batch: Any, backends: Optional[Sequence[BackendLike]] = None,
                   *, dim: int = 0, calibrate: bool = True) -> Dict[str, int]:
        """Rows each worker would get for ``batch`` (calibrating first if needed), without running the split."""
        workers = self._split_workers(backends)
        args, total = batch_args(batch, dim)
        keyed = self._keyed(fn, args, workers, dim, calibrate)
        return {w.name: c for w, c in zip(workers, self._plan(fn, args, total, workers, dim, keyed, remember=False))}

    def clear_calibration(self) -> None:
        """Forget every throughput measurement (the next split calibrates again)."""
        self._planner.clear()

    def _split_workers(self, backends: Optional[Sequence[BackendLike]]) -> List[Worker]:
        if backends is None:
            with self._lock:
                workers = list(self._workers.values())
        else:
            if not isinstance(backends, (list, tuple)):
                raise TypeError(f"backends must be a list or tuple; got {type(backends).__name__}")
            workers = self._workers_for(backends)
        if not workers:
            raise ValueError("backends must name at least one registered backend; got none")
        names = [w.name for w in workers]
        if len(set(names)) != len(names):
            raise ValueError(f"backends must not repeat a worker in split_execute; got {names}")
        return workers

    @staticmethod
    def _keyed(fn: Callable[..., Any], args: Tuple[Any, ...], workers: List[Worker], dim: int, calibrate: bool):
        """The calibration key of this split when it is planned from measurements, else None (split evenly)."""
        return calibration_key(fn, args, [w.name for w in workers], dim) if calibrate and len(workers) > 1 else None

    def _plan(self, fn: Callable[..., Any], args: Tuple[Any, ...], total: int, workers: List[Worker], dim: int,
              keyed: Optional[Tuple[Any, Any]], remember: bool = True) -> List[int]:
        """Rows per worker (:meth:`SplitPlanner.plan`); calibration times ``fn`` on each worker alone."""
        by_name = {w.name: w for w in workers}

        def timer(name: str, rows: int) -> float:
            return self._execute(by_name[name], fn, slice_args(args, dim, 0, rows), {}, None, sync=True)[1]

        return self._planner.plan(total, [w.name for w in workers], keyed, timer, remember)

    # -- telemetry ----------------------------------------------------------------------------------
    def stats(self) -> Dict[str, Dict[str, Any]]:
        """Per worker (registered ones, then detected backends used unregistered): backend, device, calls,
        errors, total_s, mean_ms, last_ms, and for ONNX/WEBGPU workers exports, export_s, session_hits,
        disk_hits, sessions. Host wall time (CUDA work that has not been waited for is not included)."""
        with self._lock:
            workers = list(self._workers.values()) + [w for k, w in self._detected.items() if k not in self._workers]
        return {w.name: w.stats() for w in workers}

    def reset_stats(self) -> None:
        """Zero the per-worker call counters (ONNX cache counters stay)."""
        with self._lock:
            workers = list(self._workers.values()) + list(self._detected.values())
        for w in workers:
            w.reset_stats()
