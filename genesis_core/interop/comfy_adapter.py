"""Adapter from ComfyUI's attention calling convention to Genesis :func:`attention`.

ComfyUI's attention functions (``comfy.ldm.modules.attention.attention_*``) share one signature::

    fn(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False, **kwargs)

* ``skip_reshape=False``: q, k, v are ``[B, N, heads * D]``; ``True``: ``[B, heads, N, D]``.
* ``skip_output_reshape=False``: the result is ``[B, Nq, heads * Dv]``; ``True``: ``[B, heads, Nq, Dv]``.
* ``mask``: additive float or boolean (True = attend), 2-D ``[Nq|1, Nk]``, 3-D ``[B|1, Nq|1, Nk]`` or
  4-D ``[B|1, H|1, Nq|1, Nk]``; 2-D and 3-D masks get their missing batch/head dims in front, as
  ``attention_pytorch`` does.
* ``attn_precision``: ``torch.float32`` asks for the score matrix in float32 for half inputs.
* ``kwargs``: ``transformer_options`` and ComfyUI's private ``_inside_attn_wrapper`` flag, plus whatever
  later ComfyUI versions add; they are accepted and handed back untouched when the original function runs.

ComfyUI calls a model's ``transformer_options["optimized_attention_override"]`` as
``override(original_fn, *args, **kwargs)``. :class:`GenesisAttentionOverride` is such an override. This
module never imports ComfyUI.

Quality per sampling step: an override has a quality level (``exact``, ``high``, ``fast``) and
``exact_steps``: the first and last ``exact_steps`` steps of a sampling run are served at ``exact``.
:func:`make_step_wrapper` is a model wrapper (ComfyUI's ``apply_model`` wrapper signature) that tells the
override, once per model call, which step the sampler is at (:meth:`GenesisAttentionOverride.begin_model_call`);
every attention call of that model call, cond and uncond alike, then runs at that step's level.

Cost per call: the first call with a given signature (shapes, strides, dtypes, devices, heads, flags, level)
is checked in full and planned; later calls with that signature go through a prepared function (views ->
the engine's planned kernel -> ComfyUI's layout) without checking anything again.
"""
from __future__ import annotations

import bisect
import threading
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .._log import first_line, log_once, logger
from ..attn import quality as _quality
from ..attn import registry as _registry
from ..attn.call import make_call
from ..attn.types import AttentionType, mask_4d_shape

__all__ = ["comfy_attention", "call_signature", "GenesisAttentionOverride", "make_replace_patch",
           "make_step_wrapper", "step_index", "step_level"]

_HALF = (torch.float16, torch.bfloat16)


_dispatch = None


def _engine():
    # Imported lazily so that importing the adapter (and so the ComfyUI pack) stays cheap.
    # (``genesis_core.attention`` the attribute may be the function re-exported at the top; the module
    # path is unambiguous.)
    global _dispatch
    if _dispatch is None:
        from ..attn import dispatch

        _dispatch = dispatch
    return _dispatch


