"""A multi-GPU session: workers joined in one process group, a model kept on each, calls split by CFG branch.

The workers are a :class:`~genesis_core.parallel.ray_workers.RayWorkerPool` (ComfyUI, clusters) or a
:class:`~genesis_core.parallel.launch.LocalProcessGroup` (tests, benchmarks); both run ``fn(ctx, *args)`` on
every rank and return the results in rank order. The ranks form a ``cfg x ring x ulysses`` mesh
(:mod:`.mesh`): CFG branch ``c`` is ranks ``[c*S, (c+1)*S)`` with ``S = ulysses * ring``.

:meth:`ParallelSession.load` sends a model *once* (a builder function and its payload; the workers build it and
keep it); :meth:`ParallelSession.call` then sends only the call's inputs (latents, timestep, conditioning) to the
ranks of each branch and returns the joined result, exactly as one process calling the model would.
"""
from __future__ import annotations

import itertools
import os
import threading
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from .._log import log_once, logger
from ..attn.quality import normalise as normalise_quality
from .cfg import join_chunks, split_call
from .mesh import build_mesh
from .portable import portable, resolve

__all__ = ["ParallelSession", "ParallelSettings", "session_for", "close_sessions", "NCCL_ENV"]

_keys = itertools.count(1)


# ---------------------------------------------------------------- run on every worker


def _setup(ctx, cfg: int, ulysses: int, ring: int, env: Dict[str, str]):
    import os

    os.environ.update(env or {})
    meshes = ctx.cache.setdefault("meshes", {})  # a pool may serve sessions of several shapes, one at a time
    if (cfg, ulysses, ring) not in meshes:
        meshes[(cfg, ulysses, ring)] = build_mesh(cfg=cfg, ulysses=ulysses, ring=ring)
    m = ctx.cache["mesh"] = meshes[(cfg, ulysses, ring)]
    return {"rank": m.rank, "cfg_index": m.cfg_index, "shard": m.shard_index, "device": str(ctx.device)}


def _load(ctx, key: int, builder: Callable, payload: Any, options: Dict[str, Any]):
    models = ctx.cache.setdefault("models", {})
    models.clear()  # one model per worker: the previous one's memory goes first
    models[key] = resolve(builder)(ctx, ctx.cache["mesh"], payload, options)
    return True


def _step(ctx, key: int, inputs: Optional[Dict[str, Any]]):
    if inputs is None:
        return None
    runner = ctx.cache.get("models", {}).get(key)
    if runner is None:
        raise RuntimeError(f"this worker holds no model {key}; load() must run before call()")
    out = runner(inputs)
    return out if ctx.cache["mesh"].shard_index == 0 else None


def _unload(ctx):
    ctx.cache.pop("models", None)
    return True


# ---------------------------------------------------------------- the session


class ParallelSession:
    """Workers + mesh + one loaded model (see the module docstring).

    Args:
        pool: a RayWorkerPool or LocalProcessGroup with ``cfg * ulysses * ring`` ranks.
        cfg: 1 or 2 CFG branches. ulysses, ring: the sequence mesh of each branch.
        env: environment variables set in every worker before the mesh is built.
    """

    def __init__(self, pool, cfg: int = 1, ulysses: int = 1, ring: int = 1, env: Optional[Dict[str, str]] = None):
        if cfg not in (1, 2):
            raise ValueError(f"cfg must be 1 or 2 branches; got {cfg!r}")
        world = cfg * ulysses * ring
        if pool.world_size != world:
            raise ValueError(f"the pool has {pool.world_size} workers but cfg * ulysses * ring = {cfg} * {ulysses} * "
                             f"{ring} = {world}")
        self.pool, self.cfg, self.ulysses, self.ring = pool, cfg, ulysses, ring
        self.sequence = ulysses * ring
        self.placement = pool.run(_setup, cfg, ulysses, ring, dict(env or {}))
        self.key: Optional[int] = None
        self.calls = 0

    def load(self, builder: Callable, payload: Any, options: Optional[Dict[str, Any]] = None) -> int:
        """Build the model on every worker: ``builder(ctx, mesh, payload, options) -> runner``; sent once."""
        key = next(_keys)
        ref = self.pool.put(payload)
        self.pool.run(_load, key, portable(builder), ref, dict(options or {}))
        self.key = key
        return key

    def call(self, x: torch.Tensor, timestep: torch.Tensor, conds: Dict[str, Any],
             cond_or_uncond: Optional[Sequence[int]] = None, extras: Optional[Dict[str, Any]] = None) -> torch.Tensor:
        """One model call: ``runner({"x", "timestep", "conds", "extras"})`` on the workers, joined as one process would.

        With two CFG branches the chunks labelled by ``cond_or_uncond`` are split between them; a call with one
        kind of chunk (CFG = 1) runs on branch 0 and says why once.
        """
        if self.key is None:
            raise RuntimeError("ParallelSession.call before load(): no model on the workers")
        n_chunks = len(cond_or_uncond) if cond_or_uncond else 1
        labels = list(cond_or_uncond) if cond_or_uncond else [0]
        if self.cfg == 2:
            parts, reason = split_call(x, timestep, conds, labels, 2)
            if reason:
                log_once(("cfg-nothing-to-split", tuple(labels)), f"mode cfg: {reason}; it runs on the first "
                         f"{self.sequence} GPU(s) only")
        else:
            parts = [(list(range(n_chunks)), x, timestep, conds)]
        refs = [self.pool.put({"x": px, "timestep": pt, "conds": pc, "extras": dict(extras or {})})
                for _, px, pt, pc in parts]
        per_rank = []
        for rank in range(self.pool.world_size):
            branch = rank // self.sequence
            per_rank.append((refs[branch] if branch < len(refs) else None,))
        results = self.pool.run(_step, self.key, per_rank=per_rank)
        outs: List[torch.Tensor] = [results[b * self.sequence] for b in range(len(parts))]
        self.calls += 1
        out = outs[0] if len(parts) == 1 else join_chunks(outs, [p[0] for p in parts], n_chunks)
        return out.to(x.device) if isinstance(out, torch.Tensor) else out

    def unload(self) -> None:
        """Free the model on every worker (the workers stay)."""
        if self.key is not None and not getattr(self.pool, "closed", False):
            self.pool.run(_unload)
        self.key = None


