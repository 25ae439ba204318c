"""Server routes (read-only), registered only inside a running ComfyUI server.

``GET /genesis/backends``: the attention and compute backends, each available or the reason it is not, their
versions, which backend serves each node choice, and a *summary* of the autotuner's measurements (how many
signatures, the newest few with their choice), so the answer stays small however large the cache grows.
``GET /genesis/autotune?signature=<sig>``: the full measurement of one signature (or, without the parameter,
the list of known signatures). The only request parameter read is used as a dictionary key: nothing from a
user reaches the filesystem or a shell.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Dict, List, Optional

from ..genesis_core._log import logger

ROUTE = "/genesis/backends"
DETAIL_ROUTE = "/genesis/autotune"
SUMMARY_LIMIT = 50
_registered = False


def _attention_rows() -> List[Dict[str, Any]]:
    from ..genesis_core.attn import backends_report

    return [dict(row) for row in backends_report()]


def _choice_rows(rows: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """For every node choice (auto, flash, ...): usable or not, and why."""
    from ._common import ATTENTION_CHOICES

    by_name = {r["name"]: r for r in rows}
    out = {}
    for choice in ATTENTION_CHOICES:
        if choice == "auto":
            out[choice] = {"available": True, "reason": None, "note": "measured choice per call shape, else sdpa"}
            continue
        row = by_name.get(choice)
        if row is None:
            out[choice] = {"available": False, "reason": "not registered in this Genesis build"}
        else:
            out[choice] = {"available": bool(row["available"]), "reason": row["reason"], "version": row.get("version"),
                           "kernel": row.get("kernel")}
    return out


def _compute_rows() -> List[Dict[str, Any]]:
    from ..genesis_core.compute.backends import detect_backends

    rows = []
    for backend, status in detect_backends().items():
        details = {k: (v if isinstance(v, (str, int, float, bool, type(None))) else str(v)) for k, v in status.details.items()}
        rows.append({"name": backend.value, "available": status.available, "reason": status.reason,
                     "devices": list(status.devices), "details": details})
    return rows


def _autotune() -> Optional[Dict[str, Any]]:
    """A bounded summary of the autotuner's measurements, or None when there are none."""
    try:
        from ..genesis_core.attn import autotune

        data = autotune.summary(limit=SUMMARY_LIMIT)
    except Exception as exc:  # the route must answer even if the cache is odd
        return {"error": f"{type(exc).__name__}: {exc}"}
    return data if data.get("signatures") else None


def autotune_detail(signature: Optional[str]) -> Dict[str, Any]:
    """What ``GET /genesis/autotune`` returns: one signature's entry, or the known signatures' names."""
    from ..genesis_core.attn import autotune

    if not signature:
        return {"signatures": sorted(autotune.timings())}
    entry = autotune.lookup(signature)
    if entry is None:
        return {"error": f"no measurement for signature {signature[:200]!r}"}
    return {"signature": signature, "entry": entry}


def _choice_of(backend: str) -> str:
    """Map a registry name to the node choice that reaches it (``sdpa_cudnn`` is served under ``sdpa``)."""
    return "sdpa" if backend.startswith("sdpa") else backend


def fastest_choice(timings: Any) -> Optional[str]:
    """The node choice that won the most measured call signatures, or None without data. Takes the autotuner's
    ``timings()`` format (``{signature: {backend: ms, ..., "chosen": name, "rejected": {...}}}``) or its
    ``summary()`` (``{"entries": [{"chosen": name, ...}, ...]}``)."""
    if not isinstance(timings, dict):
        return None
    if isinstance(timings.get("entries"), list):
        timings = {str(i): e for i, e in enumerate(timings["entries"])}
    wins: Dict[str, int] = {}
    for entry in timings.values():
        if not isinstance(entry, dict):
            continue
        best = entry.get("chosen")
        if not isinstance(best, str):
            ms = {k: v for k, v in entry.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            best = min(ms, key=ms.get) if ms else None
        if isinstance(best, str):
            choice = _choice_of(best)
            wins[choice] = wins.get(choice, 0) + 1
    return max(wins, key=wins.get) if wins else None


def backends_payload() -> Dict[str, Any]:
    """Everything ``GET /genesis/backends`` returns (also usable without a server)."""
    from ..genesis_core.attn import served_signatures

    rows = _attention_rows()
    timings = _autotune()
    return {
        "attention": rows,
        "choices": _choice_rows(rows),
        "compute": _compute_rows(),
        "autotune": timings,
        "fastest": fastest_choice(timings),
        "served": served_signatures(),
        "time": time.time(),
    }


def register() -> bool:
    """Add the routes to ComfyUI's PromptServer if this process runs one; return whether it did."""
    global _registered
    if _registered:
        return True
    server = sys.modules.get("server")  # never import it: outside ComfyUI "server" may be anything
    prompt_server = getattr(getattr(server, "PromptServer", None), "instance", None)
    routes = getattr(prompt_server, "routes", None)
    if routes is None:
        return False
    from aiohttp import web

    @routes.get(ROUTE)
    async def genesis_backends(request):  # noqa: ARG001 (no request data is read)
        import asyncio

        payload = await asyncio.get_running_loop().run_in_executor(None, backends_payload)
        return web.json_response(payload, dumps=_dumps)

    @routes.get(DETAIL_ROUTE)
    async def genesis_autotune(request):
        import asyncio

        sig = request.query.get("signature")
        payload = await asyncio.get_running_loop().run_in_executor(None, autotune_detail, sig)
        return web.json_response(payload, dumps=_dumps)

    _registered = True
    logger.debug("registered %s", ROUTE)
    return True


def _dumps(obj: Any) -> str:
    import json

    return json.dumps(obj, default=str)