def _normalise_mask(mask: Optional[torch.Tensor], q_dtype: torch.dtype) -> Optional[torch.Tensor]:
    """ComfyUI mask -> 4-D mask broadcastable to [B, H, Nq, Nk] (what attention_pytorch hands to SDPA)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor or None; got {type(mask).__name__}")
    if not 1 <= mask.ndim <= 4:
        raise ValueError(
            f"mask must be 2-D [Nq, Nk], 3-D [B, Nq, Nk] or 4-D [B, H, Nq, Nk]; got shape {tuple(mask.shape)}"
        )
    mask = mask.reshape(mask_4d_shape(mask.shape))  # what attention_pytorch does: missing dims in front
    if mask.dtype != torch.bool and mask.dtype != q_dtype:
        mask = mask.to(q_dtype)
    return mask


def comfy_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    mask: Optional[torch.Tensor] = None,
    attn_precision: Optional[torch.dtype] = None,
    skip_reshape: bool = False,
    skip_output_reshape: bool = False,
    *,
    backend: Any = "auto",
    quality: Optional[str] = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Genesis attention with ComfyUI's signature and output layout (see the module docstring).

    Args:
        q, k, v: ``[B, N, heads*D]`` (or ``[B, heads, N, D]`` with ``skip_reshape``).
        heads: number of query heads.
        mask: optional additive/boolean mask in one of ComfyUI's shapes.
        attn_precision: ``torch.float32`` computes half-precision inputs in float32 on the ``pytorch``
            (plain math) backend, as ComfyUI's ``attention_basic`` does; fused kernels accumulate in
            float32 anyway.
        backend: a Genesis backend name or ``AttentionType``; ``"auto"`` lets Genesis choose.
        quality: the call's quality budget (``exact``, ``high``, ``fast``; None: the engine's default).
        kwargs: accepted and ignored (``transformer_options`` and future ComfyUI additions).

    Returns:
        ``[B, Nq, heads*Dv]``, or ``[B, heads, Nq, Dv]`` with ``skip_output_reshape``, in q's dtype.

    Raises:
        ValueError: shapes that do not fit ComfyUI's convention (the message names the argument).
    """
    if not isinstance(heads, int) or heads < 1:
        raise ValueError(f"heads must be a positive int; got {heads!r}")
    if skip_reshape:
        if q.ndim != 4:
            raise ValueError(f"q must be 4-D [B, heads, N, D] when skip_reshape=True; got shape {tuple(q.shape)}")
        qq, kk, vv, layout = q, k, v, "BHND"
    else:
        if q.ndim != 3:
            raise ValueError(f"q must be 3-D [B, N, heads*D] when skip_reshape=False; got shape {tuple(q.shape)}")
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.ndim != 3 or t.shape[-1] % heads:
                raise ValueError(
                    f"{name} must be 3-D [B, N, heads*D] with its last dim divisible by heads={heads}; got shape {tuple(t.shape)}"
                )
        b = q.shape[0]
        # [B, N, H*D] -> [B, N, H, D] is a view: Genesis takes the BNHD layout directly, no copy.
        qq = q.view(b, q.shape[1], heads, -1) if q.is_contiguous() else q.reshape(b, q.shape[1], heads, -1)
        kk = k.reshape(k.shape[0], k.shape[1], heads, -1)
        vv = v.reshape(v.shape[0], v.shape[1], heads, -1)
        layout = "BNHD"

    out_dtype = q.dtype
    name = backend.value if hasattr(backend, "value") else str(backend)
    if attn_precision == torch.float32 and q.dtype in _HALF and name == "pytorch":
        qq, kk, vv = qq.float(), kk.float(), vv.float()
    m = _normalise_mask(mask, qq.dtype)

    out = _engine().attention(qq, kk, vv, m, backend=backend, layout=layout, quality=quality)
    if out.dtype != out_dtype:
        out = out.to(out_dtype)

    if layout == "BHND":  # out: [B, H, Nq, Dv]
        if skip_output_reshape:
            return out
        bsz, h, nq, dv = out.shape
        return out.transpose(1, 2).reshape(bsz, nq, h * dv)
    # layout BNHD, out: [B, Nq, H, Dv]
    if skip_output_reshape:
        return out.transpose(1, 2)
    bsz, nq, h, dv = out.shape
    return out.reshape(bsz, nq, h * dv)


def call_signature(q: torch.Tensor, k: torch.Tensor, heads: int, mask: Optional[torch.Tensor], skip_reshape: bool) -> str:
    """A short human-readable key for one ComfyUI attention call shape: what the per-run log groups by."""
    if skip_reshape:
        b, h, nq, d = q.shape
        nk = k.shape[2]
    else:
        b, nq, hd = q.shape
        h, d, nk = heads, hd // heads, k.shape[1]
    mk = "none" if mask is None else ("bool" if mask.dtype == torch.bool else "additive")
    dev = q.device.type
    dt = str(q.dtype).replace("torch.", "")
    return f"{dev} {dt} B={b} H={h} Nq={nq} Nk={nk} D={d} mask={mk}"


_PARAMS = ("q", "k", "v", "heads", "mask", "attn_precision", "skip_reshape", "skip_output_reshape")