# ---------------------------------------------------------------- sessions kept per settings (one process)


@dataclass(frozen=True)
class ParallelSettings:
    """How a MODEL runs across workers: ``cfg`` branches (1 or 2) x ``ulysses`` x ``ring``.

    ``backend`` / ``quality``: the workers' attention backend and quality budget (``exact`` / ``high`` /
    ``fast``; None: the default of the process that sends the calls). The quality travels with each call, so
    settings that differ only in it share one session (it takes no part in equality).
    """

    cfg: int = 2
    ulysses: int = 1
    ring: int = 1
    use_gpu: bool = True
    address: str = ""
    gpu_ids: tuple = ()          # embedded Ray only: which of this machine's GPUs
    backend: str = "auto"
    ring_impl: str = "ring"
    timeout_s: float = 900.0
    quality: Optional[str] = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.quality is not None:
            object.__setattr__(self, "quality", normalise_quality(self.quality))

    @property
    def world(self) -> int:
        return self.cfg * self.ulysses * self.ring

    @property
    def placement(self) -> tuple:
        """What decides which workers and GPUs a session holds (not how they attend)."""
        return self.cfg, self.ulysses, self.ring, self.use_gpu, self.address, self.gpu_ids


NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
_sessions: Dict[ParallelSettings, Any] = {}
_sessions_lock = threading.Lock()


def _may_share_gpus(a: ParallelSettings, b: ParallelSettings) -> bool:
    """Whether two GPU sessions may need the same GPUs: on one cluster address unless both name disjoint GPUs of
    this machine (embedded Ray); on a remote cluster which GPUs a pool gets is Ray's choice, so always."""
    if not (a.use_gpu and b.use_gpu) or a.address != b.address:
        return False
    if a.address or not a.gpu_ids or not b.gpu_ids:
        return True
    return bool(set(a.gpu_ids) & set(b.gpu_ids))


def session_for(settings: ParallelSettings) -> "ParallelSession":
    """The session (Ray workers + mesh) for ``settings``: kept between runs, started afresh after a failure."""
    from .ray_workers import RayWorkerPool, connect

    with _sessions_lock:
        s = _sessions.get(settings)
        if s is not None and not s.pool.closed:
            return s
        _sessions.pop(settings, None)
        for other in [o for o in _sessions if o.placement == settings.placement or _may_share_gpus(o, settings)]:
            # The same workers attending differently, or a pool that may hold GPUs the new one needs (Ray would
            # keep the new placement waiting until its start timeout): the old pool lets its GPUs go first.
            changed = ", ".join(
                f"{f.name} {getattr(other, f.name)} -> {getattr(settings, f.name)}" for f in fields(settings)
                if f.compare and getattr(other, f.name) != getattr(settings, f.name))
            logger.info("Multi-GPU: worker settings changed (%s); stopping the previous workers", changed)
            _sessions.pop(other).pool.close()
        init = {}
        if settings.gpu_ids and not settings.address:
            init["num_gpus"] = len(settings.gpu_ids)
            old = os.environ.get("CUDA_VISIBLE_DEVICES")
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in settings.gpu_ids)
            try:
                connect(None, **init)  # the embedded Ray sees only these GPUs (this process's CUDA is set up already)
            finally:
                if old is None:
                    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
                else:
                    os.environ["CUDA_VISIBLE_DEVICES"] = old
        pool = RayWorkerPool(settings.world, use_gpu=settings.use_gpu, address=settings.address or None,
                             env=NCCL_ENV if settings.use_gpu else {}, timeout_s=settings.timeout_s)
        try:
            s = ParallelSession(pool, cfg=settings.cfg, ulysses=settings.ulysses, ring=settings.ring)
        except BaseException:
            pool.close()
            raise
        s.model_id = None  # which model the workers hold (set by the caller after load)
        _sessions[settings] = s
        return s


def close_sessions() -> None:
    """Stop every worker pool this process started (ComfyUI keeps running)."""
    with _sessions_lock:
        for s in _sessions.values():
            s.pool.close()
        _sessions.clear()
