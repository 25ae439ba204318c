"""Helpers the backends share: GQA expansion, mask conversion, package versions."""
from __future__ import annotations

import importlib.metadata
import importlib.util
from typing import Optional

import torch

from ..limits import HALF as HALF_DTYPES  # noqa: F401  (one definition of the half dtypes)
from ..types import AttentionCall


def package_version(dist: str) -> Optional[str]:
    """Installed distribution version, or None (never imports the package)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def module_present(name: str) -> bool:
    """Whether ``name`` can be found without importing it (a parent that fails to import counts as absent)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def expand_kv(call: AttentionCall) -> tuple:
    """k and v with their heads repeated to q's head count (views where no GQA)."""
    k, v = call.k, call.v
    if call.gqa:
        group = call.heads // call.kv_heads
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    return k, v


def additive_mask(mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """A boolean mask (True = attend) as an additive float mask in ``dtype``; float masks pass through."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        out = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
        return out.masked_fill_(~mask, float("-inf"))
    return mask.to(dtype)


def dead_rows(mask: torch.Tensor) -> torch.Tensor:
    """[..., Nq|1, 1] flags of the query rows with no key to attend to: a boolean mask False on every key, or an
    additive one -inf on every key (a reduction: no mask-sized temporary). Such rows return 0 on every backend."""
    if mask.dtype == torch.bool:
        return mask.any(-1, keepdim=True).logical_not_()
    return mask.amax(-1, keepdim=True) == float("-inf")


def zero_dead_rows(out: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``out`` with the fully masked rows of ``mask`` set to 0 (out of place when autograd records it)."""
    if mask is None:
        return out
    dead = dead_rows(mask)
    return out.masked_fill(dead, 0.0) if out.requires_grad else out.masked_fill_(dead, 0.0)
