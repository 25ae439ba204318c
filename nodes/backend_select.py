"""GenesisBackendSelect: choose a compute backend and device from what this machine really has."""
from __future__ import annotations

from typing import Optional

import torch

from ..genesis_core.comfyui import ComfyUINodeInterface, register_comfyui_node
from ..genesis_core.compute.backends import ComputeBackend, detect_backends
from ._common import COMPUTE_CHOICES, GENESIS_BACKEND, TORCH_BACKENDS, BackendChoice, tooltip

NODE = "GenesisBackendSelect"
# "auto" prefers accelerators, then CPU; ONNX/WebGPU are only used when asked for by name.
AUTO_ORDER = ("cuda", "rocm", "mps", "npu", "cpu")


def resolve_backend(backend: str, device_index: int = 0) -> BackendChoice:
    """The BackendChoice for a node's ``backend``/``device_index`` inputs.

    Raises:
        ValueError: the backend is unknown, not present here (with the reason and what is present), or
            ``device_index`` is outside the devices it has.
    """
    status = detect_backends()
    if backend == "auto":
        for name in AUTO_ORDER:
            s = status[ComputeBackend(name)]
            if s.available:
                backend = name
                break
    try:
        member = ComputeBackend.parse(backend)
    except ValueError:
        raise ValueError(f"{NODE}: input 'backend' must be one of {', '.join(COMPUTE_CHOICES)}; got {backend!r}") from None
    s = status[member]
    if not s.available:
        present = ", ".join(b.value for b, st in status.items() if st.available) or "none"
        raise ValueError(f"{NODE}: input 'backend' is {member.value!r}, which is not available here: {s.reason}. "
                         f"Available: {present}")
    device: Optional[str] = None
    if member.value in TORCH_BACKENDS:
        devices = list(s.devices) or [member.value if member.value != "rocm" else "cuda"]
        if member.value == "cpu":
            devices = ["cpu"]
        if not 0 <= device_index < len(devices):
            raise ValueError(f"{NODE}: input 'device_index' must be in 0..{len(devices) - 1} for {member.value} "
                             f"(devices: {', '.join(devices)}); got {device_index}")
        device = devices[device_index]
    return BackendChoice(member.value, device, dict(s.details))


@register_comfyui_node(NODE, display_name="Genesis Backend Select")
class GenesisBackendSelect(ComfyUINodeInterface):
    """Pick a compute backend/device; optionally give a MODEL clone that loads there."""

    CATEGORY = "genesis/compute"
    DESCRIPTION = (
        "Chooses where Genesis nodes compute: cuda:N, rocm, mps, npu, cpu, onnx or webgpu, from what this "
        "server really has (marks show availability and why others are missing). With a MODEL connected it "
        "returns a clone whose load device is the chosen torch device; ComfyUI's model management moves the "
        "weights when the model is used, the input model stays where it was."
    )
    RETURN_TYPES = (GENESIS_BACKEND, "MODEL")
    RETURN_NAMES = ("backend", "model")
    OUTPUT_TOOLTIPS = ("The chosen backend and device, for other Genesis nodes.",
                       "A clone of the input model that loads on the chosen device (None when no model is connected).")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "backend": (list(COMPUTE_CHOICES), tooltip(
                    "Compute backend. auto = first present of cuda, rocm, mps, npu, cpu.", default="auto")),
                "device_index": ("INT", tooltip("Which device of that backend (cuda:N).", default=0, min=0, max=63)),
            },
            "optional": {
                "model": ("MODEL", tooltip("Optional model to load on the chosen device (cloned, not moved now).")),
            },
        }

    def execute(self, backend: str = "auto", device_index: int = 0, model=None):
        choice = resolve_backend(backend, int(device_index))
        out_model = None
        if model is not None:
            if not hasattr(model, "clone"):
                raise ValueError(f"{NODE}: input 'model' must be a ComfyUI MODEL; got a {type(model).__name__}")
            if choice.device is None:
                raise ValueError(f"{NODE}: input 'model' can only be placed on a torch device (cuda, rocm, mps, npu, cpu); "
                                 f"backend {choice.backend!r} has none")
            out_model = model.clone()
            # ComfyUI's model management (load_models_gpu) loads each ModelPatcher on its own load_device.
            out_model.load_device = torch.device(choice.device)
        return (choice, out_model)
