"""Attention types and the small value types that travel between dispatch and the backends."""
from __future__ import annotations

from enum import Enum
from typing import Optional

import torch


class AttentionType(str, Enum):
    """The attention implementations Genesis can dispatch to.

    ``AUTO`` lets Genesis choose (measured per call signature where the autotuner is on).
    The string values are what nodes, the CLI and ``attention(..., backend="sdpa")`` accept.
    """

    FLASH_ATTENTION = "flash"
    SAGE_ATTENTION = "sage"
    XFORMERS = "xformers"
    SDPA = "sdpa"
    PYTORCH = "pytorch"
    AUTO = "auto"

    def __str__(self) -> str:  # "flash", not "AttentionType.FLASH_ATTENTION"
        return self.value


LAYOUTS = ("BHND", "BNHD")


def mask_4d_shape(shape) -> tuple:
    """The 4-D shape a 1- to 4-D attention mask is viewed as: [Nk] -> [1, 1, 1, Nk],
    [Nq, Nk] -> [1, 1, Nq, Nk], [B, Nq, Nk] -> [B, 1, Nq, Nk] (3-D masks are per batch, not per head)."""
    s = tuple(shape)
    return (s[0], 1, s[1], s[2]) if len(s) == 3 else (1,) * (4 - len(s)) + s


class AttentionCall:
    """One validated attention call, always in BHND views.

    q: [B, Hq, Nq, D]; k: [B, Hkv, Nk, D]; v: [B, Hkv, Nk, Dv] with Hq % Hkv == 0.
    mask: None, or a 4-D tensor broadcastable to [B, Hq, Nq, Nk] (each dim full size or 1),
    boolean (True = attend) or additive float in q's dtype.
    """

    __slots__ = ("q", "k", "v", "mask", "scale")

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], scale: float):
        self.q, self.k, self.v, self.mask, self.scale = q, k, v, mask, scale

    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def heads(self) -> int:
        return self.q.shape[1]

    @property
    def kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def q_len(self) -> int:
        return self.q.shape[2]

    @property
    def kv_len(self) -> int:
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.q.shape[3]

    @property
    def v_head_dim(self) -> int:
        return self.v.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def mask_kind(self) -> str:
        if self.mask is None:
            return "none"
        return "bool" if self.mask.dtype == torch.bool else "additive"

    @property
    def gqa(self) -> bool:
        return self.kv_heads != self.heads
