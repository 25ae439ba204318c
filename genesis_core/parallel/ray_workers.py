"""Workers placed by Ray: one actor per GPU (or per CPU worker), joined in one torch.distributed group.

:func:`connect` starts Ray once per process: with no address (and no ``RAY_ADDRESS``) an embedded Ray runs on
this machine (``ray.init(address="local")``: a new instance, never one named by a stale ``/tmp/ray`` address
file); with an address (``ray://host:10001``, ``host:6379``, ``auto``) it joins that cluster, which may span
several hosts. Embedded Ray, and a driver joining a cluster at 127.0.0.1 / localhost / ``auto``, stay on the
loopback address (see :func:`loopback_environment`): Ray would otherwise turn 127.0.0.1 into this machine's
interface address, found by asking the route to 8.8.8.8.

:class:`RayWorkerPool` reserves one bundle per worker in a placement group (``PACK``: as few hosts as possible;
``SPREAD``: one per host where it can), starts one actor per bundle, and joins the actors with
``torch.distributed`` (NCCL for GPUs, gloo for CPU workers; rendezvous on rank 0's node: a TCP store, or, when
rank 0 is on 127.0.0.1, a file store and gloo / NCCL on the ``lo`` interface: no socket off loopback).
:meth:`RayWorkerPool.run` runs ``fn(ctx, *args)`` on every actor, like
:class:`~genesis_core.parallel.launch.LocalProcessGroup`; actors keep ``ctx.cache`` (the model) between runs.

A worker that raises or dies fails the run with :class:`~genesis_core.parallel.launch.WorkerFailed` naming its
rank, host and GPU; the other actors are stopped (their collectives cannot finish) and the pool is closed, so
the caller's process (the ComfyUI server) stays alive and the next pool starts fresh actors.

Ray is imported only here, only when a function of this module runs (``pip install comfyui-genesis[ray]``).
"""
from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

from .._log import log_once, logger
from .launch import WorkerFailed
from .portable import portable

__all__ = ["connect", "RayWorkerPool", "ray_available", "WorkerFailed", "loopback_environment", "LOOPBACK"]

_connect_lock = threading.Lock()
_actor_cls = None
LOOPBACK = "127.0.0.1"
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
_PROXY_VARS = ("http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY")


def ray_available() -> Optional[str]:
    """None when Ray can be imported, else the reason (with the install command)."""
    try:
        import ray  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"Ray is not installed ({type(exc).__name__}: {exc}); install it with: pip install 'comfyui-genesis[ray]'"
    return None


def _ray():
    reason = ray_available()
    if reason:
        raise ImportError(reason)
    import ray

    return ray


