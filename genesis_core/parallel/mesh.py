"""The process groups of a multi-GPU run: a CFG axis times a sequence mesh (Ulysses x ring).

``world = cfg * ulysses * ring`` processes of one ``torch.distributed`` default group are laid out as

    global rank = c * (ulysses * ring) + r * ulysses + u        (c: CFG branch, r: ring index, u: Ulysses index)

* one *sequence group* per CFG branch (its ``ulysses * ring`` ranks hold the shards of one token sequence,
  shard ``r * ulysses + u`` in token order);
* one *Ulysses group* per (c, r): all-to-all from a token split to a head split (keep it inside one host:
  it moves the most bytes);
* one *ring group* per (c, u): key/value blocks travel round it (it can span hosts);
* one *CFG group* per (r, u): the ranks that hold the same shard of cond and of uncond.

``torch.distributed.new_group`` is collective over the default group: :func:`build_mesh` must be called by
every process, with the same arguments, in the same order. Nothing here runs at import time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

__all__ = ["ParallelMesh", "build_mesh", "mesh_ranks", "shard_sizes"]


@dataclass(frozen=True)
class ParallelMesh:
    """This process's place in a ``cfg x ring x ulysses`` mesh and the groups it belongs to.

    Groups of size 1 are ``None`` (nothing travels on them). ``rank`` is the global rank.
    """

    cfg: int
    ulysses: int
    ring: int
    rank: int
    cfg_index: int
    ring_index: int
    ulysses_index: int
    sequence_group: object = None
    ulysses_group: object = None
    ring_group: object = None
    cfg_group: object = None
    ulysses_ranks: tuple = ()
    ring_ranks: tuple = ()
    sequence_ranks: tuple = ()
    cfg_ranks: tuple = ()

    @property
    def sequence_degree(self) -> int:
        """How many ranks share one token sequence (``ulysses * ring``)."""
        return self.ulysses * self.ring

    @property
    def shard_index(self) -> int:
        """Which token shard this rank holds inside its sequence group (token order)."""
        return self.ring_index * self.ulysses + self.ulysses_index

    @property
    def world(self) -> int:
        return self.cfg * self.ulysses * self.ring


def _check_degree(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}")
    return value


def mesh_ranks(cfg: int, ulysses: int, ring: int) -> dict:
    """The rank lists of every group of a mesh (pure arithmetic; no process group is touched)."""
    cfg, ulysses, ring = (_check_degree(n, v) for n, v in (("cfg", cfg), ("ulysses", ulysses), ("ring", ring)))
    seq = ulysses * ring
    g = lambda c, r, u: c * seq + r * ulysses + u  # noqa: E731
    return {
        "sequence": [[g(c, r, u) for r in range(ring) for u in range(ulysses)] for c in range(cfg)],
        "ulysses": [[g(c, r, u) for u in range(ulysses)] for c in range(cfg) for r in range(ring)],
        "ring": [[g(c, r, u) for r in range(ring)] for c in range(cfg) for u in range(ulysses)],
        "cfg": [[g(c, r, u) for c in range(cfg)] for r in range(ring) for u in range(ulysses)],
    }


def build_mesh(cfg: int = 1, ulysses: Optional[int] = None, ring: int = 1, *, timeout=None) -> ParallelMesh:
    """Create (collectively) the groups of a ``cfg x ring x ulysses`` mesh over the default process group.

    ``ulysses=None`` takes every rank left over: ``world // (cfg * ring)``. Raises ValueError when the degrees do
    not multiply to the world size. Every process must call it with the same arguments.
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("build_mesh needs an initialised torch.distributed default process group "
                           "(torch.distributed.init_process_group); none is initialised in this process")
    world, rank = dist.get_world_size(), dist.get_rank()
    cfg, ring = _check_degree("cfg", cfg), _check_degree("ring", ring)
    if ulysses is None:
        if world % (cfg * ring):
            raise ValueError(f"world size {world} is not divisible by cfg * ring = {cfg} * {ring}")
        ulysses = world // (cfg * ring)
    ulysses = _check_degree("ulysses", ulysses)
    if cfg * ulysses * ring != world:
        raise ValueError(f"cfg * ulysses * ring must equal the world size {world}; got {cfg} * {ulysses} * {ring} = "
                         f"{cfg * ulysses * ring}")
    lists = mesh_ranks(cfg, ulysses, ring)
    mine = {}
    for kind in ("sequence", "ulysses", "ring", "cfg"):  # fixed order: new_group is collective
        for ranks in lists[kind]:
            group = dist.new_group(ranks, timeout=timeout) if len(ranks) > 1 else None
            if rank in ranks:
                mine[kind] = (group, tuple(ranks))
    seq = ulysses * ring
    c, rest = divmod(rank, seq)
    r, u = divmod(rest, ulysses)
    return ParallelMesh(
        cfg=cfg, ulysses=ulysses, ring=ring, rank=rank, cfg_index=c, ring_index=r, ulysses_index=u,
        sequence_group=mine["sequence"][0], ulysses_group=mine["ulysses"][0], ring_group=mine["ring"][0],
        cfg_group=mine["cfg"][0], ulysses_ranks=mine["ulysses"][1], ring_ranks=mine["ring"][1],
        sequence_ranks=mine["sequence"][1], cfg_ranks=mine["cfg"][1],
    )


def shard_sizes(total: int, parts: int, minimum: int = 0) -> Tuple[int, List[int]]:
    """``(length, real)``: ``total`` tokens cut into ``parts`` contiguous shards, each ``length`` long.

    ``length = max(ceil(total / parts), minimum)``; the real tokens fill the shards in order, so only the last
    shards carry padding (a shard may be all padding when ``total`` is small). ``sum(real) == total`` always.
    """
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise ValueError(f"total must be a positive int; got {total!r}")
    _check_degree("parts", parts)
    length = max(-(-total // parts), int(minimum))
    real, left = [], total
    for _ in range(parts):
        take = min(length, left)
        real.append(take)
        left -= take
    return length, real
