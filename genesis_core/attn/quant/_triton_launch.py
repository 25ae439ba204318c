"""Launching Triton kernels with less host work: Triton's ``kernel[grid](...)`` the first time per key, then
the compiled kernel it returned, directly (``compiled[grid](*args)``).

Triton's launch path binds the arguments, specialises each one (pointer alignment, integers equal to 1 or
divisible by 16, 32 or 64 bits), builds a cache-key string and checks global values on every launch; for a
kernel with ~25 arguments that is tens of microseconds of host time. :class:`Launcher` keeps the compiled kernel
per key (device, dtype, pointer alignment, every integer argument, the constexprs: everything Triton
specialises on, so a kept kernel is the one Triton would pick) and passes the same argument list Triton's own
launch passes (every parameter in signature order, constexprs last). ``GENESIS_FP8_FAST_LAUNCH=0`` turns this
off; a compiled kernel that refuses a direct launch turns it off for the process (logged once). Under Triton's
interpreter ``kernel[grid]`` returns nothing to keep, so every launch takes Triton's path.
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

from ..._log import log_once

NUM_WARPS = 8
MAX_KEPT = 256  # compiled kernels kept per kernel (cleared past that)

_fast = os.environ.get("GENESIS_FP8_FAST_LAUNCH", "1") != "0"
_launchers: List["Launcher"] = []


def fast_launch(enabled: Optional[bool] = None) -> bool:
    """Whether compiled kernels are launched directly after the first launch (pass ``enabled`` to change it;
    that also forgets every kept kernel)."""
    global _fast
    if enabled is not None:
        _fast = bool(enabled)
        for launcher in _launchers:
            launcher.compiled.clear()
    return _fast


class Launcher:
    """One kernel: ``launcher(grid, args, constexprs, key)`` with ``args`` every runtime parameter in order,
    ``constexprs`` the constexpr values in the order of the kernel's signature (where they come last) and
    ``key`` what the integer arguments do not already say (device, dtypes, pointer alignment)."""

    def __init__(self, fn, names: Tuple[str, ...], num_warps: int = NUM_WARPS):
        self.fn, self.names, self.num_warps, self.compiled = fn, names, num_warps, {}
        arg_names = getattr(fn, "arg_names", None)
        if arg_names is not None:  # the direct launch passes the constexprs positionally, after the rest
            assert tuple(arg_names[len(arg_names) - len(names):]) == names, (arg_names, names)
        _launchers.append(self)

    def __call__(self, grid, args: tuple, constexprs: tuple, key_extra: tuple) -> None:
        key = None
        if _fast:
            key = key_extra + constexprs + tuple(a for a in args if isinstance(a, int))
            kern = self.compiled.get(key)
            if kern is not None:
                try:
                    kern[grid](*args, *constexprs)
                    return
                except Exception as exc:  # noqa: BLE001  (any refusal: fall back to Triton's own launch)
                    fast_launch(False)
                    log_once(("triton-direct-launch", type(exc).__name__),
                             f"direct launch of a compiled Triton kernel failed ({type(exc).__name__}: {exc}); "
                             "using Triton's launch path from now on")
                    key = None
        kern = self.fn[grid](*args, **dict(zip(self.names, constexprs)), num_warps=self.num_warps)
        if key is not None and kern is not None and hasattr(kern, "__getitem__") and _fast:
            if len(self.compiled) >= MAX_KEPT:
                self.compiled.clear()
            self.compiled[key] = kern


__all__ = ["Launcher", "fast_launch"]
