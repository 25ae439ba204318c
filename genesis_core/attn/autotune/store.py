"""Where the autotuner keeps its measurements: in memory, and in one disk file per kind of device.

Two files (see :mod:`.disk`): one for accelerator signatures, keyed by GPU names, torch/CUDA/cuDNN and kernel
package versions, and one for CPU signatures, keyed by torch and the processor (so CPU-only use never creates
a CUDA context to learn GPU names). Memory is filled from a file on the first look-up of its kind.
"""
from __future__ import annotations

import threading
from typing import Dict, List

import torch

from ... import _log
from .. import quality, registry
from . import disk
from .ranking import pick
from .signatures import accel_env_is_cheap, environment, kind_of

_lock = threading.RLock()  # guards _entries / _disks / _loaded
_entries: Dict[str, dict] = {}
_disks: Dict[str, disk.DiskCache] = {}  # "cpu" / "accel" -> its file
_loaded: set = set()  # kinds whose file has been read into _entries

# Rejections that say nothing lasting about a backend: it is measured again next time.
TRANSIENT = ("out of memory", "OutOfMemoryError", "not measured:")


def transient(reason: str) -> bool:
    return any(t in reason for t in TRANSIENT)


def _store(kind: str) -> disk.DiskCache:
    """The disk cache of ``kind`` for the current cache dir (loaded into memory once)."""
    env = environment(kind)
    path = disk.cache_path(env)
    with _lock:
        d = _disks.get(kind)
        if d is None or d.path != path:
            d = _disks[kind] = disk.DiskCache(env, path, known=registry.names)
            _loaded.discard(kind)
        if kind not in _loaded:
            for sig, entry in d.load().items():
                _entries.setdefault(sig, entry)
            _loaded.add(kind)
        return d


def cache_path(device="cpu"):
    """Path of the cache file for ``device``'s kind (``"cpu"``, or any accelerator: ``"cuda"``)."""
    dev_type = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    return _store(kind_of(dev_type)).path


def lookup(sig: str):
    """The stored entry for a signature (memory, then disk), or None."""
    with _lock:
        entry = _entries.get(sig)
        if entry is not None:
            return entry
    _store(kind_of(sig))
    with _lock:
        return _entries.get(sig)


def remember(sig: str, entry: dict) -> None:
    """Keep ``entry`` in memory, and on disk unless a rejection was transient (out of memory: the
    device may have been busy with something else; the next process measures again)."""
    with _lock:
        _entries[sig] = entry
    if any(transient(reason) for reason in entry.get("rejected", {}).values()):
        return
    _store(kind_of(sig)).update({sig: entry})


def clear(disk_too: bool = True) -> None:
    """Forget every measurement (memory, and the cache files unless ``disk_too=False``)."""
    kinds = ["cpu", "accel"] if disk_too or accel_env_is_cheap() else ["cpu"]
    stores = [_store(k) for k in kinds]  # load first, so nothing from a file comes back after the clear
    with _lock:
        _entries.clear()
        for s in stores:
            if disk_too:
                s.remove()
    registry.changed()


def reload() -> None:
    """Drop the in-memory choices and read the cache files again on the next lookup."""
    with _lock:
        _entries.clear()
        _loaded.clear()
    registry.changed()


def _all_items() -> List[tuple]:
    _store("cpu")
    if accel_env_is_cheap():
        _store("accel")
    with _lock:
        return list(_entries.items())


def timings() -> Dict[str, dict]:
    """{signature: {backend: median ms, ..., "chosen": name or None, "rejected": {name: reason}}}."""
    out = {}
    for sig, e in _all_items():
        row: dict = dict(e.get("ms", {}))
        row["chosen"] = e.get("chosen")
        row["rejected"] = dict(e.get("rejected", {}))
        out[sig] = row
    return out


def summary(limit: int = 50) -> dict:
    """A small view for status pages: how many signatures are known, and the newest ``limit`` of them with
    their choice and fastest time (``timings()`` / ``lookup(sig)`` give the details)."""
    items = sorted(_all_items(), key=lambda kv: str(kv[1].get("when", "")), reverse=True)
    rows = []
    for sig, e in items[:limit]:
        ms = e.get("ms", {})
        chosen = e.get("chosen")
        rows.append({"signature": sig, "chosen": chosen, "ms": ms.get(chosen) if chosen else None,
                     "measured": len(ms), "rejected": len(e.get("rejected", {})), "when": e.get("when")})
    return {"signatures": len(items), "shown": len(rows), "entries": rows}


def log_entry(sig: str, entry: dict) -> None:
    ms = entry["ms"]
    parts = [f"{n} {ms[n]:.3f} ms" for n in sorted(ms, key=ms.get)]
    rej = [f"{n} ({r})" for n, r in entry["rejected"].items()]
    chosen = entry["chosen"] or "default order (no candidate passed)"
    picks = {level: pick(entry, list(ms), level) for level in quality.LEVELS}
    if len(set(picks.values())) > 1:  # say what each level serves, not only exact's choice
        chosen = ", ".join(f"{p or 'the default order'} at {level}" for level, p in picks.items())
    msg = f"autotune {sig}: chose {chosen}; " + ", ".join(parts)
    if rej:
        msg += "; rejected: " + "; ".join(rej)
    _log.logger.info(msg)
