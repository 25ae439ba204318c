"""Measured AUTO: per call signature, time every backend that can serve it and keep the fastest correct one.

A *signature* is (device and GPU name, dtype, B·H bucket, Nq bucket, Nk bucket, head_dim, GQA group,
mask kind, memory layout). Buckets are half-octaves (…, 4096, 5793, 8192, …), so the many token
counts of one model share a handful of measurements. The first call with a new signature, on a
device where measuring is on, runs each servable backend on the *real inputs*:

1. one warm-up run, whose output is checked against a float64 reference computed on a slice
   (up to 4 batch·head pairs × 256 query rows, all keys); a candidate whose relative error
   ‖out − ref‖ / ‖ref‖ exceeds its backend's tolerance for the dtype, or that returns NaN/Inf,
   or raises, is rejected and the reason remembered;
2. a probe run; a candidate more than 4× slower than the best so far is timed only that once;
3. otherwise a few timed runs (CUDA events on CUDA; ``perf_counter`` + synchronize elsewhere),
   whose median is its time.

Candidates are tried fastest-likely first, within a wall-clock budget per signature
(``GENESIS_AUTOTUNE_BUDGET_MS``, default 4000 ms on accelerators, 1500 ms on CPU); the reference
kernel ``sdpa_math`` is skipped where its score matrix would not fit comfortably in memory.
The fastest survivor is the choice; if every candidate fails, AUTO keeps the default order.

Choices live in memory and in JSON files in the user's cache dir (see :mod:`.autotune_cache`): one
for accelerator signatures, keyed by GPU names, torch/CUDA/cuDNN and kernel package versions, and one
for CPU signatures, keyed by torch and the processor (so CPU-only use never creates a CUDA context
to learn GPU names). Thread-safe: one signature is measured at a time,
and a second thread asking for it waits for the first one's answer.

Switch: ``GENESIS_AUTOTUNE=0`` (or ``off``) never measures and ignores stored choices (the default
order applies); unset / ``1`` measures on accelerators (CUDA, ROCm, MPS, XPU) but not on CPU, where
choices stored ahead with :func:`tune` are still used; ``all`` measures on CPU too. CPU is off by default because there the candidates are few (PyTorch's SDPA sub-kernels and
the chunked math path), SDPA's own choice is already the fastest on the CPUs we measured, and
measuring costs several full calls per new signature — seconds on a 2-core CI runner.
"""
from __future__ import annotations

import math
import os
import statistics
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .._device import synchronize
from .._log import first_line as _first_line, logger
from . import autotune_cache, registry
from .compile import is_compiling
from .types import AttentionCall

ENV_SWITCH = "GENESIS_AUTOTUNE"
ENV_BUDGET = "GENESIS_AUTOTUNE_BUDGET_MS"

# Defaults used when a backend states no tolerance for a dtype (relative error vs the reference).
DEFAULT_TOLERANCE = {torch.float64: 1e-7, torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 3e-2}
# Try likely-fast kernels first so the budget and the slow cut-off spare the reference kernels.
_PREFERRED_ORDER = ("sdpa", "sdpa_cudnn", "sdpa_flash", "flash", "sage", "xformers", "sdpa_efficient")
_REFERENCE_KERNELS = ("pytorch", "sdpa_math")
SLOW_FACTOR = 4.0
MIN_REPS, MAX_REPS = 3, 15
CANDIDATE_TARGET_MS = 60.0  # timed work per candidate, before clamping the repetitions
REF_HEADS, REF_ROWS = 4, 256

_lock = threading.RLock()  # guards _entries / _disks / _loaded
_tune_lock = threading.RLock()  # one measurement at a time (re-entrant: a backend may itself call attention)
_entries: Dict[str, dict] = {}
_disks: Dict[str, autotune_cache.DiskCache] = {}  # "cpu" / "accel" -> its file
_loaded: set = set()  # kinds whose file has been read into _entries
_envs: Dict[str, dict] = {}
_device_names: Dict[int, str] = {}
_mode_override: Optional[str] = None


