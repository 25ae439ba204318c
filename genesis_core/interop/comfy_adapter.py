"""GenesisAttentionOverride: ComfyUI's ``optimized_attention_override`` routed through Genesis, with a quality
level per sampling step and a prepared path for call signatures seen before; and the attn1/attn2 replace patch
for ComfyUI builds without the override hook. ComfyUI's calling convention itself (:func:`comfy_attention`,
re-exported here) is in :mod:`.comfy_call`. No ComfyUI import.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from .._log import log_once, logger
from ..attn import quality as _quality
from ..attn.types import AttentionType
from .comfy_call import _HALF, _engine, bind_arguments, call_signature, comfy_attention
from .comfy_prepared import _MAX_PREPARED, Prepared, _compiling, call_key, direct_fn, engine_fn
from .comfy_steps import describe_steps, step_index, step_level

__all__ = ["GenesisAttentionOverride", "call_signature", "comfy_attention", "make_replace_patch"]


class GenesisAttentionOverride:
    """A ComfyUI ``optimized_attention_override`` that routes attention through Genesis.

    ComfyUI calls it as ``override(original_fn, *args, **kwargs)`` with its attention function's arguments.
    Genesis serves the call with ``backend``; if Genesis cannot (an input outside what Genesis accepts),
    the original ComfyUI function runs with the original arguments and the reason is logged once.

    ``quality`` is the budget of the calls (``exact``, ``high``, ``fast``; None: the engine's default,
    ``GENESIS_QUALITY``). An explicitly chosen lossy backend (``sage``) runs at least at the level it needs,
    whatever ``quality`` says. ``exact_steps``: the first and last ``exact_steps`` sampling steps run at
    ``exact``; that needs :func:`make_step_wrapper` installed on the model (it calls
    :meth:`begin_model_call` once per model call). :attr:`level` is the level calls run at right now.

    It counts calls and remembers which Genesis backend served each distinct call signature at which level;
    :meth:`end_run` logs that table once and starts a new run. ``copy.deepcopy`` returns the same object
    (ComfyUI deep-copies ``model_options`` when a model is cloned; the counters stay shared).
    """

    def __init__(self, backend: Any = "auto", quality: Optional[str] = None, exact_steps: int = 0) -> None:
        self.backend = backend.value if hasattr(backend, "value") else str(backend)
        if quality is not None:
            quality = _quality.normalise(quality)
        if isinstance(exact_steps, bool) or not isinstance(exact_steps, int) or exact_steps < 0:
            raise ValueError(f"exact_steps must be a non-negative int; got {exact_steps!r}")
        self.quality = quality
        self.exact_steps = exact_steps
        #: The level of the steps that are not held at exact (see the class docstring).
        self.middle_level = self._middle(quality)
        #: The level attention calls run at now (set per model call by :meth:`begin_model_call`).
        self.level: Optional[str] = self.middle_level
        self.calls = 0
        self.fallback_calls = 0
        self._lock = threading.Lock()
        self._run: "OrderedDict[str, Dict[str, int]]" = OrderedDict()
        self._prepared: Dict[tuple, Prepared] = {}
        self._engine_only: set = set()  # signatures whose kernel failed when called directly
        self._engine_call = AttentionType.AUTO if self.backend == "auto" else self.backend
        self._auto = self.backend == "auto"
        self._dispatch = _engine()
        # begin_model_call's memory: the schedule on the host and the last sigma tensor seen (kept alive,
        # so identity means "the same model call's sigma": cond and uncond share it).
        self._schedule_src: Any = None
        self._schedule: List[float] = []
        self._sigma_src: Any = None
        self._sigma_level: Optional[str] = self.middle_level
        #: (step index, steps, level) of each sampling step seen in the current run, in order.
        self.step_levels: List[Tuple[int, int, Optional[str]]] = []
        #: The table and the step levels of the last finished run (see :meth:`end_run`).
        self.last_run: List[Tuple[str, Dict[str, int]]] = []
        self.last_step_levels: List[Tuple[int, int, Optional[str]]] = []

    def _middle(self, quality: Optional[str]) -> Optional[str]:
        if self.backend == "auto":
            return quality
        from ..attn import registry  # a leaf; only to read the explicit backend's precision class

        try:
            needs = _quality.loosest_for(registry.get(self.backend).precision)
        except KeyError:
            return quality  # an unknown name: the engine says so at the first call
        level = quality if quality is not None else needs
        return level if _quality.LEVELS.index(level) >= _quality.LEVELS.index(needs) else needs

    def __deepcopy__(self, memo: dict) -> "GenesisAttentionOverride":
        return self

    def __repr__(self) -> str:
        return (f"GenesisAttentionOverride(backend={self.backend!r}, quality={self.quality!r}, "
                f"exact_steps={self.exact_steps}, calls={self.calls})")

    # ------------------------------------------------------------ per model call

    def begin_model_call(self, transformer_options: Optional[dict], sigma: Any = None) -> Optional[str]:
        """Set :attr:`level` for the model call about to run and return it.

        ``transformer_options`` is the dict ComfyUI hands the model: its ``sample_sigmas`` (the sampler's
        schedule) and ``sigmas`` (this call's sigma; ``sigma`` is used when it is missing) locate the step.
        Without a schedule the call runs at the middle level. Reads one number from the device per new
        sigma tensor (once per sampler step: cond and uncond share it), none when no step is held exact.
        """
        middle = self.middle_level
        if self.exact_steps <= 0 or middle == "exact" or not transformer_options:
            self.level = middle
            return middle
        schedule = transformer_options.get("sample_sigmas")
        current = transformer_options.get("sigmas", sigma)
        if schedule is None or current is None:
            self.level = middle
            return middle
        if current is self._sigma_src and schedule is self._schedule_src:
            self.level = self._sigma_level
            return self.level
        if schedule is not self._schedule_src:
            self._schedule = [float(x) for x in (schedule.tolist() if hasattr(schedule, "tolist") else schedule)]
            self._schedule_src = schedule
        value = float(current.max()) if isinstance(current, torch.Tensor) else float(current)
        steps = len(self._schedule) - 1
        index = step_index(self._schedule, value)
        level = step_level(index, steps, self.exact_steps, middle)
        self._sigma_src, self._sigma_level = current, level
        self.level = level
        if len(self.step_levels) < 10_000:
            self.step_levels.append((index, steps, level))
        return level

    # ------------------------------------------------------------ the call

    def __call__(self, func: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        # An unset level is the engine's default, resolved here so a changed default is a new signature; so is
        # what ``auto`` resolves to in this thread (a ``use_backend`` block, or the process default).
        key = call_key(args, kwargs, self.level or _quality.default(),
                       self._dispatch.auto_backend() if self._auto else None)
        if key is not None:
            try:
                prepared = self._prepared.get(key)
            except TypeError:  # an unhashable argument (heads, attn_precision): the full path says
                prepared = key = None
            if prepared is not None and not _compiling():
                try:
                    out = prepared.fn(args[0], args[1], args[2])
                except Exception as exc:
                    self._failed(key, prepared, exc)  # re-raises what the full path would not handle
                else:
                    counts = prepared.counts
                    served = prepared.served or self._dispatch.last_backend()
                    counts[served] = counts.get(served, 0) + 1
                    self.calls += 1
                    return out
        return self._full_call(func, args, kwargs, key)

    def _failed(self, key: tuple, prepared: Prepared, exc: Exception) -> None:
        """A prepared function raised. A kernel called directly: from now on this signature goes through the
        engine (which logs the failure and falls back), unless it ran out of memory (that can pass); the
        call itself takes the full path. Through the engine: what the full path would hand to ComfyUI's
        function goes there, anything else is raised."""
        if prepared.served is None:
            if not isinstance(exc, (ValueError, TypeError, NotImplementedError)):
                raise exc
            return
        if not isinstance(exc, torch.cuda.OutOfMemoryError):
            with self._lock:
                self._prepared.pop(key, None)
                self._engine_only.add(key)

    def _full_call(self, func: Callable[..., torch.Tensor], args: Tuple[Any, ...], kwargs: Dict[str, Any],
                   key: Optional[tuple]):
        bound, rest = bind_arguments(args, kwargs)
        q, k = bound["q"], bound["k"]
        level = self.level
        sig = call_signature(q, k, bound["heads"], bound.get("mask"), bool(bound.get("skip_reshape", False)))
        label = sig if level is None else f"{sig} quality={level}"
        try:
            out = comfy_attention(**bound, backend=self.backend, quality=level)
            served = _engine().last_backend()
        except (ValueError, TypeError, NotImplementedError) as exc:
            log_once(
                ("comfy-override-fallback", sig, type(exc).__name__),
                f"attention call {sig} runs on ComfyUI's own {getattr(func, '__name__', 'function')} "
                f"because Genesis could not serve it: {exc}",
            )
            out = func(*args, **kwargs)
            served = f"comfy:{getattr(func, '__name__', 'original')}"
            with self._lock:
                self.fallback_calls += 1
        else:
            if key is not None and served is not None:
                self._prepare(key, bound, level, label, served)
        with self._lock:
            self.calls += 1
            per = self._run.setdefault(label, {})
            per[served] = per.get(served, 0) + 1
        return out

    def _prepare(self, key: tuple, bound: Dict[str, Any], level: Optional[str], label: str, served: str) -> None:
        """Remember a prepared function for this (successfully served) call signature: the served backend's
        plain kernel between ComfyUI's own views where the engine has one for such calls, else the engine."""
        q, k, v, heads = bound["q"], bound["k"], bound["v"], bound["heads"]
        if _compiling() or (bound.get("attn_precision") == torch.float32 and q.dtype in _HALF
                            and self.backend == "pytorch"):
            return  # while tracing, and the upcast path (rare): the full path every time
        sr, sor = bool(bound.get("skip_reshape", False)), bool(bound.get("skip_output_reshape", False))
        fn = None if key in self._engine_only else direct_fn(q, k, v, heads, sr, sor, served)
        prepared = (Prepared(fn, self._run.setdefault(label, {}), served) if fn is not None else
                    Prepared(engine_fn(q, k, v, heads, sr, sor, self._engine_call, level),
                              self._run.setdefault(label, {}), None))
        with self._lock:
            if len(self._prepared) >= _MAX_PREPARED:
                self._prepared.clear()
                self._engine_only.clear()
            try:
                self._prepared[key] = prepared
            except TypeError:
                pass

    # ------------------------------------------------------------ runs

    def run_table(self) -> List[Tuple[str, Dict[str, int]]]:
        """(signature [+ quality], {backend: calls}) for the calls of the current run, in first-seen order."""
        with self._lock:
            return [(s, dict(c)) for s, c in self._run.items() if c]

    def end_run(self, label: str = "sampling") -> List[Tuple[str, Dict[str, int]]]:
        """Log which backend served each distinct call signature in this run (once), then reset the run."""
        with self._lock:
            table = [(s, dict(c)) for s, c in self._run.items() if c]
            for counts in self._run.values():
                counts.clear()  # in place: prepared functions count into these dicts
            self.last_run = table
            steps = self.last_step_levels = self.step_levels
            self.step_levels = []
            self._sigma_src = self._schedule_src = None
            self.level = self.middle_level
        if table:
            what = f"attention={self.backend}"
            if self.quality is not None or self.exact_steps:
                what += f", quality={self.middle_level or _quality.default()}, exact_steps={self.exact_steps}"
            lines = [f"{label}: {what}, {len(table)} call signature(s):"]
            for sig, served in table:
                by = ", ".join(f"{name} x{n}" for name, n in served.items())
                lines.append(f"  {sig} -> {by}")
            if steps and self.exact_steps:
                held = sorted({i for i, _, lv in steps if lv == "exact"})
                lines.append(f"  steps at exact: {describe_steps(held) or 'none'} of {steps[-1][1]}")
            logger.info("\n".join(lines))
        return table


def make_replace_patch(override: GenesisAttentionOverride) -> Callable[..., torch.Tensor]:
    """An ``attn1``/``attn2`` replace patch for ComfyUI builds without ``optimized_attention_override``.

    ComfyUI calls it as ``patch(q, k, v, extra_options)`` with projected ``[B, N, heads*D]`` tensors and
    ``extra_options["n_heads"]``; it returns ``[B, N, heads*D]``.
    """

    def _original(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False, **_):
        # No ComfyUI function is at hand inside a replace patch: Genesis' plain-math backend stands in.
        return comfy_attention(q, k, v, heads, mask, attn_precision, skip_reshape, skip_output_reshape, backend="pytorch")

    def patch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: Dict[str, Any]) -> torch.Tensor:
        return override(_original, q, k, v, int(extra_options["n_heads"]), attn_precision=extra_options.get("attn_precision"))

    patch.genesis_override = override  # type: ignore[attr-defined]
    return patch
