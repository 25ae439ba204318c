"""The errors of the ONNX Runtime path: an export that failed or was refused, and the guard's refusal.

Both are re-exported by :mod:`genesis_core.compute.onnx`, the module callers import them from.
"""
from __future__ import annotations


class OnnxExportError(RuntimeError):
    """``fn`` could not be exported to ONNX, or its graph does not reproduce it (the message says why)."""


class OnnxDataDependentError(OnnxExportError):
    """``fn`` turns a tensor computed from its inputs into a Python value, which tracing would freeze."""
