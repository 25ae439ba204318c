"""Heterogeneous compute: backends and their detection, the executor, ONNX Runtime and WebGPU execution.

Importing this package loads only torch; ``onnxruntime``, ``onnx`` and ``wgpu`` are imported when a probe or
an ONNX/WebGPU worker first needs them.
"""
from .backends import (BackendStatus, ComputeBackend, available_backends, backend_status, clear_detection_cache,
                       detect_backends)
from .executor import (BackendUnavailableError, HeterogeneousExecutor, ParallelExecutionError, current_worker,
                       plan_shares)
from .placement import reachable_modules

__all__ = [
    "BackendStatus", "BackendUnavailableError", "ComputeBackend", "HeterogeneousExecutor", "ParallelExecutionError",
    "available_backends", "backend_status", "clear_detection_cache", "current_worker", "detect_backends",
    "plan_shares", "reachable_modules",
]
