"""Small shared pieces of the Genesis nodes: choice lists, the GENESIS_BACKEND value, input checks.

Nothing here imports ComfyUI at module level; ComfyUI objects (MODEL, LATENT, CONDITIONING) are used
through the attributes and methods ComfyUI documents for node authors.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from ..genesis_core.attn import AttentionType

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


_EXECUTOR = None
_EXECUTOR_LOCK = threading.Lock()


def executor_for(choice: BackendChoice):
    """The process-wide Genesis HeterogeneousExecutor, with a worker registered for ``choice``; returns
    (executor, worker name)."""
    from ..genesis_core.compute import HeterogeneousExecutor  # lazy: keeps importing the pack light

    global _EXECUTOR
    with _EXECUTOR_LOCK:
        if _EXECUTOR is None:
            _EXECUTOR = HeterogeneousExecutor()
        name = f"genesis-node:{choice}"
        if name not in _EXECUTOR.registered():
            _EXECUTOR.register_backend(choice.backend, choice.device, name=name)
        return _EXECUTOR, name


def run_on_backend(choice: Optional[BackendChoice], fn: Callable[..., Any], *tensors: torch.Tensor) -> Any:
    """Run ``fn(*tensors)`` on ``choice`` through the Genesis HeterogeneousExecutor (tensors are moved there,
    models that ``fn`` captures run there, results come back to the first tensor's device). Without a
    choice, ``fn`` runs where the tensors are."""
    if choice is None:
        return fn(*tensors)
    executor, name = executor_for(choice)
    return executor.execute_on_backend(name, fn, *tensors)


def tooltip(text: str, **options: Any) -> Dict[str, Any]:
    """Input options with a tooltip (every Genesis input has one)."""
    return dict(options, tooltip=text)


def install_progress() -> None:
    """Make the engine's long work (the autotuner measuring a new call shape) show ComfyUI's progress bar.

    The engine never imports ComfyUI; it calls the factory installed here. Outside a ComfyUI process the
    import fails when a bar is asked for, and the engine carries on without one.
    """
    from ..genesis_core import progress

    def comfy_bar(total: int):
        import comfy.utils  # ComfyUI's own module, present when ComfyUI runs this pack

        return comfy.utils.ProgressBar(total)

    progress.set_factory(comfy_bar)
