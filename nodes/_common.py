"""Small shared pieces of the Genesis nodes: choice lists, the GENESIS_BACKEND value, input checks.

Nothing here imports ComfyUI at module level; ComfyUI objects (MODEL, LATENT, CONDITIONING) are used
through the attributes and methods ComfyUI documents for node authors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from ..genesis_core.attention import AttentionType

#: The attention choices every Genesis node offers (the widget marks which work on this server).
ATTENTION_CHOICES: List[str] = [t.value for t in (
    AttentionType.AUTO,
    AttentionType.FLASH_ATTENTION,
    AttentionType.SAGE_ATTENTION,
    AttentionType.XFORMERS,
    AttentionType.SDPA,
    AttentionType.PYTORCH,
)]

#: Compute backend choices for GenesisBackendSelect ("auto" = the best one present).
COMPUTE_CHOICES: List[str] = ["auto", "cuda", "rocm", "mps", "npu", "cpu", "onnx", "webgpu"]

#: Backends that run torch code on a torch device (the others go through the executor).
TORCH_BACKENDS = ("cuda", "rocm", "mps", "npu", "cpu")

GENESIS_BACKEND = "GENESIS_BACKEND"
TENSOR = "TENSOR"


@dataclass(frozen=True)
class BackendChoice:
    """What GenesisBackendSelect hands to other Genesis nodes (the GENESIS_BACKEND type).

    ``backend``: a ComputeBackend value ("cuda", "cpu", "onnx", ...). ``device``: a torch device string
    for torch backends ("cuda:0"), else None. ``details``: what detection reported (for display).
    """

    backend: str
    device: Optional[str]
    details: Dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def torch_device(self) -> torch.device:
        """The torch device tensors should live on for this choice (CPU for onnx/webgpu hosts)."""
        return torch.device(self.device) if self.device else torch.device("cpu")

    def __str__(self) -> str:
        return f"{self.backend} ({self.device})" if self.device else self.backend


def input_error(node: str, name: str, expected: str, got: Any) -> ValueError:
    """A ValueError that names the node, the input, what was expected and what came."""
    return ValueError(f"{node}: input '{name}' must be {expected}; got {got}")


def describe_value(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)} ({str(x.dtype).replace('torch.', '')})"
    if x is None:
        return "nothing (is the input connected?)"
    return f"a {type(x).__name__}"


def check_tensor(node: str, name: str, x: Any, ranks: Sequence[int], layout: str) -> torch.Tensor:
    """Return ``x`` if it is a floating tensor of one of ``ranks``; otherwise raise naming node and input."""
    if not isinstance(x, torch.Tensor):
        raise input_error(node, name, f"a TENSOR {layout}", describe_value(x))
    if x.ndim not in ranks:
        raise input_error(node, name, f"{'/'.join(map(str, ranks))}-D {layout}", describe_value(x))
    if not x.dtype.is_floating_point:
        raise input_error(node, name, "a floating-point tensor", describe_value(x))
    return x


def run_on_backend(choice: Optional[BackendChoice], fn: Callable[..., Any], *args: torch.Tensor) -> Any:
    """Run ``fn(*args)`` where ``choice`` says (default: the arguments' own device); results come back to CPU
    only when the choice moved them away from it.

    Torch backends move the arguments (and any nn.Module among them) to the device. ONNX/WebGPU choices go
    through the Genesis HeterogeneousExecutor.
    """
    if choice is None:
        return fn(*args)
    if choice.backend in TORCH_BACKENDS:
        dev = choice.torch_device
        moved = [a.to(dev) if isinstance(a, (torch.Tensor, torch.nn.Module)) else a for a in args]
        out = fn(*moved)
        return out
    from ..genesis_core.compute import HeterogeneousExecutor, ComputeBackend  # lazy: ONNX path only

    executor = HeterogeneousExecutor()
    executor.register_backend(ComputeBackend(choice.backend))
    return executor.execute_on_backend(ComputeBackend(choice.backend), fn, *args)


def tooltip(text: str, **options: Any) -> Dict[str, Any]:
    """Input options with a tooltip (every Genesis input has one)."""
    return dict(options, tooltip=text)
