"""Whether code runs under tracing (torch.compile, fake tensors, CUDA graph capture). Leaf module."""
from __future__ import annotations

import torch

_compiler = getattr(torch, "compiler", None)
if _compiler is not None and hasattr(_compiler, "is_compiling"):
    is_compiling = _compiler.is_compiling
else:  # torch < 2.3
    def is_compiling() -> bool:
        """Whether Dynamo is tracing the caller right now."""
        dynamo = getattr(torch, "_dynamo", None)
        return bool(dynamo is not None and hasattr(dynamo, "is_compiling") and dynamo.is_compiling())


def is_fake(t: torch.Tensor) -> bool:
    """A FakeTensor or FunctionalTensor (shapes without data): never measured, never checked."""
    return type(t).__name__ in ("FakeTensor", "FunctionalTensor")


def capturing(device: torch.device) -> bool:
    """Whether a CUDA graph capture is under way on the current stream (synchronising would break it)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()
