"""Attention: types, the backend registry, dispatch, and the spec's attention modules."""
from .dispatch import (
    attention,
    backend_name,
    backends_report,
    clear_plans,
    explain,
    get_default_backend,
    last_backend,
    served_signatures,
    set_default_backend,
    use_backend,
)
from .types import AttentionCall, AttentionType

__all__ = [
    "AttentionCall",
    "AttentionType",
    "attention",
    "backend_name",
    "backends_report",
    "clear_plans",
    "explain",
    "get_default_backend",
    "last_backend",
    "served_signatures",
    "set_default_backend",
    "use_backend",
]
