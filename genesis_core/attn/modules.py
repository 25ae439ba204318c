"""The spec's attention modules: CrossAttentionInterface, CrossAttentionModule, AdaptiveAttentionSwitch.

Both modules project tokens to heads and call :func:`genesis_core.attn.dispatch.attention`, so
every backend, the fallback chain and the autotuner serve them.
"""
from __future__ import annotations

import abc
import warnings
from typing import List, Optional, Union

import torch
import torch.nn as nn

from . import quality as _quality
from . import registry
from .dispatch import attention, backend_name, last_backend
from .types import AttentionType

MAX_WEIGHTS_BYTES = 2 * 1024**3  # compute_attention_weights refuses score matrices larger than this


def _check_tokens(name: str, x, dim: int, dim_name: str, param: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [B, N, {dim_name}]; got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{name} must be 3-D [B, N, {dim_name}]; got shape {tuple(x.shape)}")
    if x.shape[-1] != dim:
        raise ValueError(f"{name} last dimension must be {dim_name}={dim}; got shape {tuple(x.shape)}")
    if x.device != param.device:
        raise ValueError(
            f"{name} is on {x.device} but the module's weights are on {param.device}; "
            "move one of them (module.to(device)) or run it through HeterogeneousExecutor"
        )
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must have a floating-point dtype; got {x.dtype}")


def _key_mask(mask: Optional[torch.Tensor], b: int, n: int, m: int) -> Optional[torch.Tensor]:
    """Module masks: [B, M] key padding, [B, N, M], or [B, H, N, M]; returned 4-D for dispatch."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor; got {type(mask).__name__}")
    if mask.dim() == 2:
        if mask.shape != (b, m):
            raise ValueError(f"a 2-D mask is key padding [B, M] = ({b}, {m}); got shape {tuple(mask.shape)}")
        return mask[:, None, None, :]
    if mask.dim() in (3, 4):
        return mask if mask.dim() == 4 else mask[:, None]
    raise ValueError(f"mask must be [B, M] (key padding), [B, N, M] or [B, H, N, M]; got shape {tuple(mask.shape)}")


class CrossAttentionInterface(nn.Module, metaclass=abc.ABCMeta):
    """Cross-modal attention: queries of one modality attend to keys/values of another.

    ``forward(query [B, N, Dq], key [B, M, Dc], value [B, M, Dc], mask=None) -> [B, N, Dq]`` and
    ``compute_attention_weights(query, key, mask=None) -> [B, H, N, M]`` (rows sum to 1).
    """

    @abc.abstractmethod
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        ...

    @abc.abstractmethod
    def compute_attention_weights(self, query: torch.Tensor, key: torch.Tensor,
                                  mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        ...


class _Projected(nn.Module):
    """Shared q/k/v/out projections and head split/merge of the two modules."""

    def __init__(self, query_dim: int, context_dim: int, num_heads: int, head_dim: Optional[int],
                 dropout: float, bias: bool):
        super().__init__()
        for name, val in (("query_dim", query_dim), ("context_dim", context_dim), ("num_heads", num_heads)):
            if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
                raise ValueError(f"{name} must be a positive integer; got {val!r}")
        if head_dim is None:
            if query_dim % num_heads:
                raise ValueError(
                    f"query_dim ({query_dim}) must be divisible by num_heads ({num_heads}), or pass head_dim"
                )
            head_dim = query_dim // num_heads
        elif isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0:
            raise ValueError(f"head_dim must be a positive integer or None; got {head_dim!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {dropout!r}")
        self.query_dim, self.context_dim = query_dim, context_dim
        self.num_heads, self.head_dim = num_heads, head_dim
        inner = num_heads * head_dim
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim, inner, bias=bias)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # [B, N, H*D] -> [B, N, H, D] (BNHD view)
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim)

    #: Quality budget for this module's calls: None = the default (``exact``, or ``GENESIS_QUALITY``).
    quality: Optional[str] = None

    def _set_quality(self, quality: Optional[str]) -> None:
        self.quality = None if quality is None else _quality.normalise(quality)

    def _attend(self, query, key, value, mask, backend) -> torch.Tensor:
        w = self.to_q.weight
        _check_tokens("query", query, self.query_dim, "query_dim", w)
        _check_tokens("key", key, self.context_dim, "context_dim", w)
        _check_tokens("value", value, self.context_dim, "context_dim", w)
        if key.shape[:2] != value.shape[:2]:
            raise ValueError(f"key and value must share [B, M]; got key {tuple(key.shape)}, value {tuple(value.shape)}")
        if query.shape[0] != key.shape[0]:
            raise ValueError(f"query batch {query.shape[0]} differs from key batch {key.shape[0]}")
        b, n, m = query.shape[0], query.shape[1], key.shape[1]
        q = self._heads(self.to_q(query))
        k = self._heads(self.to_k(key))
        v = self._heads(self.to_v(value))
        out = attention(q, k, v, _key_mask(mask, b, n, m), backend=backend, layout="BNHD", quality=self.quality)
        return self.to_out(out.reshape(b, n, self.num_heads * self.head_dim))

    def _weights(self, query, key, mask, max_bytes: int) -> torch.Tensor:
        w = self.to_q.weight
        _check_tokens("query", query, self.query_dim, "query_dim", w)
        _check_tokens("key", key, self.context_dim, "context_dim", w)
        b, n, m = query.shape[0], query.shape[1], key.shape[1]
        need = b * self.num_heads * n * m * 4
        if need > max_bytes:
            raise MemoryError(
                f"attention weights [B={b}, H={self.num_heads}, N={n}, M={m}] need {need / 2**20:.0f} MiB of float32, "
                f"over the {max_bytes / 2**20:.0f} MiB limit; pass a smaller input or raise max_bytes"
            )
        q = self._heads(self.to_q(query)).transpose(1, 2).float()
        k = self._heads(self.to_k(key)).transpose(1, 2).float()
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.head_dim**-0.5
        km = _key_mask(mask, b, n, m)
        if km is not None:
            scores = scores.masked_fill(~km, float("-inf")) if km.dtype == torch.bool else scores + km.float()
        return torch.softmax(scores, dim=-1)


class CrossAttentionModule(_Projected, CrossAttentionInterface):
    """Multi-head cross-attention (image tokens attending to text tokens, Stable Diffusion style).

    ``CrossAttentionModule(query_dim, context_dim, num_heads, head_dim=None, dropout=0.0, bias=False,
    backend="auto", quality=None)``. ``forward(query [B, N, query_dim], key [B, M, context_dim], value=key,
    mask=None) -> [B, N, query_dim]``. ``mask``: [B, M] key padding (True = attend), [B, N, M] or
    [B, H, N, M], boolean or additive. ``dropout`` applies to the output projection. ``quality``: the budget
    of its attention calls (``exact``, ``high``, ``fast``; None = the process default).
    """

    def __init__(self, query_dim: int, context_dim: int, num_heads: int, head_dim: Optional[int] = None,
                 dropout: float = 0.0, bias: bool = False, backend: Union[AttentionType, str] = AttentionType.AUTO,
                 quality: Optional[str] = None):
        super().__init__(query_dim, context_dim, num_heads, head_dim, dropout, bias)
        self.backend = backend_name(backend)
        self._set_quality(quality)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self._attend(query, key, key if value is None else value, mask, self.backend)

    def compute_attention_weights(self, query: torch.Tensor, key: torch.Tensor, mask: Optional[torch.Tensor] = None,
                                  max_bytes: int = MAX_WEIGHTS_BYTES) -> torch.Tensor:
        """Head-wise attention probabilities [B, H, N, M] in float32 (rows sum to 1).

        Materialises the score matrix, so it refuses sizes over ``max_bytes`` with the size in the message.
        """
        return self._weights(query, key, mask, max_bytes)


class AdaptiveAttentionSwitch(_Projected):
    """Multi-head attention whose implementation can be switched at run time.

    ``AdaptiveAttentionSwitch(embed_dim, num_heads, default_type=AttentionType.AUTO, context_dim=None,
    head_dim=None, dropout=0.0, bias=False, strict=False, quality=None)``. ``forward(x [B, N, E], context=None,
    mask=None)`` is self-attention, or cross-attention to ``context`` [B, M, context_dim]. ``quality`` (also
    :meth:`set_quality`): the budget of its attention calls (``exact``, ``high``, ``fast``; None = default).
    Setting an unavailable type warns and calls resolve through the chain (type → sdpa → pytorch);
    with ``strict=True`` it raises instead.
    """

    def __init__(self, embed_dim: int, num_heads: int, default_type: Union[AttentionType, str] = AttentionType.AUTO,
                 context_dim: Optional[int] = None, head_dim: Optional[int] = None, dropout: float = 0.0,
                 bias: bool = False, strict: bool = False, quality: Optional[str] = None):
        super().__init__(embed_dim, embed_dim if context_dim is None else context_dim, num_heads, head_dim, dropout, bias)
        self.embed_dim = embed_dim
        self.strict = strict
        self.attention_type = AttentionType.AUTO
        self.set_attention_type(default_type)
        self._set_quality(quality)

    def set_quality(self, quality: Optional[str]) -> None:
        """Set the quality budget of this switch's attention calls (None: the process default)."""
        self._set_quality(quality)

    @staticmethod
    def get_available_attentions() -> List[AttentionType]:
        """The attention types whose backend can run in this process (AUTO always)."""
        out = [t for t in AttentionType if t is not AttentionType.AUTO and registry.get(t.value).available() is None]
        return out + [AttentionType.AUTO]

    def set_attention_type(self, attention_type: Union[AttentionType, str]) -> None:
        name = backend_name(attention_type)
        if name not in AttentionType._value2member_map_:
            raise ValueError(
                f"attention_type must be one of {[t.value for t in AttentionType]}; got {attention_type!r}"
            )
        t = AttentionType(name)
        if t is not AttentionType.AUTO:
            reason = registry.get(name).available()
            if reason is not None:
                if self.strict:
                    raise RuntimeError(f"attention type '{name}' is not available: {reason}")
                msg = f"attention type '{name}' is not available ({reason}); calls will fall back {name} -> sdpa -> pytorch"
                warnings.warn(f"[Genesis] {msg}", RuntimeWarning, stacklevel=2)
        self.attention_type = t

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        ctx = x if context is None else context
        if context is None and self.context_dim != self.query_dim:
            raise ValueError(
                f"self-attention needs context_dim == embed_dim; this switch has context_dim={self.context_dim}, "
                f"embed_dim={self.embed_dim}: pass context"
            )
        return self._attend(x, ctx, ctx, mask, self.attention_type.value)

    def forward_with_type(self, attention_type: Union[AttentionType, str], query: torch.Tensor, key: torch.Tensor,
                          value: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run one call with ``attention_type`` without changing the switch's setting.

        3-D token tensors ([B, N, E], [B, M, C], [B, M, C]) go through this module's projections;
        4-D per-head tensors ([B, H, N, D], BHND) go straight to the attention kernel. In both, ``mask``
        is [B, M] key padding, [B, N, M] or [B, H, N, M], as in :meth:`forward`.
        """
        name = backend_name(attention_type)
        if isinstance(query, torch.Tensor) and query.dim() == 4:
            if isinstance(key, torch.Tensor) and key.dim() == 4:  # masks mean what they mean in forward()
                mask = _key_mask(mask, query.shape[0], query.shape[2], key.shape[2])
            return attention(query, key, value, mask, backend=name, quality=self.quality)
        return self._attend(query, key, value, mask, name)

    @property
    def last_backend(self) -> Optional[str]:
        """The backend that served this thread's last attention call."""
        return last_backend()


_KINDS = {
    "cross": CrossAttentionModule,
    "adaptive": AdaptiveAttentionSwitch,
}


def create_attention_interface(kind: str, **kwargs) -> nn.Module:
    """Build an attention module by kind.

    ``'cross'``: CrossAttentionModule; takes ``embed_dim`` (or ``query_dim``), ``context_dim``, ``num_heads``...
    ``'adaptive'``: AdaptiveAttentionSwitch; takes ``embed_dim``, ``num_heads``, ``default_type``...
    """
    if not isinstance(kind, str) or kind.strip().lower() not in _KINDS:
        raise ValueError(f"unknown attention interface kind {kind!r}; valid kinds: {', '.join(_KINDS)}")
    kind = kind.strip().lower()
    if kind == "cross":
        if "embed_dim" in kwargs:
            if "query_dim" in kwargs:
                raise TypeError("pass embed_dim or query_dim for 'cross', not both")
            kwargs["query_dim"] = kwargs.pop("embed_dim")
        kwargs.setdefault("context_dim", kwargs.get("query_dim"))
    return _KINDS[kind](**kwargs)
