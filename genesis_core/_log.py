"""Logging for Genesis: one logger, every line prefixed ``[Genesis]``, and "once" helpers.

The engine never configures the root logger; it attaches a handler to the ``genesis`` logger only
when nobody else did, so ComfyUI's and the user's logging setups keep control.
"""
from __future__ import annotations

import logging
import threading

logger = logging.getLogger("genesis")

if not logger.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("[Genesis] %(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False

_seen: set = set()
_seen_lock = threading.Lock()


def log_once(key: object, message: str, level: int = logging.WARNING) -> bool:
    """Log ``message`` the first time ``key`` is seen in this process; return whether it was logged."""
    with _seen_lock:
        if key in _seen:
            return False
        _seen.add(key)
    logger.log(level, message)
    return True


def reset_once() -> None:
    """Forget which messages were logged (tests use this to observe logging again)."""
    with _seen_lock:
        _seen.clear()


def first_line(exc: BaseException, limit: int = 200) -> str:
    """``"TypeName: first line of the message"`` (cut to ``limit`` characters), for one-line reasons."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:limit]}" if text else type(exc).__name__
