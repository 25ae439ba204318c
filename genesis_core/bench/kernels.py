"""Which device kernels a call launches (torch.profiler), and whether two calls launch the same ones."""
from __future__ import annotations

from typing import Callable, List, Optional

import torch

from .._device import synchronize
from .._log import first_line

KERNEL_NAME_CHARS = 160  # kernel names (C++ templates run long) are stored cut to this
_PROFILER_ACTIVITY = {"cuda": "CUDA", "xpu": "XPU"}  # device type -> ProfilerActivity / DeviceType name


def device_kernels(fn: Callable[[], object], device: torch.device) -> Optional[List[str]]:
    """Sorted names of the device kernels (and memsets/copies) one call of ``fn`` launches, as
    torch.profiler records them: ProfilerActivity.CUDA on CUDA (and ROCm), XPU on Intel GPUs. None on
    devices whose kernels the profiler does not record (CPU, MPS): there is nothing to compare there.
    Profiler errors propagate; :func:`_compare_kernels` turns them into a reason."""
    kind = _PROFILER_ACTIVITY.get(device.type)
    activity = getattr(torch.profiler.ProfilerActivity, kind, None) if kind else None
    if activity is None:
        return None
    with torch.no_grad(), torch.profiler.profile(activities=[activity]) as prof:
        fn()
        synchronize(device)
    return sorted({e.name for e in prof.events() if getattr(e.device_type, "name", None) == kind})


def _compare_kernels(chosen_fn: Callable[[], object], fastest_fn: Callable[[], object], device: torch.device) -> dict:
    """``chosen_kernels``, ``fastest_kernels`` (sorted, names cut to KERNEL_NAME_CHARS) and ``same_kernel``:
    True only when both sets are non-empty and equal (compared on the full names), False when they
    differ, None where there are no device kernels to compare (CPU) or the probe failed; a failure, or
    a device where the profiler saw no kernel, leaves its reason in ``kernel_probe_error``. Never raises."""
    out: dict = {"chosen_kernels": None, "fastest_kernels": None, "same_kernel": None}
    try:
        chosen, fastest = device_kernels(chosen_fn, device), device_kernels(fastest_fn, device)
    except Exception as exc:
        out["kernel_probe_error"] = first_line(exc)
        return out
    if chosen is None or fastest is None:
        return out
    out["chosen_kernels"] = sorted({n[:KERNEL_NAME_CHARS] for n in chosen})
    out["fastest_kernels"] = sorted({n[:KERNEL_NAME_CHARS] for n in fastest})
    if chosen and fastest:
        out["same_kernel"] = chosen == fastest
    else:
        out["kernel_probe_error"] = f"torch.profiler recorded no {device.type} kernel for " + \
            " or ".join(w for w, k in (("the chosen backend", chosen), ("the fastest backend", fastest)) if not k)
    return out


def same_as_baseline(baseline_fn: Callable[[], object], genesis_fn: Callable[[], object], device: torch.device,
                     baseline_backend: Optional[str], served: Optional[str]) -> tuple:
    """(same, why): whether a Genesis run served the very kernel its baseline runs. Where torch.profiler
    records device kernels, the kernel sets of one call of each decide; elsewhere (CPU) the backend names do:
    the baseline's (``"sdpa"`` for ``F.scaled_dot_product_attention``) against the one Genesis served.
    None where neither can be known."""
    kernels = _compare_kernels(genesis_fn, baseline_fn, device)
    if kernels["same_kernel"] is True:
        return True, "same device kernels"
    if kernels["same_kernel"] is False:
        return False, "different device kernels"
    if baseline_backend and served:
        if served == baseline_backend:
            return True, f"same backend ({served})"
        return False, f"different backend ({served}, baseline {baseline_backend})"
    return None, kernels.get("kernel_probe_error") or "the baseline's kernel is not known"
