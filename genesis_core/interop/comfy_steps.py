"""Which sampling step a ComfyUI model call belongs to, and the quality level that step runs at.

ComfyUI hands the model ``transformer_options["sample_sigmas"]`` (the sampler's schedule) and
``transformer_options["sigmas"]`` (this call's sigma). :func:`step_index` maps a sigma to its step,
:func:`step_level` holds the first and last ``exact_steps`` at ``exact``, and :func:`make_step_wrapper` is the
model wrapper (ComfyUI's ``apply_model`` wrapper signature) that tells an override, once per model call, which
step the sampler is at. No ComfyUI import.
"""
from __future__ import annotations

import bisect
from typing import Any, Callable, List, Optional, Sequence

from .._log import first_line, log_once

__all__ = ["describe_steps", "make_step_wrapper", "step_index", "step_level"]


def step_index(schedule: Sequence[float], sigma: float) -> int:
    """The sampling step a model call at ``sigma`` belongs to, for the sampler's ``schedule`` (its sigmas,
    ``steps + 1`` values, usually falling to 0): step ``i`` runs from ``schedule[i]`` down to ``schedule[i+1]``,
    so a call at ``schedule[i]`` (or between it and ``schedule[i+1]``) is step ``i``. Clamped to
    ``0 .. steps-1``; a schedule that does not fall is matched to its nearest value."""
    steps = len(schedule) - 1
    if steps < 1:
        return 0
    head = schedule[:steps]
    if all(a >= b for a, b in zip(schedule, schedule[1:])):
        # The last i with schedule[i] >= sigma (a relative slack absorbs float32 vs float64 rounding).
        target = -(sigma * (1.0 - 1e-5) - 1e-12)
        i = bisect.bisect_right([-x for x in head], target) - 1
    else:
        i = min(range(steps), key=lambda j: abs(head[j] - sigma))
    return min(max(i, 0), steps - 1)


def step_level(index: int, steps: int, exact_steps: int, level: Optional[str]) -> Optional[str]:
    """``"exact"`` for the first and last ``exact_steps`` of ``steps`` steps, else ``level``
    (so ``exact_steps >= steps / 2`` makes every step exact)."""
    if exact_steps > 0 and (index < exact_steps or index >= steps - exact_steps):
        return "exact"
    return level


def describe_steps(values: List[int]) -> str:
    """Step indices as ranges: ``[0, 1, 4, 5]`` -> ``"0-1, 4-5"``."""
    out, start, prev = [], None, None
    for x in values:
        if start is None:
            start = prev = x
        elif x == prev + 1:
            prev = x
        else:
            out.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = prev = x
    if start is not None:
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
    return ", ".join(out)


def make_step_wrapper(override: Any) -> Callable[..., Any]:
    """A model wrapper with ComfyUI's ``apply_model`` wrapper signature,
    ``wrapper(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)``: before the
    model runs it tells ``override`` which sampling step this is (:meth:`GenesisAttentionOverride.begin_model_call`),
    then calls ``executor`` (the next wrapper or the model); the previous level is restored afterwards."""

    def wrapper(executor, *args: Any, **kwargs: Any):
        to = args[5] if len(args) > 5 else kwargs.get("transformer_options")
        sigma = args[1] if len(args) > 1 else kwargs.get("t")
        previous = override.level
        try:
            override.begin_model_call(to, sigma)
        except Exception as exc:  # never let step bookkeeping break sampling: run at the middle level
            log_once(("step-level", first_line(exc)), f"could not tell the sampling step ({first_line(exc)}); "
                     f"attention runs at quality '{override.middle_level or 'default'}' for every step")
            override.level = override.middle_level
        try:
            return executor(*args, **kwargs)
        finally:
            override.level = previous

    wrapper.genesis_override = override  # type: ignore[attr-defined]
    return wrapper