# ---------------------------------------------------------------- switches


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
    if value is not None and value not in ("off", "accelerators", "all"):
        raise ValueError(f"autotune mode must be 'off', 'accelerators', 'all' or None; got {value!r}")
    _mode_override = value
    _clear_plans()


def enabled_for(device: torch.device) -> bool:
    """Whether a new signature on ``device`` is measured (see :func:`mode`)."""
    m = mode()
    if m == "off" or device.type == "meta":
        return False
    return m == "all" or device.type != "cpu"


def _budget_ms(device: torch.device) -> float:
    try:
        return float(os.environ[ENV_BUDGET])
    except (KeyError, ValueError):
        return 1500.0 if device.type == "cpu" else 4000.0


# ---------------------------------------------------------------- signatures


def bucket(n: int) -> int:
    """Half-octave bucket (upper bound) of a size: exact up to 16, then 2**(k/2) rounded up."""
    if n <= 16:
        return int(n)
    return int(math.ceil(2 ** (math.ceil(2 * math.log2(n) - 1e-9) / 2) - 1e-6))


def device_label(device: torch.device) -> str:
    """``"cuda:<GPU name>"`` on CUDA (so the choice follows the card, not its index), else the device type."""
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        name = _device_names.get(idx)
        if name is None:
            name = _device_names[idx] = torch.cuda.get_device_name(idx)
        return f"cuda:{name}"
    return device.type


def layout_tag(t: torch.Tensor) -> str:
    """Memory layout of a BHND view: ``BHND`` (contiguous), ``BNHD`` (transposed) or ``strided``."""
    if t.is_contiguous():
        return "BHND"
    if t.transpose(1, 2).is_contiguous():
        return "BNHD"
    return "strided"


def signature(call: AttentionCall) -> str:
    """The autotuner's key for ``call`` (see the module docstring)."""
    dv = "" if call.v_head_dim == call.head_dim else f"/{call.v_head_dim}"
    gqa = f" gqa{call.heads // call.kv_heads}" if call.gqa else ""
    return (
        f"{device_label(call.device)} {str(call.dtype).replace('torch.', '')} "
        f"BH{bucket(call.batch * call.heads)} Nq{bucket(call.q_len)} Nk{bucket(call.kv_len)} "
        f"D{call.head_dim}{dv}{gqa} mask={call.mask_kind} {layout_tag(call.q)}"
    )


def _kind(sig_or_type: str) -> str:
    """Which cache file a signature (or device type) belongs to: ``"cpu"`` or ``"accel"``."""
    return "cpu" if sig_or_type == "cpu" or sig_or_type.startswith("cpu ") else "accel"


def _accel_env_is_cheap() -> bool:
    # GPU names need a CUDA context; never create one just to read a cache (a CPU-only run on a GPU box).
    return not torch.cuda.is_available() or torch.cuda.is_initialized()


def environment(kind: str = "accel") -> dict:
    """What the measurements depend on. ``"accel"``: GPU names, torch/CUDA/HIP/cuDNN and kernel package
    versions; ``"cpu"``: torch and the processor (CPU choices do not move with the GPU or its kernels)."""
    env = _envs.get(kind)
    if env is None:
        from .backends._common import package_version

        try:
            from .. import __version__ as genesis_version
        except ImportError:
            genesis_version = None
        if kind == "cpu":
            import platform

            env = {"kind": "cpu", "genesis": genesis_version, "torch": torch.__version__,
                   "machine": platform.machine(), "processor": platform.processor()}
        else:
            gpus: List[str] = []
            cudnn = None
            if torch.cuda.is_available():
                try:
                    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                    cudnn = torch.backends.cudnn.version()
                except Exception:
                    gpus = ["unknown"]
            dists = ("flash-attn", "flash_attn_3", "flash-attn-cute", "sageattention", "xformers", "triton")
            env = {"kind": "accel", "genesis": genesis_version, "torch": torch.__version__,
                   "cuda": torch.version.cuda, "hip": getattr(torch.version, "hip", None), "cudnn": cudnn,
                   "gpus": gpus, "packages": {d: package_version(d) for d in dists}}
        _envs[kind] = env
    return env


