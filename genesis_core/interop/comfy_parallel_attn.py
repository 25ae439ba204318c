"""The sequence-parallel attention override for sharded ComfyUI models, and the shard state its block patches share.

A model's block patches (:mod:`.comfy_parallel_models`) cut the image / video tokens at the first block and
record, in a :class:`Shard` made current on this thread while a block runs, how long each rank's shard is and
which attention calls span the shards: ``joints`` maps the token count of such a self-attention call to its
``(joint front, joint back)`` tokens (Flux and SD3: text in front; HunyuanVideo: text behind; Wan and SD3's
image-only attention: none). :class:`SequenceAttentionOverride` (a ComfyUI ``optimized_attention_override``)
turns each such call into :func:`~genesis_core.parallel.sequence.sequence_attention`; every other call (Wan's
cross-attention, text refiners, anything outside the blocks) runs through Genesis on this rank alone. This
module never imports ComfyUI.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..attn import quality as _quality
from ..attn import registry
from ..attn.types import mask_4d_shape
from ..parallel.sequence import sequence_attention
from ..parallel.shard import gather_tokens, split_tokens
from .comfy_adapter import comfy_attention

__all__ = ["Shard", "SequenceAttentionOverride", "BlockPatches", "current_shard", "level_for"]

_active = threading.local()  # the shard of the block now running on this thread (set by the block patches)


@dataclass
class Shard:
    """One forward's token split on this rank (set at the first block, dropped after the last)."""

    total: int                     # real tokens of the whole sharded sequence
    length: int                    # padded tokens per rank
    real: List[int]                # real tokens per rank
    start: int = 0                 # this rank's first token in the whole sequence
    pe: Any = None                 # this rank's RoPE frequencies (joint tokens' included)
    vec: Any = None                # this rank's modulation (Wan per-token timesteps) or the whole one
    joints: Dict[int, Tuple[int, int]] = field(default_factory=dict)  # sharded call's tokens -> (front, back)
    mask_keys: Optional[int] = None  # keys a key mask spans over the whole sequence; None: masks are refused
    model: str = "this model"
    extra: Dict[str, Any] = field(default_factory=dict)  # model-specific (HunyuanVideo's modulation ranges)


def current_shard() -> Optional[Shard]:
    return getattr(_active, "shard", None)


_PARAMS = ("q", "k", "v", "heads", "mask", "attn_precision", "skip_reshape", "skip_output_reshape")


def _bind(args, kwargs) -> Dict[str, Any]:
    """ComfyUI's attention arguments by name (``fn(q, k, v, heads, mask=None, attn_precision=None,
    skip_reshape=False, skip_output_reshape=False, **kwargs)``); other kwargs are dropped."""
    if len(args) > len(_PARAMS):
        raise TypeError(f"ComfyUI attention takes at most {len(_PARAMS)} positional arguments; got {len(args)}")
    bound = dict(zip(_PARAMS, args))
    bound.update({k: v for k, v in kwargs.items() if k in _PARAMS})
    missing = [p for p in _PARAMS[:4] if p not in bound]
    if missing:
        raise TypeError(f"ComfyUI attention call is missing {', '.join(missing)}")
    return bound


def level_for(backend: Any, quality: Optional[str]) -> Optional[str]:
    """The level calls with ``backend`` run at under ``quality``: an explicitly chosen lossy backend (``sage``)
    raises it to the level its precision class needs, as the Attention Switch does; ``auto`` keeps it (None: the
    engine's default)."""
    name = backend.value if hasattr(backend, "value") else str(backend)
    level = None if quality is None else _quality.normalise(quality)
    if name == "auto":
        return level
    try:
        needs = _quality.loosest_for(registry.get(name).precision)
    except KeyError:
        return level  # an unknown name: the engine says so at the first call
    if level is None or _quality.LEVELS.index(level) < _quality.LEVELS.index(needs):
        return needs
    return level