def _code_paths() -> List[str]:
    """Folders the actors need on sys.path: the one holding genesis_core, and ComfyUI's when it is loaded."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    paths = []
    comfy_dirs = list(getattr(sys.modules.get("comfy"), "__path__", []) or [])  # a namespace package: no __file__
    if comfy_dirs:  # first: ComfyUI's top-level ``nodes`` must win over this pack's
        paths.append(os.path.dirname(os.path.abspath(comfy_dirs[0])))
    paths.append(here)
    return paths


def loopback_environment() -> Dict[str, str]:
    """Environment for the Ray processes of this machine (GCS, raylet, agents, head) kept on 127.0.0.1 only.

    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` is Ray's single-machine mode: its node-IP lookup
    (``ray._private.services.get_node_ip_address``) answers 127.0.0.1 instead of the address of the route to
    8.8.8.8. A head started by ``ray start`` probes cloud metadata (169.254.169.254, metadata.google.internal)
    and posts "usage stats disabled" to usage-stats.ray.io even with usage stats off: both go to a closed port
    on 127.0.0.1 (an HTTP proxy there, the report URL there; loopback itself bypasses the proxy).
    """
    dead = f"http://{LOOPBACK}:9"
    local = ",".join(_LOOPBACK_HOSTS)
    return {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_USAGE_STATS_REPORT_URL": dead + "/", "http_proxy": dead, "HTTP_PROXY": dead,
            "no_proxy": local, "NO_PROXY": local}


def _on_this_machine(address: str) -> bool:
    """Whether ``address`` (``host:port``, ``ray://host:port``, ``auto``) names a Ray on this machine's loopback."""
    if address == "auto":
        return True
    rest = address[len("ray://"):] if address.startswith("ray://") else address
    host = rest.rsplit(":", 1)[0] if ":" in rest else rest
    return host.strip("[]") in _LOOPBACK_HOSTS


@contextlib.contextmanager
def _loopback_lookup(env: Dict[str, str]) -> Iterator[None]:
    """While Ray starts or joins here: its node-IP lookup answers 127.0.0.1, ``env`` is set for the processes
    it starts; both are put back afterwards (a connected Ray answers with its node's IP)."""
    from ray._private import ray_constants

    if not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):
        log_once("ray-loopback", "this Ray version has no ray_constants.ENABLE_RAY_CLUSTER; it may choose this "
                                 "machine's interface address instead of 127.0.0.1")
    saved_flag = getattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    saved_env = {k: os.environ.get(k) for k in env}
    ray_constants.ENABLE_RAY_CLUSTER = False
    os.environ.update(env)
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _node_ip(ray: Any) -> Optional[str]:
    """The IP of the Ray node this process is connected through (None for Ray Client); never a lookup."""
    node = getattr(ray._private.worker, "_global_node", None)
    return getattr(node, "node_ip_address", None)


def connect(address: Optional[str] = None, **init_kwargs: Any) -> Dict[str, Any]:
    """Start or join Ray once for this process; returns ``{"address", "embedded", "resources", "node_ip"}``.

    ``address``: empty/None and no ``RAY_ADDRESS`` -> an embedded Ray on this machine, on 127.0.0.1; otherwise
    the cluster to join (at 127.0.0.1 / localhost / ``auto``: joined on 127.0.0.1). A process already connected
    keeps its connection (a different address raises, naming both).
    """
    ray = _ray()
    address = (address or "").strip() or None
    with _connect_lock:
        if ray.is_initialized():
            ctx = ray.get_runtime_context()
            current = getattr(ctx, "gcs_address", None)
            same_port = bool(current) and address is not None and address.rsplit(":", 1)[-1] == current.rsplit(":", 1)[-1]
            if address and address != "auto" and current and not address.startswith("ray://") and not same_port:
                raise RuntimeError(f"this process is already connected to the Ray cluster at {current}; asked for "
                                   f"{address}. Restart ComfyUI to change the Ray address")
            return {"address": current, "embedded": None, "resources": ray.cluster_resources(),
                    "node_ip": _node_ip(ray)}
        target = address or os.environ.get("RAY_ADDRESS") or None
        embedded = target is None
        local = embedded or _on_this_machine(target)
        env_vars = {"PYTHONPATH": os.pathsep.join(
            _code_paths() + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
        kwargs = dict(namespace="genesis", log_to_driver=False, ignore_reinit_error=True,
                      runtime_env={"env_vars": env_vars})
        daemon_env: Dict[str, str] = {}
        if embedded:
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            kwargs.update(include_dashboard=False, _node_ip_address=LOOPBACK)
            daemon_env = loopback_environment()
            daemon_env.pop("RAY_USAGE_STATS_ENABLED")  # the user's explicit choice stays
            env_vars.update({k: os.environ.get(k, "") for k in _PROXY_VARS})  # the workers get the user's proxies
        kwargs.update(init_kwargs)
        with _loopback_lookup(daemon_env) if local else contextlib.nullcontext():
            ray.init(address="local" if embedded else address, **kwargs)
        ctx = ray.get_runtime_context()
        node_ip = _node_ip(ray)
        where = "an embedded Ray on this machine" if embedded else f"the Ray cluster at {target}"
        logger.info(f"connected to {where} (this node {node_ip}): {ray.cluster_resources()}")
        if local and node_ip is not None and node_ip not in _LOOPBACK_HOSTS:
            logger.warning(f"the Ray node on this machine uses {node_ip}, not {LOOPBACK}: it was started without "
                           f"--node-ip-address={LOOPBACK} and RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0")
        return {"address": getattr(ctx, "gcs_address", None), "embedded": embedded,
                "resources": ray.cluster_resources(), "node_ip": node_ip}


def _worker_class():
    global _actor_cls
    if _actor_cls is not None:
        return _actor_cls
    ray = _ray()

    class GenesisRayWorker:
        """One rank: holds its torch.distributed membership and a cache (the model) between runs.

        Defined inside a function so Ray ships it by value: it refers to no module of this pack, and imports
        Genesis functions by their canonical ``genesis_core`` names on the worker (see .portable).
        """

        def __init__(self, rank: int, world: int, sys_path: Sequence[str], env: Dict[str, str], use_gpu: bool):
            import types

            for p in reversed(list(sys_path)):
                if p not in sys.path:
                    sys.path.insert(0, p)
            os.environ.update(env or {})
            self.rank, self.world, self.use_gpu = rank, world, use_gpu
            self.ctx = types.SimpleNamespace(rank=rank, world_size=world, device="cuda:0" if use_gpu else "cpu",
                                             cache={})

        def describe(self) -> Dict[str, Any]:
            import ray as _r

            return {"rank": self.rank, "ip": _r.util.get_node_ip_address(), "host": socket.gethostname(),
                    "node_id": _r.get_runtime_context().get_node_id(),
                    "pid": os.getpid(), "gpus": [str(g) for g in _r.get_gpu_ids()], "device": self.ctx.device}

        def rendezvous(self, host: str) -> str:
            """Where the ranks meet (asked of rank 0, on ``host``): a file on this machine when ``host`` is loopback
            (torch's TCP store would listen on every interface and look its peers up in DNS), else a free port."""
            if host in ("127.0.0.1", "::1"):
                import tempfile

                import ray as _r

                try:  # in Ray's temp dir (removed with it); the pool removes it when it closes
                    root = _r.get_runtime_context().get_temp_dir()
                except Exception:  # noqa: BLE001
                    root = None
                return "file://" + os.path.join(tempfile.mkdtemp(prefix="genesis-pg-", dir=root), "store")
            v6 = ":" in host
            with socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("", 0))
                return f"tcp://{f'[{host}]' if v6 else host}:{s.getsockname()[1]}"

        def join(self, init_method: str, backend: str, timeout_s: float) -> bool:
            import datetime

            import torch
            import torch.distributed as dist

            if init_method.startswith("file://"):  # every rank on this machine's loopback: gloo / NCCL talk over lo
                for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
                    os.environ.setdefault(name, "lo")
            kwargs = dict(backend=backend, init_method=init_method, rank=self.rank, world_size=self.world,
                          timeout=datetime.timedelta(seconds=timeout_s))
            if self.use_gpu:
                torch.cuda.set_device(0)
                if backend == "nccl":
                    kwargs["device_id"] = torch.device("cuda:0")
            dist.init_process_group(**kwargs)
            return True

        def run(self, fn: Any, *args: Any) -> Any:
            if isinstance(fn, tuple):
                import importlib

                obj: Any = importlib.import_module(fn[0])
                for part in fn[1].split("."):
                    obj = getattr(obj, part)
                fn = obj
            return fn(self.ctx, *args)

    _actor_cls = ray.remote(GenesisRayWorker)
    return _actor_cls


class RayWorkerPool:
    """``world_size`` Ray actors in one torch.distributed group (see the module docstring).

    Args:
        world_size: number of workers (ranks).
        use_gpu: one GPU per worker (NCCL) or a CPU worker (gloo).
        address: Ray address to join; empty/None: embedded Ray on this machine (or ``RAY_ADDRESS``).
        strategy: placement group strategy: ``PACK`` (default), ``SPREAD``, ``STRICT_PACK``, ``STRICT_SPREAD``.
        env: environment variables for every worker (NCCL settings, ...).
        timeout_s: torch.distributed timeout and the default wait of :meth:`run`.
        cpus_per_worker: CPUs reserved per worker.
    """

    def __init__(self, world_size: int, *, use_gpu: bool = True, address: Optional[str] = None,
                 strategy: str = "PACK", env: Optional[Dict[str, str]] = None, timeout_s: float = 600.0,
                 cpus_per_worker: float = 1, backend: Optional[str] = None, start_timeout_s: float = 180.0):
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive int; got {world_size!r}")
        ray = _ray()
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self._remove_pg = remove_placement_group
        connect(address)
        self.world_size, self.use_gpu = world_size, use_gpu
        self.backend = backend or ("nccl" if use_gpu else "gloo")
        self.timeout_s = float(timeout_s)
        self.closed = False
        self.actors: List[Any] = []
        self._meet = ""
        bundle = {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
        self._pg = placement_group([dict(bundle) for _ in range(world_size)], strategy=strategy)
        try:
            ray.get(self._pg.ready(), timeout=start_timeout_s)
        except Exception as exc:  # noqa: BLE001
            self._remove_pg(self._pg)
            need = f"{world_size} x {bundle}"
            raise RuntimeError(f"Ray could not reserve {need} ({strategy}) within {start_timeout_s:.0f} s; the cluster "
                               f"has {ray.cluster_resources()}. Ask for fewer GPUs or add hosts ({exc})") from None
        cls = _worker_class()
        env = dict(env or {})
        try:
            self.actors = [
                cls.options(num_cpus=cpus_per_worker, num_gpus=1 if use_gpu else 0, max_restarts=0,
                            scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=r)
                            ).remote(r, world_size, _code_paths(), env, use_gpu)
                for r in range(world_size)
            ]
            self.placement = self._gather([a.describe.remote() for a in self.actors], start_timeout_s, "starting")
            master = self.placement[0]["ip"]
            self._meet = self._gather([self.actors[0].rendezvous.remote(master)], start_timeout_s,
                                      "choosing a rendezvous")[0]
            self._gather([a.join.remote(self._meet, self.backend, self.timeout_s) for a in self.actors],
                         start_timeout_s, "joining the process group")
        except BaseException:
            self.close()
            raise
        hosts = sorted({p["host"] for p in self.placement})
        logger.info(f"{world_size} Ray worker(s) on {len(hosts)} host(s) {hosts}, {self.backend}: "
                    + ", ".join(f"rank {p['rank']}@{p['ip']}" + (f" GPU {','.join(p['gpus'])}" if p['gpus'] else "")
                                for p in self.placement))

    def __enter__(self) -> "RayWorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _where(self, rank: int) -> str:
        p = (getattr(self, "placement", None) or [{}] * self.world_size)[rank] if rank < self.world_size else {}
        gpu = f", GPU {','.join(p['gpus'])}" if p.get("gpus") else ""
        return f"rank {rank} (host {p.get('host', '?')} {p.get('ip', '')}, pid {p.get('pid', '?')}{gpu})"

    def _gather(self, futures: List[Any], timeout: float, what: str) -> List[Any]:
        """ray.get every future; on the first failure stop all workers and raise WorkerFailed naming the rank."""
        ray = _ray()
        index = {f: i for i, f in enumerate(futures)}
        pending = list(futures)
        results: Dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                ranks = sorted(index[f] for f in pending)
                self._abort()
                raise WorkerFailed(f"Ray worker(s) {ranks} gave no answer within {timeout:.0f} s while {what}; all "
                                   f"workers were stopped, the next run starts fresh ones", rank=ranks[0])
            ready, pending = ray.wait(pending, num_returns=1, timeout=min(left, 1.0))
            for f in ready:
                rank = index[f] if len(futures) == self.world_size else 0
                try:
                    results[index[f]] = ray.get(f)
                except Exception as exc:  # noqa: BLE001
                    died = isinstance(exc, ray.exceptions.RayActorError)
                    cause = getattr(exc, "cause", None) or exc
                    detail = "died (its process ended)" if died else f"failed: {type(cause).__name__}: {cause}"
                    self._abort()
                    raise WorkerFailed(f"Ray worker {self._where(rank)} {detail} while {what}; the other workers "
                                       f"were stopped and the next run starts fresh ones", rank=rank) from None
        return [results[i] for i in range(len(futures))]

    def put(self, obj: Any) -> Any:
        """Store ``obj`` once in Ray's object store; pass the returned reference to :meth:`run`."""
        return _ray().put(obj)

    def run(self, fn: Callable[..., Any], *args: Any, per_rank: Optional[Sequence[tuple]] = None,
            timeout: Optional[float] = None) -> List[Any]:
        """Run ``fn(ctx, *args, *per_rank[rank])`` on every worker; results in rank order (see WorkerFailed)."""
        if self.closed:
            raise RuntimeError("this RayWorkerPool is closed (a worker failed or close() was called); start a new one")
        if per_rank is not None and len(per_rank) != self.world_size:
            raise ValueError(f"per_rank must give one argument tuple per rank ({self.world_size}); got {len(per_rank)}")
        spec = portable(fn)
        futures = [a.run.remote(spec, *args, *(per_rank[r] if per_rank is not None else ()))
                   for r, a in enumerate(self.actors)]
        return self._gather(futures, self.timeout_s if timeout is None else timeout,
                            f"running {getattr(fn, '__name__', fn)!s}")

    def _abort(self) -> None:
        self.close()

    def close(self) -> None:
        """Stop every actor and release the placement group."""
        if self.closed:
            return
        self.closed = True
        try:
            ray = _ray()
            for a in self.actors:
                try:
                    ray.kill(a, no_restart=True)
                except Exception:  # noqa: BLE001
                    pass
            if getattr(self, "_pg", None) is not None:
                try:
                    self._remove_pg(self._pg)
                except Exception:  # noqa: BLE001
                    pass
        except ImportError:
            pass
        if self._meet.startswith("file://"):  # the workers were on this machine; killed, they leave their store
            import shutil

            shutil.rmtree(os.path.dirname(self._meet[len("file://"):]), ignore_errors=True)
