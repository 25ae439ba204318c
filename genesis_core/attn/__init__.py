"""Attention: types, the backend registry, dispatch, the autotuner, torch.compile support, the spec's modules.

This file is the one place where the pieces are wired together (each module imports only the layers below it):

1. the backends register themselves, in registry order (``backends/``);
2. AUTO asks the autotuner (``dispatch.set_auto_chooser``), lossy explicit choices pass its guard;
3. ``attention()`` under torch.compile becomes the custom op (``dispatch.set_tracer``).

``genesis_core.attention`` (the function) is :func:`.dispatch.attention`.
"""
from . import backends as _backends  # noqa: F401  (registers every backend)
from . import autotune, compile as _compile, dispatch
from .dispatch import (
    attention,
    backend_name,
    clear_plans,
    explain,
    get_default_backend,
    last_backend,
    served_signatures,
    set_default_backend,
    set_default_quality,
    use_backend,
)
from .quality import LEVELS as QUALITY_LEVELS
from .registry import report as backends_report
from .types import AttentionCall, AttentionType

dispatch.refresh_names()
dispatch.set_auto_chooser(autotune.choose, autotune.peek)
dispatch.set_guard(autotune.guard)
dispatch.set_tracer(_compile.traced_attention)


def install_autotuner() -> None:
    """Make AUTO use the autotuner (the default)."""
    dispatch.set_auto_chooser(autotune.choose, autotune.peek)


def uninstall_autotuner() -> None:
    """AUTO back to the default order (measurements are kept)."""
    dispatch.set_auto_chooser(None)


__all__ = [
    "AttentionCall",
    "AttentionType",
    "QUALITY_LEVELS",
    "attention",
    "autotune",
    "backend_name",
    "backends_report",
    "clear_plans",
    "explain",
    "get_default_backend",
    "install_autotuner",
    "last_backend",
    "served_signatures",
    "set_default_backend",
    "set_default_quality",
    "uninstall_autotuner",
    "use_backend",
]