def _check_mask(st: Shard, mask: torch.Tensor) -> None:
    shape = tuple(mask.shape)
    if st.mask_keys is None:
        raise ValueError(f"{st.model} sequence mode cannot shard an attention mask; this model call passes one "
                         f"(shape {shape}); use mode 'cfg'")
    m = mask_4d_shape(shape) if 1 <= len(shape) <= 4 else shape
    if len(m) != 4 or m[2] != 1:
        raise ValueError(f"{st.model} sequence mode: this attention mask (shape {shape}) differs per query, which "
                         "cannot be cut with the tokens; use mode 'cfg'")
    if m[3] != st.mask_keys:
        raise ValueError(f"{st.model} sequence mode: the attention mask spans {m[3]} keys, not the {st.mask_keys} "
                         "tokens of the whole sequence; use mode 'cfg'")


class SequenceAttentionOverride:
    """``optimized_attention_override`` for sharded models: self-attention over the shards goes through
    :func:`sequence_attention`, every other call through Genesis attention on this rank alone.

    ``quality`` (``exact`` / ``high`` / ``fast``; None: the engine's default) is the budget of both kinds of
    call, raised for an explicit lossy ``backend`` (:func:`level_for`); :attr:`level` is the level calls run at
    now (the worker sets it per model call, as the ComfyUI process's Attention Switch decides it step by step).
    Ring blocks stay exact (see :func:`sequence_attention`).
    """

    def __init__(self, mesh, backend: str = "auto", ring_impl: str = "ring", quality: Optional[str] = None):
        self.mesh, self.backend, self.ring_impl = mesh, backend, ring_impl
        self.quality = None if quality is None else _quality.normalise(quality)
        self.level: Optional[str] = level_for(backend, self.quality)
        self.sharded_calls = 0
        self.local_calls = 0

    def __deepcopy__(self, memo: dict) -> "SequenceAttentionOverride":
        return self

    def __call__(self, func, *args: Any, **kwargs: Any) -> torch.Tensor:
        bound = _bind(args, kwargs)
        st = current_shard()
        q, k, v, heads = bound["q"], bound["k"], bound["v"], bound["heads"]
        skip_in, skip_out = bool(bound.get("skip_reshape", False)), bool(bound.get("skip_output_reshape", False))
        nq, nk = (q.shape[2], k.shape[2]) if skip_in else (q.shape[1], k.shape[1])
        joint = st.joints.get(nq) if st is not None and nq == nk else None
        mask = bound.get("mask")
        if joint is None:
            self.local_calls += 1
            return comfy_attention(q, k, v, heads, mask, bound.get("attn_precision"), skip_in, skip_out,
                                   backend=self.backend, quality=self.level)
        if mask is not None:
            _check_mask(st, mask)
        if skip_in:
            qq, kk, vv, layout = q, k, v, "BHND"
        else:
            b = q.shape[0]
            qq, kk, vv = (t.reshape(b, t.shape[1], heads, -1) for t in (q, k, v))
            layout = "BNHD"
        out = sequence_attention(qq, kk, vv, self.mesh, real=st.real, joint_front=joint[0], joint_back=joint[1],
                                 layout=layout, backend=self.backend, ring_impl=self.ring_impl, mask=mask,
                                 quality=self.level)
        self.sharded_calls += 1
        if layout == "BHND":
            return out if skip_out else out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)
        return out.transpose(1, 2) if skip_out else out.reshape(out.shape[0], out.shape[1], -1)


class BlockPatches:
    """Per-forward shard state shared by one model's block patches (thread-local: one forward per thread)."""

    def __init__(self, mesh):
        self.mesh = mesh
        self._tls = threading.local()

    @property
    def st(self) -> Optional[Shard]:
        return getattr(self._tls, "st", None)

    @st.setter
    def st(self, value: Optional[Shard]) -> None:
        self._tls.st = value

    def split(self, x: torch.Tensor, dim: int, minimum: int = 0):
        """``(shard, length, real)`` of ``x`` along ``dim`` for this rank."""
        return split_tokens(x, self.mesh.shard_index, self.mesh.sequence_degree, dim=dim, minimum=minimum)

    def gather(self, x: torch.Tensor, real: List[int], dim: int = 1) -> torch.Tensor:
        return gather_tokens(x, real, group=self.mesh.sequence_group, dim=dim)

    def start_of(self, length: int, total: int) -> int:
        return min(self.mesh.shard_index * length, total)

    def run(self, st: Shard, original, args: Dict[str, Any]):
        _active.shard = st
        try:
            return dict(original(args))
        finally:
            _active.shard = None
