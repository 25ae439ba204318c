"""Genesis core: fast, correct, switchable attention and device-placed execution.

Public API of the spec (``from genesis.core import ...`` re-exports this module).
``genesis_core.attention`` is the dispatch *function*; the subpackage's other modules are reached
with ``from genesis_core.attn import ...`` / ``from genesis_core.attn.modules import ...``.
Importing genesis_core imports torch but no optional package (flash-attn, xformers, sage,
onnxruntime, wgpu) and touches no GPU: those are probed lazily, on first use.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .attn import (  # noqa: E402
    AttentionType,
    backend_name,
    backends_report,
    explain,
    last_backend,
    served_signatures,
    set_default_backend,
    use_backend,
)
from .attn import autotune  # noqa: E402
from .attn.modules import (  # noqa: E402
    AdaptiveAttentionSwitch,
    CrossAttentionInterface,
    CrossAttentionModule,
    create_attention_interface,
)
from .compute import (  # noqa: E402
    BackendUnavailableError,
    ComputeBackend,
    HeterogeneousExecutor,
    ParallelExecutionError,
    detect_backends,
)
from .comfyui import COMFYUI_NODE_REGISTRY, ComfyUINodeInterface, register_comfyui_node  # noqa: E402
from .info import get_interface_info  # noqa: E402
from .attn.dispatch import attention  # noqa: E402  (the function shadows the subpackage name on purpose)

__all__ = [
    "AdaptiveAttentionSwitch",
    "AttentionType",
    "BackendUnavailableError",
    "ComputeBackend",
    "HeterogeneousExecutor",
    "ParallelExecutionError",
    "detect_backends",
    "COMFYUI_NODE_REGISTRY",
    "ComfyUINodeInterface",
    "CrossAttentionInterface",
    "CrossAttentionModule",
    "attention",
    "autotune",
    "backend_name",
    "backends_report",
    "create_attention_interface",
    "explain",
    "get_interface_info",
    "last_backend",
    "register_comfyui_node",
    "served_signatures",
    "set_default_backend",
    "use_backend",
]
