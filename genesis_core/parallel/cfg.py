"""CFG-parallel model calls: split one batched call into its cond and uncond branches, join the results.

A sampler with classifier-free guidance calls the model once per step on a batch made of *chunks*: each chunk is
one conditioning (cond or uncond) for the whole latent batch, and a list such as ``[0, 1]`` says which chunk is
which (0 = cond, 1 = uncond; ComfyUI's ``cond_or_uncond``). :func:`cfg_branches` groups the chunks by label,
:func:`take_chunks` cuts the batch-sized tensors of a call to one branch's chunks (everything else is passed
whole), and :func:`join_chunks` puts the branches' results back in the original chunk order.

With CFG = 1 only cond chunks exist: there is one branch and nothing to split (the reason says so).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["cfg_branches", "take_chunks", "split_call", "join_chunks"]


def cfg_branches(cond_or_uncond: Sequence[int], branches: int = 2) -> Tuple[List[List[int]], Optional[str]]:
    """``(chunk ids per branch, reason or None)``: chunks grouped by label, at most ``branches`` groups.

    Labels are spread over the branches in order of first appearance; with more labels than branches, a branch
    takes several labels. The reason is set when fewer branches than asked for can be filled.
    """
    labels: List[int] = []
    for label in cond_or_uncond:
        if label not in labels:
            labels.append(label)
    if not labels:
        raise ValueError("cond_or_uncond must name at least one chunk; got an empty list")
    groups: List[List[int]] = [[] for _ in range(min(branches, len(labels)))]
    for i, label in enumerate(cond_or_uncond):
        groups[labels.index(label) % len(groups)].append(i)
    reason = None
    if len(groups) < branches:
        reason = (f"this model call has only {'cond' if labels == [0] else 'one kind of'} chunks "
                  f"(cond_or_uncond={list(cond_or_uncond)}): CFG = 1, or the sampler ran cond and uncond in separate "
                  f"calls, so there is nothing to split across {branches} CFG branches")
    return groups, reason


def take_chunks(value: Any, chunk_ids: Sequence[int], n_chunks: int, batch: int) -> Any:
    """``value`` cut to the given chunks if it is batch-sized along dim 0 (tensors, lists of tensors), else as is."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0 or value.shape[0] != batch or batch % n_chunks:
            return value
        per = batch // n_chunks
        if list(chunk_ids) == list(range(n_chunks)):
            return value
        idx = torch.tensor([c * per + j for c in chunk_ids for j in range(per)], device=value.device)
        return value.index_select(0, idx)
    if isinstance(value, list):
        return [take_chunks(v, chunk_ids, n_chunks, batch) for v in value]
    if isinstance(value, tuple):
        return tuple(take_chunks(v, chunk_ids, n_chunks, batch) for v in value)
    return value


def split_call(x: torch.Tensor, timestep: torch.Tensor, conds: Dict[str, Any], cond_or_uncond: Sequence[int],
               branches: int = 2):
    """Split a batched call into per-branch ``(chunk_ids, x, timestep, conds)``; returns (parts, reason)."""
    n = len(cond_or_uncond)
    if x.shape[0] % n:
        raise ValueError(f"the batch of {x.shape[0]} does not split into {n} chunks (cond_or_uncond={list(cond_or_uncond)})")
    groups, reason = cfg_branches(cond_or_uncond, branches)
    batch = x.shape[0]
    parts = []
    for ids in groups:
        parts.append((ids, take_chunks(x, ids, n, batch), take_chunks(timestep, ids, n, batch),
                      {k: take_chunks(v, ids, n, batch) for k, v in conds.items()}))
    return parts, reason


def join_chunks(results: Sequence[torch.Tensor], groups: Sequence[Sequence[int]], n_chunks: int) -> torch.Tensor:
    """Inverse of the split: ``results[b]`` holds the chunks ``groups[b]`` (in that order) -> all chunks in order."""
    if len(results) != len(groups):
        raise ValueError(f"one result per branch expected ({len(groups)}); got {len(results)}")
    pieces: Dict[int, torch.Tensor] = {}
    for out, ids in zip(results, groups):
        if out.shape[0] % len(ids):
            raise ValueError(f"a branch result of batch {out.shape[0]} does not hold its {len(ids)} chunks")
        for cid, piece in zip(ids, out.chunk(len(ids))):
            pieces[cid] = piece
    missing = [i for i in range(n_chunks) if i not in pieces]
    if missing:
        raise ValueError(f"chunks {missing} have no result")
    return torch.cat([pieces[i] for i in range(n_chunks)])