# ---------------------------------------------------------------- cache


def _store(kind: str) -> autotune_cache.DiskCache:
    """The disk cache of ``kind`` for the current cache dir (loaded into memory once)."""
    env = environment(kind)
    path = autotune_cache.cache_path(env)
    with _lock:
        disk = _disks.get(kind)
        if disk is None or disk.path != path:
            disk = _disks[kind] = autotune_cache.DiskCache(env, path)
            _loaded.discard(kind)
        if kind not in _loaded:
            for sig, entry in disk.load().items():
                _entries.setdefault(sig, entry)
            _loaded.add(kind)
        return disk


def cache_path(device="cpu"):
    """Path of the cache file for ``device``'s kind (``"cpu"``, or any accelerator: ``"cuda"``)."""
    dev_type = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    return _store(_kind(dev_type)).path


def lookup(sig: str) -> Optional[dict]:
    """The stored entry for a signature (memory, then disk), or None."""
    with _lock:
        entry = _entries.get(sig)
        if entry is not None:
            return entry
    _store(_kind(sig))
    with _lock:
        return _entries.get(sig)


_TRANSIENT = ("out of memory", "OutOfMemoryError", "not measured:")


def _remember(sig: str, entry: dict) -> None:
    """Keep ``entry`` in memory, and on disk unless a rejection was transient (out of memory: the
    device may have been busy with something else; the next process measures again)."""
    with _lock:
        _entries[sig] = entry
    if any(_transient(reason) for reason in entry.get("rejected", {}).values()):
        return
    _store(_kind(sig)).update({sig: entry})


def clear(disk: bool = True) -> None:
    """Forget every measurement (memory, and the cache files unless ``disk=False``)."""
    kinds = ["cpu", "accel"] if disk or _accel_env_is_cheap() else ["cpu"]
    stores = [_store(k) for k in kinds]  # load first, so nothing from a file comes back after the clear
    with _lock:
        _entries.clear()
        for store in stores:
            if disk:
                store.remove()
    _clear_plans()


def reload() -> None:
    """Drop the in-memory choices and read the cache files again on the next lookup."""
    with _lock:
        _entries.clear()
        _loaded.clear()
    _clear_plans()


def timings() -> Dict[str, dict]:
    """{signature: {backend: median ms, ..., "chosen": name or None, "rejected": {name: reason}}}."""
    _store("cpu")
    if _accel_env_is_cheap():
        _store("accel")
    with _lock:
        items = list(_entries.items())
    out = {}
    for sig, e in items:
        row: dict = dict(e.get("ms", {}))
        row["chosen"] = e.get("chosen")
        row["rejected"] = dict(e.get("rejected", {}))
        out[sig] = row
    return out


def _clear_plans() -> None:
    from . import dispatch

    dispatch.clear_plans()


# ---------------------------------------------------------------- accuracy


def _ref_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _spread(n: int, k: int) -> List[int]:
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def reference_slice(call: AttentionCall, heads: int = REF_HEADS, rows: int = REF_ROWS):
    """(pairs, rows, ref): float64 attention for a few (batch, head) pairs and query rows, [P, R, Dv]."""
    dt = _ref_dtype(call.device)
    pairs = [divmod(i, call.heads) for i in _spread(call.batch * call.heads, heads)]
    row_idx = torch.tensor(_spread(call.q_len, rows), device=call.device)
    group = call.heads // call.kv_heads
    outs = []
    for b, h in pairs:
        hk = h // group
        qs = call.q[b, h].index_select(0, row_idx).to(dt)
        ks, vs = call.k[b, hk].to(dt), call.v[b, hk].to(dt)
        s = (qs @ ks.transpose(0, 1)) * call.scale
        if call.mask is not None:
            m = call.mask[b if call.mask.shape[0] > 1 else 0, h if call.mask.shape[1] > 1 else 0]
            if m.shape[0] > 1:
                m = m.index_select(0, row_idx)
            s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.to(dt)
        outs.append(torch.softmax(s, dim=-1) @ vs)
    return pairs, row_idx, torch.stack(outs)