def _bind(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Split a ComfyUI call into its named parameters and the remaining kwargs (left untouched)."""
    if len(args) > len(_PARAMS):
        raise TypeError(f"ComfyUI attention takes at most {len(_PARAMS)} positional arguments; got {len(args)}")
    bound = dict(zip(_PARAMS, args))
    rest = {}
    for key, value in kwargs.items():
        if key in _PARAMS:
            if key in bound:
                raise TypeError(f"ComfyUI attention got {key!r} both positionally and by name")
            bound[key] = value
        else:
            rest[key] = value
    missing = [p for p in _PARAMS[:4] if p not in bound]
    if missing:
        raise TypeError(f"ComfyUI attention call is missing {', '.join(missing)}")
    return bound, rest


# ---------------------------------------------------------------- sampling steps -> quality level


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


# ---------------------------------------------------------------- the override


class _Prepared:
    """What a call signature seen before runs: ``fn(q, k, v)``, the run-table row it counts into, and the
    backend it runs (None: ask the engine after each call)."""

    __slots__ = ("fn", "counts", "served")

    def __init__(self, fn: Callable[..., torch.Tensor], counts: Dict[str, int], served: Optional[str]):
        self.fn = fn
        self.counts = counts
        self.served = served


_MAX_PREPARED = 1024
_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None) or (lambda: False)
_grad_enabled = torch.is_grad_enabled
# Bumped whenever the registry says decisions made from it may be stale (a backend added, removed or
# re-probed, the autotuner cleared, re-tuned or switched): prepared functions are keyed by it.
_generation = [0]


def _registry_changed() -> None:
    _generation[0] += 1


_registry.on_change(_registry_changed)


def _call_key(args: Tuple[Any, ...], kwargs: Dict[str, Any], level: Optional[str], context: Any) -> Optional[tuple]:
    """What a prepared function is keyed by: the shapes and strides of q, k, v (what the views depend on),
    q's dtype, heads, attn_precision, the two reshape flags, the level, whether autograd is on, the registry
    generation and ``context`` (what ``auto`` resolves to); None for calls that always take the full path (a
    mask, positional arguments beyond ComfyUI's, something that is not a tensor). Devices and the other
    dtypes are left out: a call whose k or v differ from q there fails in the kernel, and the full path
    then checks it and says why."""
    n = len(args)
    if n < 3 or n > 8:
        return None
    get = kwargs.get
    if (args[4] if n > 4 else get("mask")) is not None:
        return None
    q, k, v = args[0], args[1], args[2]
    try:
        return (q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(), q.dtype,
                args[3] if n > 3 else get("heads"), args[5] if n > 5 else get("attn_precision"),
                args[6] if n > 6 else get("skip_reshape", False),
                args[7] if n > 7 else get("skip_output_reshape", False), level, _grad_enabled(), _generation[0],
                context)
    except (AttributeError, TypeError):
        return None


def _viewable(t: torch.Tensor, shape: tuple) -> bool:
    try:
        t.view(shape)
        return True
    except RuntimeError:
        return False


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
        self._prepared: Dict[tuple, _Prepared] = {}
        self._engine_only: set = set()  # signatures whose kernel failed when called directly
        self._engine_call = AttentionType.AUTO if self.backend == "auto" else self.backend
        self._auto = self.backend == "auto"
        _engine()
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
        key = _call_key(args, kwargs, self.level, _dispatch.get_default_backend() if self._auto else None)
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
                    served = prepared.served or _dispatch.last_backend()
                    counts[served] = counts.get(served, 0) + 1
                    self.calls += 1
                    return out
        return self._full_call(func, args, kwargs, key)

    def _failed(self, key: tuple, prepared: _Prepared, exc: Exception) -> None:
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
        bound, rest = _bind(args, kwargs)
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
        fn = None if key in self._engine_only else _direct_fn(q, k, v, heads, sr, sor, served)
        prepared = (_Prepared(fn, self._run.setdefault(label, {}), served) if fn is not None else
                    _Prepared(_engine_fn(q, k, v, heads, sr, sor, self._engine_call, level),
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
                lines.append(f"  steps at exact: {_ranges(held) or 'none'} of {steps[-1][1]}")
            logger.info("\n".join(lines))
        return table


def _ranges(values: List[int]) -> str:
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


def _engine_fn(q, k, v, heads: int, skip_reshape: bool, skip_output_reshape: bool, backend, level):
    """``fn(q, k, v)`` for calls shaped like these: views -> the engine (its plan for this signature is
    cached) -> ComfyUI's output layout. Shapes are fixed here; they are passed unpacked (``view(*shape)``
    parses faster than ``view(shape)``)."""
    eager = _engine().eager_attention
    if skip_reshape:
        b, h, nq, _ = q.shape
        out = (b, nq, h * v.shape[3])
        if skip_output_reshape:
            def fn(q, k, v):
                return eager(q, k, v, None, backend, "BHND", None, level)
        else:
            def fn(q, k, v):
                return eager(q, k, v, None, backend, "BHND", None, level).transpose(1, 2).reshape(*out)
        return fn
    qs = (q.shape[0], q.shape[1], heads, q.shape[2] // heads)
    ks = (k.shape[0], k.shape[1], heads, k.shape[2] // heads)
    vs = (v.shape[0], v.shape[1], heads, v.shape[2] // heads)
    out = (qs[0], qs[1], heads * vs[3])
    if not (_viewable(q, qs) and _viewable(k, ks) and _viewable(v, vs)):  # rare: inputs a view cannot split
        def fn(q, k, v):
            o = eager(q.reshape(*qs), k.reshape(*ks), v.reshape(*vs), None, backend, "BNHD", None, level)
            return o.transpose(1, 2) if skip_output_reshape else o.reshape(*out)
        return fn
    if skip_output_reshape:
        def fn(q, k, v):
            return eager(q.view(*qs), k.view(*ks), v.view(*vs), None, backend, "BNHD", None, level).transpose(1, 2)
    else:
        def fn(q, k, v):
            return eager(q.view(*qs), k.view(*ks), v.view(*vs), None, backend, "BNHD", None, level).reshape(*out)
    return fn


def _direct_fn(q, k, v, heads: int, skip_reshape: bool, skip_output_reshape: bool, served: str):
    """``fn(q, k, v)`` calling the served backend's plain kernel (``Backend.direct``: unmasked, default
    scale) between ComfyUI's own views, the way ``attention_pytorch`` calls SDPA: ``[B, N, H*D]`` ->
    view [B, N, H, D] -> transpose to [B, H, N, D] -> kernel -> transpose -> reshape. None when the
    backend has no such kernel for these inputs, or a view cannot split them."""
    try:
        backend = _registry.get(served)
    except KeyError:
        return None
    if backend.direct is None:
        return None
    if skip_reshape:
        call = make_call(q, k, v, None, None, "BHND", None)
    else:
        qs = (q.shape[0], q.shape[1], heads, q.shape[2] // heads)
        ks = (k.shape[0], k.shape[1], heads, k.shape[2] // heads)
        vs = (v.shape[0], v.shape[1], heads, v.shape[2] // heads)
        if not (_viewable(q, qs) and _viewable(k, ks) and _viewable(v, vs)):
            return None
        call = make_call(q.view(qs), k.view(ks), v.view(vs), None, None, "BNHD", None)
    kernel = backend.direct(call)
    if kernel is None:
        return None
    if skip_reshape:
        b, h, nq, _ = q.shape
        out = (b, nq, h * v.shape[3])
        if skip_output_reshape:
            return kernel
        def fn(q, k, v):
            return kernel(q, k, v).transpose(1, 2).reshape(*out)
        return fn
    out = (qs[0], qs[1], heads * vs[3])
    if skip_output_reshape:
        def fn(q, k, v):
            return kernel(q.view(*qs).transpose(1, 2), k.view(*ks).transpose(1, 2), v.view(*vs).transpose(1, 2))
    else:
        def fn(q, k, v):
            return kernel(q.view(*qs).transpose(1, 2), k.view(*ks).transpose(1, 2),
                          v.view(*vs).transpose(1, 2)).transpose(1, 2).reshape(*out)
    return fn


def make_step_wrapper(override: GenesisAttentionOverride) -> Callable[..., Any]:
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
