"""Genesis core: fast, correct, switchable attention and device-placed execution.

Public API of the spec (``from genesis.core import ...`` re-exports this module).
``genesis_core.attention`` is the dispatch *function*; the subpackage's other modules are reached
with ``from genesis_core.attention import ...`` / ``from genesis_core.attention.modules import ...``.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .attention import (  # noqa: E402
    AttentionType,
    backend_name,
    backends_report,
    explain,
    last_backend,
    served_signatures,
    set_default_backend,
    use_backend,
)
from .attention.dispatch import attention  # noqa: E402  (the function shadows the subpackage name on purpose)
