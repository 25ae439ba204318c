"""The autotuner's policy: which measured backend AUTO serves for a call under its quality budget.

One measurement per signature serves every budget: it keeps each candidate's time and errors, and
:func:`pick` keeps, for the call's level, the fastest candidate whose errors fit that level (a lossy kernel
is only measured once a call whose budget admits it arrives; it is then merged into the entry). A winner
must beat the default-order backend by more than :data:`TIE_MARGIN`; ties go to plain ``sdpa``.
"""
from __future__ import annotations

import threading
from typing import Dict, List, Optional, Sequence

import torch

from ..._log import log_once, logger
from .. import registry
from .._trace import capturing, is_compiling, is_fake
from ..call import make_call, normalise_layout, validate
from ..types import AttentionCall
from . import measuring as _measure
from . import store
from .ranking import TIE_MARGIN, pick, prefer_default, refused_for  # noqa: F401  (TIE_MARGIN, prefer_default: re-exported)
from .signatures import signature
from .switches import enabled_for, mode

_tune_lock = threading.RLock()  # one measurement at a time (re-entrant: a backend may itself call attention)

def known(entry: Optional[dict], servable: Sequence[str]) -> bool:
    """Whether every servable backend has a timing or a lasting rejection (a transient one, such as a
    spent budget or a memory guard, does not count: that backend is measured again next time)."""
    return entry is not None and not unknown(entry, servable)


def unknown(entry: Optional[dict], servable: Sequence[str]) -> List[str]:
    """The servable backends ``entry`` has neither a timing nor a lasting rejection for (all if no entry)."""
    if entry is None:
        return list(servable)
    ms, rejected = entry.get("ms", {}), entry.get("rejected", {})
    return [n for n in servable if n not in ms and not (n in rejected and not store.transient(rejected[n]))]


def merge(old: dict, fresh: dict) -> dict:
    """``old`` with the backends ``fresh`` measured (timings, errors, rejections) taken from ``fresh``.

    Used when a signature is known except for some backends (skipped for a transient reason, or lossy ones
    a stricter budget never asked for): just those are measured, with the stored winner timed again beside
    them so the choice compares one shape at one moment; ``shape`` and ``when`` become ``fresh``'s.
    """
    names = set(fresh.get("ms", {})) | set(fresh.get("rejected", {}))
    ms = {n: t for n, t in old.get("ms", {}).items() if n not in names}
    ms.update(fresh.get("ms", {}))
    rejected = {n: r for n, r in old.get("rejected", {}).items() if n not in names}
    rejected.update(fresh.get("rejected", {}))
    ranking = sorted(ms, key=ms.get)
    out = dict(old)
    out.update(ranking=ranking, ms={n: ms[n] for n in ranking}, rejected=rejected,
               rel_err={**old.get("rel_err", {}), **fresh.get("rel_err", {})},
               cos={**old.get("cos", {}), **fresh.get("cos", {})},
               notes={**{n: v for n, v in old.get("notes", {}).items() if n not in names}, **fresh.get("notes", {})},
               when=fresh.get("when", old.get("when")), shape=fresh.get("shape", old.get("shape")))
    out["chosen"] = pick(out, ranking)
    return out


def _should_measure(call: AttentionCall) -> bool:
    return (enabled_for(call.device) and not is_compiling() and not is_fake(call.q)
            and not capturing(call.device))


def _say_refused(sig: str, entry: dict, servable: Sequence[str], level: str, chosen: Optional[str]) -> None:
    refused = refused_for(entry, [n for n in servable if n not in entry.get("rejected", {})], level)
    if refused:
        detail = "; ".join(f"{n}: {why}" for n, why in refused.items())
        log_once(("autotune-refused", sig, level, tuple(sorted(refused))),
                 f"autotune {sig}: quality '{level}' serves {chosen or 'the default order'}; refused {detail}")