def relative_error(out: torch.Tensor, ref) -> float:
    """‖out − ref‖ / ‖ref‖ on the reference slice (rows where the reference is finite); NaN if out is not."""
    pairs, row_idx, r = ref
    if out.dim() != 4:
        return float("nan")
    o = torch.stack([out[b, h].index_select(0, row_idx) for b, h in pairs]).to(r.dtype)
    finite = torch.isfinite(r).all(dim=-1)
    o, r = o[finite], r[finite]
    if not bool(torch.isfinite(o).all()):
        return float("nan")
    denom = float(torch.linalg.vector_norm(r))
    return float(torch.linalg.vector_norm(o - r)) / max(denom, 1e-30)


def tolerance(backend: registry.Backend, dtype: torch.dtype) -> float:
    """The backend's tolerance for ``dtype`` (or Genesis' default for that dtype)."""
    tol = backend.tolerance.get(dtype)
    return tol if tol is not None else DEFAULT_TOLERANCE.get(dtype, 3e-2)


# ---------------------------------------------------------------- timing


def time_runs(fn: Callable[[], object], device: torch.device, reps: int) -> List[float]:
    """Milliseconds of ``reps`` runs of ``fn``: CUDA events on CUDA, else perf_counter around a synchronize."""
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) for s, e in events]
    out = []
    for _ in range(reps):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def repeat(fn: Callable[[], object], times: int) -> Callable[[], None]:
    """A function that calls ``fn`` ``times`` times, keeping no result alive."""
    def run() -> None:
        for _ in range(times):
            fn()

    return run


def _memory_guard(name: str, call: AttentionCall) -> Optional[str]:
    """Why the reference kernel that materialises the scores should not run for this call, or None."""
    if name != "sdpa_math":
        return None
    need = call.batch * call.heads * call.q_len * call.kv_len * 8  # scores + softmax, float32
    if call.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(call.device)
    else:
        free = 4 << 30
    if need > free // 2:
        return f"not measured: would materialise {need / 2**30:.1f} GiB of scores ({free / 2**30:.1f} GiB free)"
    return None


def candidate_order(names: Sequence[str]) -> List[str]:
    """Likely-fast kernels first, other registered ones next, the reference kernels last."""
    first = [n for n in _PREFERRED_ORDER if n in names]
    last = [n for n in _REFERENCE_KERNELS if n in names]
    middle = [n for n in names if n not in first and n not in last]
    return first + middle + last


class _Progress:
    """ComfyUI's progress bar when ComfyUI is running (imported lazily), else nothing."""

    def __init__(self, total: int):
        self.bar = None
        mod = sys.modules.get("comfy.utils")
        if mod is None and "comfy" in sys.modules:
            try:
                import importlib

                mod = importlib.import_module("comfy.utils")
            except Exception:
                mod = None
        if mod is not None and hasattr(mod, "ProgressBar"):
            try:
                self.bar = mod.ProgressBar(total)
            except Exception:
                self.bar = None

    def step(self) -> None:
        if self.bar is not None:
            try:
                self.bar.update(1)
            except Exception:
                self.bar = None




