"""Progress reporting for long engine work (the autotuner measuring a new signature), as a callback.

The engine never imports a UI. A host installs a factory once (the ComfyUI pack installs ComfyUI's progress
bar): ``set_factory(lambda total: MyBar(total))``, where the object returned has ``update(n)``. Without a
factory, :func:`bar` returns a bar that does nothing. A failing bar is dropped, never fatal. Leaf module.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

_factory: Optional[Callable[[int], Any]] = None


def set_factory(factory: Optional[Callable[[int], Any]]) -> None:
    """Install (or, with None, remove) what :func:`bar` builds: ``factory(total)`` -> object with ``update(n)``."""
    global _factory
    _factory = factory


class Bar:
    """``step()`` advances the host's bar by one; silent when there is none or it fails."""

    __slots__ = ("_bar",)

    def __init__(self, total: int):
        self._bar = None
        if _factory is not None:
            try:
                self._bar = _factory(int(total))
            except Exception:
                self._bar = None

    def step(self) -> None:
        if self._bar is not None:
            try:
                self._bar.update(1)
            except Exception:
                self._bar = None


def bar(total: int) -> Bar:
    return Bar(total)
