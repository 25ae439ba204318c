"""What a backend can serve, as data, and the one function that checks a call against it.

A backend declares a :class:`Limits` record (dtypes, devices, head dims, mask, compute capability, key-length
multiple, autograd, ...). :func:`check` compares a call with it and returns the first reason it cannot be
served, always worded the same way: ``"<what> <got> not supported: needs <expected>"``. Only what data cannot
say (PyTorch's own ``can_use_*`` refusals, a package's version quirks) stays in a backend's ``unsupported``.
Leaf module: imports torch and :mod:`.types` only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from .types import AttentionCall

HALF = (torch.float16, torch.bfloat16)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class Limits:
    """What a kernel accepts. ``None`` in a field means "no limit of that kind".

    dtypes: accepted q/k/v dtypes.            devices: accepted device types (``"cuda"``, ``"cpu"``, ...).
    head_dims: the exact head dims accepted.  max_head_dim / head_dim_multiple: ranges instead of a list.
    equal_v_head_dim: v's head dim must equal q/k's.
    mask: whether an arbitrary mask is accepted.
    min_capability / max_capability: CUDA compute capability (major, minor) bounds, inclusive.
    kv_len_multiple: the key length must be a multiple of this.
    min_kv_len: the key length must be at least this.
    autograd: whether the kernel has a backward pass (False: refused when inputs require grad).
    gqa: whether fewer key/value heads than query heads are accepted.
    """

    dtypes: Optional[Tuple[torch.dtype, ...]] = None
    devices: Optional[Tuple[str, ...]] = None
    head_dims: Optional[Tuple[int, ...]] = None
    max_head_dim: Optional[int] = None
    head_dim_multiple: Optional[int] = None
    equal_v_head_dim: bool = False
    mask: bool = True
    min_capability: Optional[Tuple[int, int]] = None
    max_capability: Optional[Tuple[int, int]] = None
    kv_len_multiple: Optional[int] = None
    min_kv_len: Optional[int] = None
    autograd: bool = True
    gqa: bool = True

    def describe(self) -> Dict[str, object]:
        """The limits as plain values (for ``info`` and the ComfyUI route)."""
        out: Dict[str, object] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if name == "dtypes" and value is not None:
                value = [dtype_name(d) for d in value]
            out[name] = list(value) if isinstance(value, tuple) else value
        return out


ANY = Limits()

_capabilities: Dict[int, Tuple[int, int]] = {}


def capability(device: torch.device) -> Tuple[int, int]:
    """CUDA compute capability of ``device`` (cached per index)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    cap = _capabilities.get(idx)
    if cap is None:
        cap = _capabilities[idx] = tuple(torch.cuda.get_device_capability(idx))
    return cap


def _fmt_cap(cap: Tuple[int, int]) -> str:
    return f"{cap[0]}.{cap[1]}"


def needs_grad(call: AttentionCall) -> bool:
    return torch.is_grad_enabled() and (call.q.requires_grad or call.k.requires_grad or call.v.requires_grad)


def check(limits: Limits, call: AttentionCall) -> Optional[str]:
    """The first reason ``call`` is outside ``limits``, or None. One wording for every backend."""
    if limits.dtypes is not None and call.dtype not in limits.dtypes:
        want = ", ".join(dtype_name(d) for d in limits.dtypes)
        return f"dtype {dtype_name(call.dtype)} not supported: needs one of ({want})"
    d = call.head_dim
    if limits.head_dims is not None and d not in limits.head_dims:
        return f"head_dim {d} not supported: needs one of {tuple(limits.head_dims)}"
    if limits.max_head_dim is not None and d > limits.max_head_dim:
        return f"head_dim {d} not supported: needs <= {limits.max_head_dim}"
    if limits.head_dim_multiple is not None and d % limits.head_dim_multiple:
        return f"head_dim {d} not supported: needs a multiple of {limits.head_dim_multiple}"
    if limits.equal_v_head_dim and call.v_head_dim != d:
        return f"v head_dim {call.v_head_dim} not supported: needs v head_dim equal to q/k head_dim {d}"
    if not limits.mask and call.mask is not None:
        return f"mask ({call.mask_kind}) not supported: needs no mask"
    if not limits.gqa and call.gqa:
        return f"grouped-query attention ({call.heads} query / {call.kv_heads} kv heads) not supported: needs equal heads"
    if limits.kv_len_multiple is not None and call.kv_len % limits.kv_len_multiple:
        return f"key length {call.kv_len} not supported: needs a multiple of {limits.kv_len_multiple}"
    if limits.min_kv_len is not None and call.kv_len < limits.min_kv_len:
        return f"key length {call.kv_len} not supported: needs >= {limits.min_kv_len}"
    if not limits.autograd and needs_grad(call):
        return "inputs that require grad not supported: needs torch.no_grad() (this kernel has no backward pass)"
    if limits.devices is not None and call.device.type not in limits.devices:
        return f"device {call.device} not supported: needs {' or '.join(limits.devices)}"
    if call.device.type == "cuda" and (limits.min_capability or limits.max_capability):
        cap = capability(call.device)
        if limits.min_capability and cap < tuple(limits.min_capability):
            return f"compute capability {_fmt_cap(cap)} not supported: needs >= {_fmt_cap(limits.min_capability)}"
        if limits.max_capability and cap > tuple(limits.max_capability):
            return f"compute capability {_fmt_cap(cap)} not supported: needs <= {_fmt_cap(limits.max_capability)}"
    return None


def checker(limits: Limits, extra: Optional[Callable[[AttentionCall], Optional[str]]] = None
            ) -> Callable[[AttentionCall], Optional[str]]:
    """``call -> reason | None``: the limits first, then ``extra`` (what data cannot say)."""
    if extra is None:
        return lambda call: check(limits, call)

    def unsupported(call: AttentionCall) -> Optional[str]:
        return check(limits, call) or extra(call)

    return unsupported
