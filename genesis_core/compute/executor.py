"""HeterogeneousExecutor: run functions on CUDA, CPU, NPU, MPS, ROCm, ONNX Runtime or WebGPU, alone or split.

Quick tour (the spec's section 2)::

    ex = HeterogeneousExecutor()
    ex.register_backend(ComputeBackend.CPU)                       # -> "cpu"
    ex.register_backend(ComputeBackend.CUDA, torch.device("cuda:0"))  # BackendUnavailableError without CUDA
    y = ex.execute_on_backend(ComputeBackend.CPU, fn, x)          # y lands where x came from
    ys = ex.parallel_execute(fn, [x1, x2], [ComputeBackend.CPU, "cuda"])
    y = ex.split_execute(fn, x, ["cpu", "cuda"], dim=0)           # split by measured throughput, gathered

Workers. Each registration is a *worker* with a name (default: the backend's value, ``"cpu"``); pass
``name=`` to register one backend several times (``cuda:1``, or several CPU workers standing in for
devices in tests). Everywhere a backend is asked for, a ``ComputeBackend``, its value or a worker name works.

Models captured by ``fn`` run where the data runs: see ``placement.py`` for the mechanism (discovered,
replicated once per device, swapped in thread-locally) and :meth:`HeterogeneousExecutor.place` for the
explicit, zero-overhead alternative.
"""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_all
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .._device import synchronize
from .._log import log_once, logger
from ._tree import first_tensor, iter_tensors, map_tensors
from .backends import TORCH_DEVICE_TYPE, BackendStatus, ComputeBackend, available_backends, backend_status
from .placement import ReplicaCache, ReplicaMode, callable_key, reachable_modules

BackendLike = Union[ComputeBackend, str]
DeviceLike = Union[torch.device, str, int, None]
INPUT = "input"  # return_device default: results go where the first input tensor came from

_ONNX_OPTIONS = ("providers", "provider_options", "cache_dir", "opset_version", "exporter", "max_sessions",
                 "log_severity", "session_config")
_local = threading.local()
THREADS_PER_WORKER = 4  # threads a worker keeps for parallel calls (one is enough unless it appears twice in one)


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that detection found missing. Carries ``backend``, ``reason``, ``available``."""

    def __init__(self, backend: ComputeBackend, reason: str, available: Sequence[ComputeBackend]) -> None:
        self.backend, self.reason, self.available = backend, reason, list(available)
        names = ", ".join(b.value for b in self.available) or "none"
        super().__init__(f"ComputeBackend.{backend.name} is not available here: {reason}. "
                         f"Available backends: {names}.")


class ParallelExecutionError(RuntimeError):
    """One or more splits of a parallel run failed; raised after every split finished.

    ``failures`` lists ``(split index, worker name, exception)``; ``results`` holds the successful results
    in split order (``None`` where a split failed).
    """

    def __init__(self, failures: List[Tuple[int, str, BaseException]], results: List[Any], total: int) -> None:
        self.failures, self.results = failures, results
        parts = [f"split {i} on backend {name!r}: {type(e).__name__}: {e}" for i, name, e in failures]
        super().__init__(f"{len(failures)} of {total} splits failed - " + "; ".join(parts))


def current_worker() -> Optional[str]:
    """Name of the worker running the calling thread's function (inside ``execute_on_backend``), or None."""
    return getattr(_local, "worker", None)


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


def _mover(device: Optional[torch.device]) -> Callable[[torch.Tensor], torch.Tensor]:
    if device is None:
        return lambda t: t
    return lambda t: t if t.device == device else t.to(device)