def choose(call: AttentionCall, servable: List[str], level: str = "exact") -> Optional[str]:
    """Dispatch's AUTO chooser: the measured choice for ``call``'s signature under ``level``, measuring
    what is missing if the signature (or a backend this level admits) is new.

    A stored choice is used wherever the switch is not ``off`` (also one made ahead with :func:`tune` on
    CPU); a new signature is measured only where measuring is on for the device, and never inside
    torch.compile tracing or a CUDA graph capture. Returns None (dispatch then uses its default order) when
    there is no choice, when fewer than two backends can serve the call, or when every candidate failed.
    """
    if len(servable) < 2 or mode() == "off" or call.device.type == "meta" or is_fake(call.q):
        return None
    sig = signature(call)
    entry = store.lookup(sig)
    if known(entry, servable) or not _should_measure(call):
        if entry is None:
            return None
        chosen = pick(entry, servable, level)
        _say_refused(sig, entry, servable, level, chosen)
        return chosen
    with _tune_lock:
        entry = store.lookup(sig)
        if not known(entry, servable):
            missing = unknown(entry, servable)
            if entry is not None:  # time the stored winner again beside them: same shape, same moment
                best = pick(entry, [n for n in servable if n not in missing], level)
                if best is not None:
                    missing.append(best)
            logger.debug(f"autotune: measuring {len(missing)} attention backends for {sig}")
            fresh = _measure.measure(call, missing)
            entry = fresh if entry is None else merge(entry, fresh)
            store.log_entry(sig, entry)
            store.remember(sig, entry)
    chosen = pick(entry, servable, level)
    _say_refused(sig, entry, servable, level, chosen)
    return chosen


def peek(call: AttentionCall, servable: List[str], level: str = "exact") -> Optional[str]:
    """The choice already stored for ``call``'s signature (memory or disk), never measuring; else None."""
    if len(servable) < 2 or mode() == "off" or call.device.type == "meta":
        return None
    entry = store.lookup(signature(call))
    return pick(entry, servable, level) if entry is not None else None


def guard(call: AttentionCall, backend: registry.Backend, level: str) -> Optional[str]:
    """Dispatch's check for an explicitly chosen lossy backend: its measured errors on this signature if the
    autotuner has them, else one checked run on the live inputs. Never runs while tracing or capturing."""
    if is_fake(call.q) or call.device.type == "meta":
        return None  # shapes only: the real execution plans again with data
    entry = store.lookup(signature(call))
    if entry is not None and backend.name in entry.get("ms", {}):
        return refused_for(entry, [backend.name], level).get(backend.name)
    if entry is not None and backend.name in entry.get("rejected", {}) and \
            not store.transient(entry["rejected"][backend.name]):
        return entry["rejected"][backend.name]
    if is_compiling() or capturing(call.device):
        return "its accuracy cannot be checked during tracing or graph capture: call it once eagerly first"
    return _measure.check_output(call, backend, level)


def tune(q, k, v, mask=None, *, layout: str = "BHND", scale=None, force: bool = False,
         quality: Optional[str] = None) -> dict:
    """Measure the signature of these inputs now (ahead of the first real call) and return its entry.

    Same inputs as :func:`genesis_core.attention`. ``force`` re-measures a known signature. ``quality``
    (default: every level) limits the candidates to those the level admits. Measures even on a device where
    AUTO would not measure by itself (CPU by default), and AUTO then uses the result, unless the switch is
    ``off``.
    """
    from .. import quality as _quality  # a leaf; imported here only to keep the public name ``quality`` free

    layout = normalise_layout(layout)
    mask_view = validate(q, k, v, mask, layout, scale)
    call = make_call(q, k, v, mask, scale, layout, mask_view)
    level = _quality.normalise(quality) if quality is not None else _quality.LEVELS[-1]
    names = [b.name for b in registry.all_backends()
             if b.reason_for(call) is None and _quality.admits(level, b.precision)]
    sig = signature(call)
    with _tune_lock:
        entry = None if force else store.lookup(sig)
        if entry is None or unknown(entry, names):
            fresh = _measure.measure(call, names if entry is None else unknown(entry, names))
            entry = fresh if entry is None else merge(entry, fresh)
            store.log_entry(sig, entry)
            store.remember(sig, entry)
    registry.changed()
    return entry
