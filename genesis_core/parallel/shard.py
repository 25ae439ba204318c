"""Cutting a token sequence into padded shards and joining the shards back, over a process group.

A sequence of ``total`` tokens is cut into ``parts`` contiguous shards of one length ``L`` (see
:func:`genesis_core.parallel.mesh.shard_sizes`): shard ``i`` holds tokens ``[i*L, i*L + real[i])`` followed by
zero padding, so every rank's tensors have the same shape and the collectives stay simple. :func:`gather_tokens`
all-gathers the shards and drops exactly the padding: no token is ever lost or duplicated.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from .mesh import shard_sizes

__all__ = ["split_tokens", "gather_tokens", "unpad_tokens"]


def split_tokens(x: torch.Tensor, index: int, parts: int, dim: int = 1, minimum: int = 0
                 ) -> Tuple[torch.Tensor, int, List[int]]:
    """``(shard, length, real)``: shard ``index`` of ``parts`` of ``x`` along ``dim``, zero-padded to ``length``.

    ``real[i]`` is the number of real tokens in shard ``i`` (padding sits at each shard's end).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}")
    dim = dim % x.dim()
    total = x.shape[dim]
    length, real = shard_sizes(total, parts, minimum)
    if not 0 <= index < parts:
        raise ValueError(f"index must be in [0, {parts}); got {index}")
    start = min(index * length, total)
    piece = x.narrow(dim, start, real[index])
    if real[index] == length:
        return piece, length, real
    pad_shape = list(x.shape)
    pad_shape[dim] = length - real[index]
    return torch.cat([piece, x.new_zeros(pad_shape)], dim=dim), length, real


def unpad_tokens(x: torch.Tensor, real: Sequence[int], dim: int = 1) -> torch.Tensor:
    """Concatenated padded shards (``len(real)`` of equal length along ``dim``) -> the real tokens only."""
    dim = dim % x.dim()
    parts = len(real)
    if x.shape[dim] % parts:
        raise ValueError(f"dimension {dim} of length {x.shape[dim]} is not {parts} shards of one length")
    length = x.shape[dim] // parts
    if all(n == length for n in real):
        return x
    pieces = [x.narrow(dim, i * length, n) for i, n in enumerate(real) if n]
    return torch.cat(pieces, dim=dim)


def gather_tokens(shard: torch.Tensor, real: Sequence[int], group=None, dim: int = 1) -> torch.Tensor:
    """All-gather equal-length padded shards over ``group`` (in group rank order) and drop the padding.

    With ``group=None`` and one shard, returns the shard's real tokens.
    """
    import torch.distributed as dist

    if group is None:
        if len(real) != 1:
            raise ValueError(f"gather_tokens without a group needs exactly one shard; got real={list(real)}")
        return shard.narrow(dim % shard.dim(), 0, real[0])
    size = dist.get_world_size(group)
    if len(real) != size:
        raise ValueError(f"real must list one count per rank of the group ({size}); got {len(real)}")
    shard = shard.contiguous()
    out: List[torch.Tensor] = [torch.empty_like(shard) for _ in range(size)]
    dist.all_gather(out, shard, group=group)
    return unpad_tokens(torch.cat(out, dim=dim), real, dim=dim)


def check_real(real: Optional[Sequence[int]], parts: int, length: int) -> List[int]:
    """Validate per-shard real-token counts (``None`` means every shard is full)."""
    if real is None:
        return [length] * parts
    real = [int(n) for n in real]
    if len(real) != parts:
        raise ValueError(f"real must give one token count per shard ({parts}); got {len(real)}")
    if any(n < 0 or n > length for n in real):
        raise ValueError(f"every real token count must be in [0, {length}] (the shard length); got {real}")
    if sum(real) < 1:
        raise ValueError(f"the shards hold no real token at all; got real={real}")
    return real