def plan_shares(total: int, models: Sequence[Tuple[float, float]]) -> List[int]:
    """Rows per worker so that all finish together, given per-worker cost models ``time = a + b * rows``.

    Solves ``a_i + b_i * n_i = T`` with ``sum(n_i) = total``; workers whose fixed cost ``a_i`` exceeds the
    common finish time get 0 rows. Rounding keeps the sum exact: each leftover row goes to the worker that
    would finish it soonest (so a slow worker is not handed a row just for a large fractional share).
    """
    if total < 0:
        raise ValueError(f"total must be >= 0; got {total}")
    if not models:
        raise ValueError("models must hold at least one (a, b) cost model; got none")
    active = list(range(len(models)))
    share = [0.0] * len(models)
    while active:
        inv = sum(1.0 / models[i][1] for i in active)
        t_end = (total + sum(models[i][0] / models[i][1] for i in active)) / inv
        share = [0.0] * len(models)
        for i in active:
            share[i] = (t_end - models[i][0]) / models[i][1]
        negative = [i for i in active if share[i] <= 0]
        if not negative:
            break
        active.remove(max(negative, key=lambda i: models[i][0]))
    if not active:  # every fixed cost dominates: give everything to the cheapest single worker
        best = min(range(len(models)), key=lambda i: models[i][0] + models[i][1] * total)
        share = [0.0] * len(models)
        share[best] = float(total)
    counts = [int(s) for s in share]
    for _ in range(total - sum(counts)):  # fewer than len(models) rows: each goes where it ends soonest
        best = min(range(len(models)), key=lambda i: models[i][0] + models[i][1] * (counts[i] + 1))
        counts[best] += 1
    return counts


