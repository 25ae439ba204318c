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
