"""``flash`` backend: the best FlashAttention installed here that really runs.

Members, in order of preference: ``fa4`` (FlashAttention-4), ``fa3`` (FlashAttention-3), ``fa2``
(FlashAttention-2), then PyTorch's built-in FlashAttention-2 kernel (``sdpa_flash``); on Hopper (compute
capability 9.x) ``fa3`` before ``fa4`` (:data:`HOPPER_MEMBERS`, measured). Each is its own backend,
probed with a real call; ``flash`` holds no kernel code: every call goes to the first member that runs here and
whose limits take the call (a call that needs a backward skips the forward-only fa4; a float16 call skips a
bfloat16-only FA3 build), through that member's own ``run`` (or its direct path). ``description()`` says which
member serves, ``version()`` its version. CUDA only; no FlashAttention takes an arbitrary mask, so masked
calls fall back along the chain.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional

import torch

from ..registry import Backend, get, register
from ..types import AttentionCall
from . import _flash_pkg as pkg
from .sdpa import FLASH_CUDA_LIMITS

MEMBERS = ("fa4", "fa3", "fa2", "sdpa_flash")
# On an H200 (2026-12-02, bench rows, bf16, BNHD views) FA3 took 0.539 ms on Flux attention (1x24x4608x128) against
# FA4's 0.690 ms (FA4's Python interface costs host time on every call), and the two were within 2% on Wan
# (32.4 / 31.9 ms at 480p, 175.8 / 176.7 ms at 720p). FA3 is built for Hopper only, so elsewhere FA4 leads.
HOPPER_MEMBERS = ("fa3", "fa4", "fa2", "sdpa_flash")
TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 2e-2, torch.float32: 1e-3}

_live: List[Backend] = []  # the members that passed their probes, in order


def members() -> List[Backend]:
    """The member backends that run here, in order of preference (probes them if needed)."""
    backend.available()
    return list(_live)


def member_order(capability: Optional[tuple]) -> tuple:
    """The members in order of preference on a device of this compute capability (None: not a CUDA device)."""
    return HOPPER_MEMBERS if capability is not None and capability[0] == 9 else MEMBERS


def _capability(device: str) -> Optional[tuple]:
    return tuple(torch.cuda.get_device_capability()) if device == "cuda" else None


def _probe() -> Optional[str]:
    device = pkg.probe_device()
    if device is None:
        return "no CUDA device: FlashAttention runs on CUDA only (on CPU, sdpa serves)"
    reasons, live = [], []
    for name in member_order(_capability(device)):
        try:
            b = get(name)
        except KeyError:
            continue
        why = b.available()
        if why is None:
            live.append(b)
        else:
            reasons.append(f"{name}: {why}")
    _live[:] = live
    if not live:
        return "no FlashAttention runs here (" + "; ".join(reasons) + ")"
    return None


def member_for(call: AttentionCall) -> Optional[Backend]:
    """The first member that runs here and takes ``call``, or None."""
    for b in _live:
        if b.refusal(call) is None:
            return b
    return None


def _unsupported(call: AttentionCall) -> Optional[str]:
    backend.available()
    if not _live or member_for(call) is not None:
        return None  # nothing runs (available() says why) or a member takes the call
    return "no FlashAttention here takes this call (" + "; ".join(f"{b.name}: {b.refusal(call)}" for b in _live) + ")"


def run(call: AttentionCall) -> torch.Tensor:
    b = member_for(call)
    if b is None:
        raise RuntimeError(f"flash: {_unsupported(call) or backend.available()}")
    return b.run(call)


def _direct(call: AttentionCall) -> Optional[Callable[..., torch.Tensor]]:
    b = member_for(call)
    return b.direct(call) if b is not None and b.direct is not None else None


def _description() -> str:
    live = members()
    if not live:
        return "FlashAttention (fa4, fa3, fa2 or PyTorch's built-in FA2): none runs here"
    rest = f"; where it cannot, {', '.join(b.name for b in live[1:])}" if len(live) > 1 else ""
    return f"{live[0].name}: {live[0].description()}{rest}"


def _version() -> Optional[str]:
    live = members()
    return live[0].version() if live else None


backend = register(
    Backend(
        name="flash",
        probe=_probe,
        limits=dataclasses.replace(FLASH_CUDA_LIMITS, devices=("cuda",)),
        unsupported=_unsupported,
        run=run,
        description=_description,
        version=_version,
        tolerance=dict(TOLERANCE),
        direct=_direct,
    ),
    rank=10,
)