class HeterogeneousExecutor:
    """Runs functions on registered compute backends; thread-safe.

    See the module docstring for the tour. Public methods: :meth:`register_backend`,
    :meth:`unregister_backend`, :meth:`registered`, :meth:`execute_on_backend`, :meth:`parallel_execute`,
    :meth:`split_execute`, :meth:`split_plan`, :meth:`place`, :meth:`release`, :meth:`stats`.
    """

    _genesis_opaque = True  # model discovery does not search the executor (a node may hold one)
    SPLIT_MARGIN = 0.10  # a split "loses" when slower than the best single worker's prediction by more than this
    SPLIT_LOSSES = 2  # consecutive losing splits before a key drops to the best smaller set of workers
    SPLIT_STICKY = 0.05  # a refined plan replaces the last one only if a share moves by more than this of the batch

    def __init__(self) -> None:
        self._workers: Dict[str, Worker] = {}
        self._lock = threading.RLock()
        self._replicas = ReplicaCache()
        self._calibration: Dict[Any, Dict[str, List[float]]] = {}
        self._calibration_keep: Dict[Any, Any] = {}
        # Guards the calibration dicts only; never held while user code runs (a fn may itself split).
        self._calibration_lock = threading.Lock()
        # Calibration key -> Event set when the thread measuring that key is done (others wait on it),
        # and the measuring thread's id (a nested call with the same key from it must not wait on itself).
        self._calibrating: Dict[Any, Tuple[threading.Event, int]] = {}
        self._calibration_generation = 0  # bumped by clear_calibration(): measurements started before are dropped
        # Calibration key -> the fits as measured, each worker alone (the refined ones drift under contention).
        self._solo: Dict[Any, Dict[str, Tuple[float, float]]] = {}
        # Calibration key -> consecutive real splits that lost to a smaller set of its workers (see
        # _check_split_paid_off), and the workers the key is restricted to once they reach SPLIT_LOSSES.
        self._losses: Dict[Any, int] = {}
        self._subset: Dict[Any, Tuple[str, ...]] = {}
        # Calibration key -> (worker, rows) pairs already run: a split size's first run pays first-call costs
        # (a new shape: dispatch plans, cuDNN graphs, ONNX exports) and is neither learnt from nor judged.
        self._sizes_seen: Dict[Any, set] = {}
        # (calibration key, batch size) -> the rows per worker last planned. Refinement moves the fits a little
        # after every run; replanning each time would give new split sizes, i.e. new shapes and their first-call
        # costs, on every other call (seen on two H100s). Kept unless a share moves by more than SPLIT_STICKY.
        self._last_counts: Dict[Any, List[int]] = {}

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
        if b in TORCH_DEVICE_TYPE:
            if options:
                raise TypeError(f"ComputeBackend.{b.name} takes no options; got {', '.join(sorted(options))}")
            worker = Worker(key, b, self._torch_device(b, device, status))
        else:
            worker = self._runtime_worker(key, b, device, status, options)
        with self._lock:
            old = self._workers.get(key)
            if old is not None:
                logger.info("replacing compute worker %r", key)
            self._workers[key] = worker
        if old is not None:
            old.close()
        return key

    def _torch_device(self, b: ComputeBackend, device: DeviceLike, status: BackendStatus) -> torch.device:
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

    def _runtime_worker(self, key: str, b: ComputeBackend, device: DeviceLike, status: BackendStatus,
                        options: Dict[str, Any]) -> Worker:
        from .onnx import OnnxRunner  # onnx/onnxruntime stay out of `import genesis_core`

        unknown = sorted(set(options) - set(_ONNX_OPTIONS))
        if unknown:
            raise TypeError(f"unknown option(s) for ComputeBackend.{b.name}: {', '.join(unknown)}; "
                            f"accepted: {', '.join(_ONNX_OPTIONS)}")
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

    def unregister_backend(self, backend: BackendLike) -> None:
        """Remove a worker (KeyError listing the registered ones when it is not registered)."""
        w = self._worker(backend)
        with self._lock:
            self._workers.pop(w.name, None)
        w.close()

    def close(self) -> None:
        """Stop the workers' threads (idle ones exit now, busy ones after their call). The executor stays
        usable: a later parallel call starts them again. Also happens when the executor is collected."""
        with self._lock:
            workers = list(self._workers.values())
        for w in workers:
            w.close()

    def registered(self) -> List[str]:
        """Worker names in registration order."""
        with self._lock:
            return list(self._workers)

    def device_of(self, backend: BackendLike) -> torch.device:
        """The torch device a worker computes on (for ONNX: where its inputs and outputs live)."""
        return self._worker(backend).device

    def _worker(self, backend: BackendLike) -> Worker:
        with self._lock:
            if isinstance(backend, ComputeBackend):
                key = backend.value
            elif isinstance(backend, str):
                key = backend if backend in self._workers else backend.strip().lower()
            else:
                raise TypeError(f"backend must be a ComputeBackend or a worker name; got {type(backend).__name__}")
            worker = self._workers.get(key)
            if worker is None:
                names = ", ".join(repr(n) for n in self._workers) or "none"
                raise KeyError(f"backend {str(backend)!r} is not registered with this executor; registered: "
                               f"{names}. Call register_backend() first.")
            return worker

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
            KeyError: ``backend`` is not registered (lists the registered ones).
            TypeError: ``fn`` is not callable.
        """
        worker = self._worker(backend)
        if not callable(fn):
            raise TypeError(f"fn must be callable; got {type(fn).__name__}")
        return self._execute(worker, fn, args, kwargs, return_device)[0]

    def _execute(self, worker: Worker, fn: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any],
                 return_device: DeviceLike, sync: bool = False) -> Tuple[Any, float]:
        target = _return_target((args, kwargs), return_device, worker)
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
    def parallel_execute(self, fn: Callable[..., Any], data_splits: Sequence[Any], backends: Sequence[BackendLike],
                         *, return_device: DeviceLike = INPUT) -> List[Any]:
        """Run ``fn`` on each split concurrently, split ``i`` on ``backends[i]``; results in split order.

        A split that is a ``tuple`` is unpacked into positional arguments; anything else is the single
        argument. The same backend may appear several times. When splits fail, every other split still
        finishes, then :class:`ParallelExecutionError` names each failed split and backend.

        Raises:
            TypeError: ``fn`` not callable, or ``data_splits``/``backends`` not lists or tuples.
            ValueError: no splits, or different lengths.
            KeyError: a backend that is not registered (before anything runs).
        """
        if not callable(fn):
            raise TypeError(f"fn must be callable; got {type(fn).__name__}")
        workers, splits = self._check_splits(data_splits, backends)
        results, _ = self._run_parallel(fn, splits, workers, return_device, sync=False)
        return results

    def _check_splits(self, data_splits: Sequence[Any], backends: Sequence[BackendLike]
                      ) -> Tuple[List[Worker], List[Any]]:
        for label, value in (("data_splits", data_splits), ("backends", backends)):
            if not isinstance(value, (list, tuple)):
                raise TypeError(f"{label} must be a list or tuple; got {type(value).__name__}")
        if len(data_splits) == 0:
            raise ValueError("data_splits must hold at least one split; got an empty sequence")
        if len(data_splits) != len(backends):
            raise ValueError(f"data_splits and backends must have the same length; got {len(data_splits)} splits "
                             f"and {len(backends)} backends")
        return [self._worker(b) for b in backends], list(data_splits)

    def _run_parallel(self, fn: Callable[..., Any], splits: List[Any], workers: List[Worker],
                      return_device: DeviceLike, sync: bool) -> Tuple[List[Any], List[float]]:
        n = len(splits)
        results: List[Any] = [None] * n
        times: List[float] = [0.0] * n
        failures: List[Tuple[int, str, BaseException]] = []

        # worker threads start with autograd on; carry the caller's no_grad / inference_mode over
        grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

        prepared: List[Any] = [None] * n
        for i, (split, w) in enumerate(zip(splits, workers)):
            try:
                prepared[i] = _prepare(split, w, return_device)
            except Exception as exc:  # noqa: BLE001 - this split fails; the others still run
                prepared[i] = exc

        def one(i: int) -> None:
            if isinstance(prepared[i], BaseException):
                workers[i].record(0.0, failed=True)
                raise prepared[i]
            args, ret = prepared[i]
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                results[i], times[i] = self._execute(workers[i], fn, args, {}, ret, sync=sync)

        if n == 1:
            try:
                one(0)
            except Exception as exc:
                failures.append((0, workers[0].name, exc))
        else:
            futures: List[Any] = [None] * n
            spill = []
            for i in range(n):  # each split on a free thread of its worker's own, else on a fresh one
                pool = workers[i].reserve()
                if pool is not None:
                    try:
                        futures[i] = pool.submit(one, i)
                    except RuntimeError:  # shut down meanwhile (close(), the worker replaced): a fresh thread
                        workers[i].release(pool)
                    else:
                        futures[i].add_done_callback(lambda _f, w=workers[i], p=pool: w.release(p))
                if futures[i] is None:
                    spill.append(i)
            if spill:
                extra = ThreadPoolExecutor(max_workers=len(spill), thread_name_prefix="genesis-extra")
                for i in spill:
                    futures[i] = extra.submit(one, i)
                extra.shutdown(wait=False)
            wait_all(futures)
            for i, fut in enumerate(futures):  # all done: waited for above
                exc = fut.exception()
                if exc is not None:
                    failures.append((i, workers[i].name, exc))
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
        args, total = self._batch_args(batch, dim)
        keyed = self._calibration_key(fn, args, workers, dim) if calibrate and len(workers) > 1 else None
        counts = self._plan(fn, args, total, workers, dim, keyed)
        used = [(w, c) for w, c in zip(workers, counts) if c > 0]
        splits, start = [], 0
        for _, c in used:
            splits.append(self._slice(args, dim, start, c))
            start += c
        t0 = time.perf_counter()
        results, times = self._run_parallel(fn, splits, [w for w, _ in used], return_device, sync=True)
        wall = time.perf_counter() - t0
        if keyed is not None and self._sizes_known(keyed[0], used):
            self._refine(keyed[0], [(w, c, t) for (w, c), t in zip(used, times)])
            if len(used) > 1:
                self._check_split_paid_off(keyed[0], [w.name for w, _ in used], total, wall)
        if return_device is None:
            home = first_tensor(results[0])
            results = [map_tensors(r, _mover(home.device if home is not None else None)) for r in results]
        if len(results) == 1 and _owns_memory(results[0], args):
            return results[0]  # one worker ran it all (a restricted split): no concatenating copy
        return _gather(results, dim)

    def split_plan(self, fn: Callable[..., Any], batch: Any, backends: Optional[Sequence[BackendLike]] = None,
                   *, dim: int = 0, calibrate: bool = True) -> Dict[str, int]:
        """Rows each worker would get for ``batch`` (calibrating first if needed), without running the split."""
        workers = self._split_workers(backends)
        args, total = self._batch_args(batch, dim)
        keyed = self._calibration_key(fn, args, workers, dim) if calibrate and len(workers) > 1 else None
        return {w.name: c for w, c in zip(workers, self._plan(fn, args, total, workers, dim, keyed, remember=False))}

    def clear_calibration(self) -> None:
        """Forget every throughput measurement (the next split calibrates again)."""
        with self._calibration_lock:
            self._calibration.clear()
            self._calibration_keep.clear()
            self._solo.clear()
            self._losses.clear()
            self._sizes_seen.clear()
            self._last_counts.clear()
            self._subset.clear()
            self._calibration_generation += 1

    def _split_workers(self, backends: Optional[Sequence[BackendLike]]) -> List[Worker]:
        if backends is None:
            with self._lock:
                workers = list(self._workers.values())
        else:
            if not isinstance(backends, (list, tuple)):
                raise TypeError(f"backends must be a list or tuple; got {type(backends).__name__}")
            workers = [self._worker(b) for b in backends]
        if not workers:
            raise ValueError("backends must name at least one registered backend; got none")
        names = [w.name for w in workers]
        if len(set(names)) != len(names):
            raise ValueError(f"backends must not repeat a worker in split_execute; got {names}")
        return workers

    @staticmethod
    def _batch_args(batch: Any, dim: int) -> Tuple[Tuple[Any, ...], int]:
        args = batch if isinstance(batch, tuple) else (batch,)
        sizes = []
        for t in iter_tensors(args):
            if t.dim() == 0 or not -t.dim() <= dim < t.dim():
                raise ValueError(f"every tensor in batch must have dimension {dim} to split on; got shape "
                                 f"{tuple(t.shape)}")
            sizes.append(t.shape[dim])
        if not sizes:
            raise ValueError("batch must contain at least one tensor to split; got none")
        if len(set(sizes)) != 1:
            raise ValueError(f"every tensor in batch must have the same size along dim {dim}; got sizes {sizes}")
        if sizes[0] == 0:
            raise ValueError(f"batch is empty along dim {dim}; nothing to split")
        return args, sizes[0]

    @staticmethod
    def _slice(args: Tuple[Any, ...], dim: int, start: int, length: int) -> Tuple[Any, ...]:
        return map_tensors(args, lambda t: t.narrow(dim, start, length))

    def _calibration_key(self, fn: Callable[..., Any], args: Tuple[Any, ...], workers: List[Worker], dim: int
                         ) -> Tuple[Any, Any]:
        fkey, keep = callable_key(fn)
        rows = tuple((tuple(s for j, s in enumerate(t.shape) if j != dim % t.dim()), t.dtype)
                     for t in iter_tensors(args))
        return (fkey, rows, tuple(w.name for w in workers)), keep

    def _plan(self, fn: Callable[..., Any], args: Tuple[Any, ...], total: int, workers: List[Worker], dim: int,
              keyed: Optional[Tuple[Any, Any]], remember: bool = True) -> List[int]:
        """Rows per worker. ``keyed``: ``_calibration_key(...)`` when calibrating (None: split evenly)."""
        if len(workers) == 1:
            return [total]
        if keyed is None:
            return plan_shares(total, [(0.0, 1.0)] * len(workers))
        key, keep = keyed
        me = threading.get_ident()
        while True:
            with self._calibration_lock:
                models = self._calibration.get(key)
                if models is not None:
                    allowed = self._subset.get(key)
                    if allowed is None:
                        counts = plan_shares(total, [tuple(models[w.name]) for w in workers])
                    else:
                        idx = [i for i, w in enumerate(workers) if w.name in allowed]
                        counts = [0] * len(workers)
                        for i, c in zip(idx, plan_shares(total, [tuple(models[workers[i].name]) for i in idx])):
                            counts[i] = c
                    return self._sticky(key, total, counts, remember)
                busy = self._calibrating.get(key)
                if busy is None:
                    done = threading.Event()
                    self._calibrating[key] = (done, me)
                    generation = self._calibration_generation
                    break
            event, owner = busy
            if owner == me:  # fn splits itself with the same key while being measured: no fit yet
                return plan_shares(total, [(0.0, 1.0)] * len(workers))
            event.wait()  # another thread is measuring this key; then read its result (or measure if it failed)
        # Measure outside the lock: user code runs here, and it may call split_execute itself.
        try:
            models = {w.name: self._measure(fn, args, total, w, dim) for w in workers}
        except BaseException:
            with self._calibration_lock:
                self._calibrating.pop(key, None)
            done.set()  # waiters wake up, find no fit and measure themselves
            raise
        with self._calibration_lock:  # publish the fit and retire the marker together: waiters see one or the other
            if self._calibration_generation == generation:  # clear_calibration() meanwhile: do not store
                self._calibration[key] = models
                self._calibration_keep[key] = keep
                self._solo[key] = {name: (a, b) for name, (a, b) in models.items()}
            self._calibrating.pop(key, None)
            models = {name: list(ab) for name, ab in models.items()}  # refinements by others never touch ours
        done.set()
        logger.debug("split calibration %s", {k: (round(a * 1e3, 3), round(b * 1e6, 3))
                                              for k, (a, b) in models.items()})
        return plan_shares(total, [tuple(models[w.name]) for w in workers])

    def _measure(self, fn: Callable[..., Any], args: Tuple[Any, ...], total: int, worker: Worker, dim: int
                 ) -> List[float]:
        """Fit ``time = a + b * rows`` on this worker from short runs (sequential: each worker alone)."""
        small = max(1, total // 8)
        large = max(small, total // 2)

        def timed(rows: int) -> float:
            part = self._slice(args, dim, 0, rows)
            return self._execute(worker, fn, part, {}, None, sync=True)[1]

        # Warm-ups, one per size: first-call costs (allocations, dispatch plans and autotuning, cuDNN graphs,
        # ONNX exports) come per shape and must not count.
        timed(small)
        if large > small:
            timed(large)
        t_small = min(timed(small), timed(small))
        if large > small:
            t_large = min(timed(large), timed(large))  # one-off stalls (allocator, page faults) of ~50 ms seen on H100s
            b = (t_large - t_small) / (large - small)
            b = max(b, 0.05 * t_large / large, 1e-9)  # noise can make the slope tiny or negative
            a = max(t_small - b * small, 0.0)
        else:
            b, a = max(t_small / small, 1e-9), 0.0
        return [a, b]

    def _sticky(self, key: Any, total: int, counts: List[int], remember: bool = True) -> List[int]:
        """``counts``, or the rows last planned for this key and batch size when no share moved by more than
        ``SPLIT_STICKY`` of the batch (and the same workers take part); ``remember=False`` (``split_plan``)
        answers without recording. Called with the calibration lock held."""
        prev = self._last_counts.get((key, total))
        if prev is not None and len(prev) == len(counts) and all((p == 0) == (c == 0) for p, c in zip(prev, counts)):
            if max(abs(p - c) for p, c in zip(prev, counts)) <= max(1, int(self.SPLIT_STICKY * total)):
                return list(prev)
        if len(self._last_counts) >= 4096:
            self._last_counts.clear()
        self._last_counts[(key, total)] = list(counts)
        return counts

    def _sizes_known(self, key: Any, used: List[Tuple[Worker, int]]) -> bool:
        """Whether every worker of this run had run its row count before (for this key); records them."""
        pairs = {(w.name, c) for w, c in used}
        with self._calibration_lock:
            if key not in self._calibration:
                return False
            seen = self._sizes_seen.setdefault(key, set())
            known = pairs <= seen
            if len(seen) > 4096:  # a key whose sizes never settle: keep the memory bounded
                seen.clear()
            seen |= pairs
        return known

    def _check_split_paid_off(self, key: Any, ran: List[str], total: int, wall: float) -> None:
        """After a real split over the workers ``ran``: did it beat the sets made of its fastest workers?

        The references are predictions from each worker's fit as measured alone (not the refined one, which
        absorbs contention): for the fastest worker alone, the fastest two split, and so on (workers ranked
        by their solo time for the whole batch; a set's prediction is the finish time :func:`plan_shares`
        gives it; only these nested sets are tried, not every subset, so a fast worker that slows the others
        is not the one dropped first). The fits are made one worker at a time, so they miss contention (a CPU
        kernel starving the thread that feeds a GPU) - but the split's wall time also holds costs a solo fit
        does not (the hand-off to the worker threads, result copies, the concatenation) and one run can be
        slow for unrelated reasons. So a split *loses* only when its wall time exceeds the best smaller set's
        prediction by more than ``SPLIT_MARGIN``, and only ``SPLIT_LOSSES`` consecutive losses restrict the key
        to that set (a win resets the count): with CPU,
        cuda:0 and cuda:1, a CPU that slows the GPUs drops out and the two GPUs keep splitting; a set that
        keeps losing shrinks again, down to one worker. The restriction lasts until
        :meth:`clear_calibration`; logged once.
        """
        with self._calibration_lock:
            solo_fits = self._solo.get(key)
            if solo_fits is None or len(ran) < 2 or any(n not in solo_fits for n in ran):
                return
            ranked = sorted(ran, key=lambda n: solo_fits[n][0] + solo_fits[n][1] * total)
            predicted = {}
            for m in range(1, len(ranked)):
                fits = [tuple(solo_fits[n]) for n in ranked[:m]]
                predicted[tuple(ranked[:m])] = max(a + b * c for (a, b), c in zip(fits, plan_shares(total, fits))
                                                   if c > 0)
            best = min(predicted, key=predicted.get)
            if wall <= predicted[best] * (1.0 + self.SPLIT_MARGIN):
                self._losses.pop(key, None)
                return
            losses = self._losses.get(key, 0) + 1
            self._losses[key] = losses
            names = ", ".join(f"'{n}'" for n in ran if n in best)  # in the caller's order
            if losses < self.SPLIT_LOSSES:
                logger.debug("split over %s took %.2f ms, more than %s is predicted to take (%.2f ms); loss %d of %d",
                             ", ".join(ran), wall * 1e3, names, predicted[best] * 1e3, losses, self.SPLIT_LOSSES)
                return
            self._subset[key] = best
            self._losses.pop(key, None)
            log_once(("split-subset", key[0], key[2], best),
                     f"split over {', '.join(ran)} took {wall * 1e3:.2f} ms, more than {names} "
                     f"{'alone ' if len(best) == 1 else ''}is predicted to take ({predicted[best] * 1e3:.2f} ms), "
                     f"{losses} runs in a row: later calls like this run on {names} only "
                     f"(clear_calibration() measures again)")

    def _refine(self, key: Any, observed: List[Tuple[Worker, int, float]]) -> None:
        with self._calibration_lock:
            models = self._calibration.get(key)
            if models is None:
                return
            for w, rows, seconds in observed:
                a, b = models[w.name]
                b_seen = max(seconds - a, 1e-9) / rows
                models[w.name] = [a, 0.5 * b + 0.5 * b_seen]

    # -- telemetry ----------------------------------------------------------------------------------
    def stats(self) -> Dict[str, Dict[str, Any]]:
        """Per worker: backend, device, calls, errors, total_s, mean_ms, last_ms, and for ONNX/WEBGPU
        workers exports, export_s, session_hits, disk_hits, sessions. Host wall time (CUDA work that has
        not been waited for is not included)."""
        out: Dict[str, Dict[str, Any]] = {}
        with self._lock:
            workers = list(self._workers.values())
        for w in workers:
            with w.lock:
                row: Dict[str, Any] = {
                    "backend": w.backend.value, "device": str(w.device), "calls": w.calls, "errors": w.errors,
                    "total_s": w.total_s, "mean_ms": (w.total_s / w.calls * 1e3) if w.calls else 0.0,
                    "last_ms": w.last_s * 1e3,
                }
            if w.runner is not None:
                s = w.runner.stats
                row.update(exports=s.exports, export_s=s.export_s, session_hits=s.session_hits,
                           disk_hits=s.disk_hits, sessions=s.sessions, providers=list(w.options.get("providers", [])),
                           active_providers=list(s.extra.get("active_providers", [])))
            out[w.name] = row
        return out

    def reset_stats(self) -> None:
        """Zero the per-worker call counters (ONNX cache counters stay)."""
        with self._lock:
            for w in self._workers.values():
                with w.lock:
                    w.calls = w.errors = 0
                    w.total_s = w.last_s = 0.0


def _prepare(split: Any, worker: Worker, return_device: DeviceLike) -> Tuple[Tuple[Any, ...], DeviceLike]:
    """A parallel split's arguments with tensors from *another GPU* already on the worker's device, and its
    return device resolved (``"input"`` = where its first tensor was).

    Runs in the calling thread before any split is started: a copy between GPUs waits for the work already
    queued on the source GPU, so made from the worker's thread after the source GPU's own split was queued,
    it would wait for that split and the GPUs would take turns (seen on two H100s). Host tensors still move
    in the worker threads, where the copies to different GPUs overlap.
    """
    args = split if isinstance(split, tuple) else (split,)
    return_device = _return_target(args, return_device, worker)
    dev = worker.device
    if worker.runner is None and dev.type != "cpu":
        args = map_tensors(args, lambda t: t.to(dev) if t.device.type != "cpu" and t.device != dev else t)
    return args, return_device


def _return_target(inputs: Any, return_device: DeviceLike, worker: Worker) -> Optional[torch.device]:
    """Where results go: ``"input"`` = the device of the first tensor in ``inputs`` (the worker's if none),
    ``None`` = where they were computed, anything else = that device."""
    if isinstance(return_device, str) and return_device == INPUT:
        first = first_tensor(inputs)
        return first.device if first is not None else worker.device
    return torch.device(return_device) if return_device is not None else None


def _owns_memory(result: Any, args: Tuple[Any, ...]) -> bool:
    """Whether ``result`` is one contiguous tensor sharing no memory with the batch (so it can be returned as
    it is: what a concatenation would give, without the copy)."""
    if not isinstance(result, torch.Tensor) or not result.is_contiguous():
        return False
    try:
        ptr = result.untyped_storage().data_ptr()
        return all(t.untyped_storage().data_ptr() != ptr for t in iter_tensors(args))
    except Exception:  # noqa: BLE001 - no plain storage (sparse, nested, subclasses): copy as before
        return False


def _gather(results: List[Any], dim: int) -> Any:
    first = results[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(results, dim=dim)
    if isinstance(first, (list, tuple)):
        if any(not isinstance(r, (list, tuple)) or len(r) != len(first) for r in results):
            raise ValueError("split results must have the same structure to be gathered")
        items = [_gather([r[i] for r in results], dim) for i in range(len(first))]
        return items if isinstance(first, list) else (type(first)(*items) if hasattr(first, "_fields")
                                                      else tuple(items))
    if isinstance(first, dict):
        return {k: _gather([r[k] for r in results], dim) for k in first}
    if any(r != first for r in results):
        raise ValueError(f"split results hold non-tensor values that differ between splits: "
                         f"{[r for r in results][:4]}; cannot gather them")
    return first
