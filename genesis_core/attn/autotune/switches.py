"""The autotuner's switches: where measuring is on (``GENESIS_AUTOTUNE``) and its time budget per signature.

``GENESIS_AUTOTUNE=0`` (or ``off``) never measures and ignores stored choices (the default order applies);
unset / ``1`` measures on accelerators (CUDA, ROCm, MPS, XPU) but not on CPU, where choices stored ahead with
``tune`` are still used; ``all`` measures on CPU too. CPU is off by default because there the candidates are
few (PyTorch's SDPA sub-kernels and the chunked math path), SDPA's own choice was already the fastest on the
CPUs measured, and measuring costs several full calls per new signature — seconds on a 2-core CI runner.
``GENESIS_AUTOTUNE_BUDGET_MS``: wall-clock budget per new signature (default 4000 ms on accelerators,
1500 ms on CPU).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .. import registry

ENV_SWITCH = "GENESIS_AUTOTUNE"
ENV_BUDGET = "GENESIS_AUTOTUNE_BUDGET_MS"
MODES = ("off", "accelerators", "all")

_mode_override: Optional[str] = None


def mode() -> str:
    """``"off"``, ``"accelerators"`` (default) or ``"all"``: where measuring is on."""
    if _mode_override is not None:
        return _mode_override
    value = os.environ.get(ENV_SWITCH, "").strip().lower()
    if value in ("0", "off", "false", "no", "none"):
        return "off"
    if value in ("all", "cpu", "2"):
        return "all"
    return "accelerators"


def set_mode(value: Optional[str]) -> None:
    """Override the environment switch for this process: ``"off"``, ``"accelerators"``, ``"all"``, or None."""
    global _mode_override
    if value is not None and value not in MODES:
        raise ValueError(f"autotune mode must be 'off', 'accelerators', 'all' or None; got {value!r}")
    _mode_override = value
    registry.changed()  # plans made under the old mode are stale


def enabled_for(device: torch.device) -> bool:
    """Whether a new signature on ``device`` is measured (see :func:`mode`)."""
    m = mode()
    if m == "off" or device.type == "meta":
        return False
    return m == "all" or device.type != "cpu"


def budget_ms(device: torch.device) -> float:
    try:
        return float(os.environ[ENV_BUDGET])
    except (KeyError, ValueError):
        return 1500.0 if device.type == "cpu" else 4000.0
