"""Measured AUTO: per call signature, time every backend that can serve it and keep the fastest one that fits
the call's quality budget.

The first call with a new signature, on a device where measuring is on, runs each servable backend on the
*real inputs*, checks its output against a float64 reference on a slice, times the survivors in rotated,
interleaved rounds and keeps the results in memory and on disk. Files:

* :mod:`.switches` — ``GENESIS_AUTOTUNE`` (where measuring is on) and the time budget;
* :mod:`.signatures` — the signature of a call and the environment measurements depend on;
* :mod:`.disk` and :mod:`.store` — the bounded, validated JSON cache files and the in-memory entries;
* :mod:`.measuring` — the accuracy check and the timing loops;
* :mod:`.policy` — which measured backend serves a call under its budget, ``tune`` and the dispatch guard.

Thread-safe: one signature is measured at a time, and a second thread asking for it waits for the answer.
"""
from __future__ import annotations

from .disk import cache_dir
from .measuring import candidate_order, errors, measure, reference_slice, relative_error
from .ranking import error_verdict, tolerance
from .policy import TIE_MARGIN, choose, guard, known, merge, peek, pick, prefer_default, refused_for, tune, unknown
from .signatures import bucket, device_label, environment, layout_tag, signature
from .store import cache_path, lookup, reload, summary, timings
from .store import clear as _clear
from .switches import ENV_BUDGET, ENV_SWITCH, enabled_for, mode, set_mode


def clear(disk: bool = True) -> None:
    """Forget every measurement (memory, and the cache files unless ``disk=False``)."""
    _clear(disk_too=disk)


__all__ = [
    "ENV_BUDGET", "ENV_SWITCH", "TIE_MARGIN", "bucket", "cache_dir", "cache_path", "candidate_order", "choose",
    "clear", "device_label", "enabled_for", "environment", "error_verdict", "errors", "guard", "known", "layout_tag", "lookup",
    "measure", "merge", "mode", "peek", "pick", "prefer_default", "reference_slice", "refused_for", "relative_error",
    "reload", "set_mode", "signature", "summary", "timings", "tolerance", "tune", "unknown",
]