def measure(call: AttentionCall, names: Sequence[str], budget_ms: Optional[float] = None) -> dict:
    """Measure ``names`` on ``call`` now and return the entry (nothing is stored).

    Phases: warm-up + accuracy check per candidate (in :func:`candidate_order`), one probe timing
    each, then rounds that time every remaining candidate in turn (interleaved, so drift and a
    busy machine hit all of them alike) until each has enough samples or the budget is spent.
    """
    device = call.device
    budget = _budget_ms(device) if budget_ms is None else budget_ms
    order = candidate_order(list(names))
    ms: Dict[str, float] = {}
    errors: Dict[str, float] = {}
    rejected: Dict[str, str] = {}
    notes: Dict[str, str] = {}
    progress = _Progress(len(order) + 1)
    t_start = time.perf_counter()

    def elapsed() -> float:
        return (time.perf_counter() - t_start) * 1e3

    with torch.no_grad():
        ref_box: list = [None]  # the reference slice, computed once a first candidate has run
        survivors: List[str] = []
        for name in order:
            try:
                if survivors and elapsed() > budget:
                    rejected[name] = f"not measured: tuning budget of {budget:.0f} ms spent"
                elif _check_one(name, call, errors, rejected, ref_box):
                    survivors.append(name)
            finally:
                progress.step()
        ref_box.clear()
        probes: Dict[str, float] = {}
        for name in survivors:
            run = registry.get(name).run
            try:
                probes[name] = time_runs(lambda: run(call), device, 1)[0]
            except Exception as exc:
                rejected[name] = f"failed while timing: {_first_line(exc)}"
        if probes:
            best = min(probes.values())
            timed = [n for n in probes if probes[n] <= SLOW_FACTOR * best]
            for n in probes:
                if n not in timed:
                    ms[n] = probes[n]
                    notes[n] = f"timed once: over {SLOW_FACTOR:g}x the fastest probe"
            slowest = max(probes[n] for n in timed)
            # Several back-to-back runs per sample when a run is short, so launch gaps and clock granularity stay out.
            inner = int(max(1, min(50, 0.5 / max(best, 1e-4))))
            rounds = int(max(MIN_REPS, min(MAX_REPS, CANDIDATE_TARGET_MS / max(slowest * inner, 1e-3))))
            if device.type == "cpu":
                rounds = MIN_REPS
            samples: Dict[str, List[float]] = {n: [] for n in timed}
            for r in range(rounds):
                order = list(samples)
                if not order:
                    break
                for n in order[r % len(order):] + order[:r % len(order)]:  # rotated: no fixed position
                    if n not in samples:
                        continue
                    run = registry.get(n).run
                    try:
                        t = time_runs(repeat(lambda: run(call), inner), device, 1)[0]
                        samples[n].append(t / inner)
                    except Exception as exc:
                        rejected[n] = f"failed while timing: {_first_line(exc)}"
                        del samples[n]
                if r + 1 >= MIN_REPS and elapsed() > budget:
                    break
            for n, vals in samples.items():
                ms[n] = statistics.median(vals)
        progress.step()
    ranking = sorted(ms, key=ms.get)
    return {
        "chosen": prefer_default(ms, ranking),
        "ranking": ranking,
        "ms": {n: round(ms[n], 5) for n in ranking},
        "rel_err": {n: (None if not math.isfinite(e) else float(f"{e:.4g}")) for n, e in errors.items()},
        "rejected": rejected,
        "notes": notes,
        "shape": (f"B{call.batch} H{call.heads}/{call.kv_heads} Nq{call.q_len} Nk{call.kv_len} "
                  f"D{call.head_dim} {str(call.dtype).replace('torch.', '')}"),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _check_one(name: str, call: AttentionCall, errors: dict, rejected: dict, ref_box: list) -> bool:
    """Warm-up run of one candidate and its accuracy check; False (with the reason recorded) if rejected."""
    reason = _memory_guard(name, call)
    if reason:
        rejected[name] = reason
        return False
    backend = registry.get(name)
    try:
        out = backend.run(call)  # the warm-up run; its output is the one checked
        synchronize(call.device)
    except Exception as exc:
        rejected[name] = f"failed: {_first_line(exc)}"
        return False
    want = (call.batch, call.heads, call.q_len, call.v_head_dim)
    try:
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            rejected[name] = f"wrong output: expected shape {want}, got {got}"
            return False
        if ref_box[0] is None:
            ref_box[0] = reference_slice(call)
        err = relative_error(out, ref_box[0])
    except Exception as exc:
        rejected[name] = f"accuracy check failed: {_first_line(exc)}"
        return False
    finally:
        del out
    errors[name] = err
    tol = tolerance(backend, call.dtype)
    if not math.isfinite(err):
        rejected[name] = "output has NaN or Inf where the reference is finite"
        return False
    if err > tol:
        dt = str(call.dtype).replace("torch.", "")
        rejected[name] = f"relative error {err:.3g} > tolerance {tol:.3g} ({dt})"
        return False
    return True


# ---------------------------------------------------------------- the chooser


def _should_measure(call: AttentionCall) -> bool:
    if not enabled_for(call.device):
        return False
    if is_compiling():
        return False
    if type(call.q).__name__ in ("FakeTensor", "FunctionalTensor"):
        return False
    if call.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False  # measuring synchronizes, which a CUDA graph capture forbids
    return True


# A measured winner must beat the default-order backend (plain ``sdpa`` first) by more than this to be
# chosen. On the H100 (2026-11-25) ``sdpa`` and ``sdpa_cudnn`` ran the same cuDNN kernel and their medians
# still swapped places between runs by up to ~10% on Flux/Wan shapes; the pinned variant also pays for the
# ``sdpa_kernel`` context on every call. Ties go to the backend that lets PyTorch choose.
TIE_MARGIN = 0.03


def prefer_default(ms: Dict[str, float], candidates: Sequence[str]) -> Optional[str]:
    """The fastest of ``candidates`` (names with a timing in ``ms``), unless a backend earlier in the
    default order is within ``TIE_MARGIN`` of it; then that one."""
    ranked = sorted((n for n in candidates if n in ms), key=ms.get)
    if not ranked:
        return None
    from .dispatch import DEFAULT_AUTO_ORDER  # dispatch imports this module at its end

    best = ranked[0]
    for name in DEFAULT_AUTO_ORDER:
        if name in ranked and ms[name] <= ms[best] * (1.0 + TIE_MARGIN):
            return name
    return best


def pick(entry: dict, servable: Sequence[str]) -> Optional[str]:
    """The measured survivor that can serve this call (see :func:`prefer_default`), or None."""
    rejected = entry.get("rejected", {})
    return prefer_default(entry.get("ms", {}), [n for n in servable if n not in rejected])


def _log_entry(sig: str, entry: dict) -> None:
    ms = entry["ms"]
    parts = [f"{n} {ms[n]:.3f} ms" for n in sorted(ms, key=ms.get)]
    rej = [f"{n} ({r})" for n, r in entry["rejected"].items()]
    chosen = entry["chosen"] or "default order (no candidate passed)"
    msg = f"autotune {sig}: chose {chosen}; " + ", ".join(parts)
    if rej:
        msg += "; rejected: " + "; ".join(rej)
    logger.info(msg)


def _known(entry: Optional[dict], servable: Sequence[str]) -> bool:
    """Whether every servable backend has a timing or a lasting rejection (a transient one, such as a
    spent budget or a memory guard, does not count: that backend is measured again next time)."""
    if entry is None:
        return False
    rejected = entry.get("rejected", {})
    return all(n in entry.get("ms", {}) or (n in rejected and not _transient(rejected[n])) for n in servable)


def _transient(reason: str) -> bool:
    return any(t in reason for t in _TRANSIENT)


def choose(call: AttentionCall, servable: List[str]) -> Optional[str]:
    """Dispatch's AUTO chooser: the measured choice for ``call``'s signature, measuring it if new.

    A stored choice is used wherever the switch is not ``off`` (also one made ahead with :func:`tune`
    on CPU); a new signature is measured only where measuring is on for the device, and never inside
    torch.compile tracing or a CUDA graph capture. Returns None (dispatch then uses its default
    order) when there is no choice, when fewer than two backends can serve the call, or when every
    candidate failed.
    """
    if len(servable) < 2 or mode() == "off" or call.device.type == "meta":
        return None
    if type(call.q).__name__ in ("FakeTensor", "FunctionalTensor"):
        return None
    sig = signature(call)
    entry = lookup(sig)
    if _known(entry, servable) or not _should_measure(call):
        return pick(entry, servable) if entry is not None else None
    with _tune_lock:
        entry = lookup(sig)
        if not _known(entry, servable):
            missing = _unknown(entry, servable)
            if entry is not None:  # time the stored winner again beside them: same shape, same moment
                best = pick(entry, [n for n in servable if n not in missing])
                if best is not None:
                    missing.append(best)
            logger.debug(f"autotune: measuring {len(missing)} attention backends for {sig}")
            fresh = measure(call, missing)
            entry = fresh if entry is None else merge(entry, fresh)
            _log_entry(sig, entry)
            _remember(sig, entry)
    return pick(entry, servable)


def _unknown(entry: Optional[dict], servable: Sequence[str]) -> List[str]:
    """The servable backends ``entry`` has neither a timing nor a lasting rejection for (all if no entry)."""
    if entry is None:
        return list(servable)
    ms, rejected = entry.get("ms", {}), entry.get("rejected", {})
    return [n for n in servable if n not in ms and not (n in rejected and not _transient(rejected[n]))]


def merge(old: dict, fresh: dict) -> dict:
    """``old`` with the backends ``fresh`` measured (timings, errors, rejections) taken from ``fresh``.

    Used when a signature is known except for backends a transient reason skipped (a memory guard, a spent
    budget): a new exact shape in the same bucket measures just those, not every backend again (on two
    H100s, each split size of one Flux batch re-measured all seven backends before this). The stored winner
    is measured again with them, so the choice between it and a newcomer compares one shape at one moment
    (shapes in a bucket differ by up to ~1.4x per dimension); ``shape`` and ``when`` become ``fresh``'s.
    """
    names = set(fresh.get("ms", {})) | set(fresh.get("rejected", {}))
    ms = {n: t for n, t in old.get("ms", {}).items() if n not in names}
    ms.update(fresh.get("ms", {}))
    rejected = {n: r for n, r in old.get("rejected", {}).items() if n not in names}
    rejected.update(fresh.get("rejected", {}))
    ranking = sorted(ms, key=ms.get)
    out = dict(old)
    out.update(chosen=prefer_default(ms, ranking), ranking=ranking, ms={n: ms[n] for n in ranking}, rejected=rejected,
               rel_err={**old.get("rel_err", {}), **fresh.get("rel_err", {})},
               notes={**{n: v for n, v in old.get("notes", {}).items() if n not in names}, **fresh.get("notes", {})},
               when=fresh.get("when", old.get("when")), shape=fresh.get("shape", old.get("shape")))
    return out


def peek(call: AttentionCall, servable: List[str]) -> Optional[str]:
    """The choice already stored for ``call``'s signature (memory or disk), never measuring; else None."""
    if len(servable) < 2 or mode() == "off" or call.device.type == "meta":
        return None
    entry = lookup(signature(call))
    return pick(entry, servable) if entry is not None else None


def tune(q, k, v, mask=None, *, layout: str = "BHND", scale=None, force: bool = False) -> dict:
    """Measure the signature of these inputs now (ahead of the first real call) and return its entry.

    Same inputs as :func:`genesis_core.attention`. ``force`` re-measures a known signature.
    Measures even on a device where AUTO would not measure by itself (CPU by default), and AUTO then
    uses the result, unless the switch is ``off``.
    """
    from . import dispatch

    mask_view = dispatch._validate(q, k, v, mask, layout, scale)
    call = dispatch._make_call(q, k, v, mask, scale, layout, mask_view)
    servable = [b.name for b in registry.all_backends() if b.reason_for(call) is None]
    sig = signature(call)
    with _tune_lock:
        entry = None if force else lookup(sig)
        if entry is None:
            entry = measure(call, servable)
            _log_entry(sig, entry)
            _remember(sig, entry)
    _clear_plans()
    return entry


def install() -> None:
    """Make AUTO use the autotuner (done when dispatch is imported)."""
    from . import dispatch

    dispatch.set_auto_chooser(choose, peek)


def uninstall() -> None:
    """AUTO back to the default order (measurements are kept)."""
    from . import dispatch

    dispatch.set_auto_chooser(None)


__all__ = [
    "ENV_SWITCH",
    "bucket",
    "cache_path",
    "choose",
    "clear",
    "enabled_for",
    "environment",
    "install",
    "lookup",
    "measure",
    "mode",
    "peek",
    "pick",
    "reference_slice",
    "reload",
    "relative_error",
    "set_mode",
    "signature",
    "timings",
    "tune",
    "uninstall",
]
