"""ComputeBackend and honest device detection.

:func:`detect_backends` reports every :class:`ComputeBackend` member as available (with its devices) or
missing (with the reason), probed once per process and cached; ``detect_backends(refresh=True)`` probes
again (after installing a package, or in tests).

Probes avoid side effects where they can: CUDA/ROCm are counted through ``torch.cuda.device_count()``
(NVML, no CUDA context); device names are only read when CUDA is already initialised. Optional packages
(``torch_npu``, ``onnxruntime``, ``wgpu``) are imported only here, on the first probe, never at
``import genesis_core``. The WebGPU probe really requests an adapter and a device, since an importable
package proves nothing about the driver.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import threading
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional, Union

import torch

from .._log import logger


class ComputeBackend(str, Enum):
    """The compute backends of the spec. String values are what nodes and the CLI accept."""

    CUDA = "cuda"
    CPU = "cpu"
    NPU = "npu"
    MPS = "mps"
    ONNX = "onnx"
    ROCM = "rocm"
    WEBGPU = "webgpu"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, value: Union["ComputeBackend", str]) -> "ComputeBackend":
        """``ComputeBackend.CUDA``, ``"cuda"`` or ``"CUDA"`` → ``ComputeBackend.CUDA``.

        Raises ``ValueError`` naming the accepted values when ``value`` is none of them.
        """
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            key = value.strip().lower()
            for member in cls:
                if key in (member.value, member.name.lower()):
                    return member
        raise ValueError(
            f"backend must be a ComputeBackend or one of {', '.join(repr(m.value) for m in cls)}; got {value!r}"
        )


# torch device type that each torch-run backend uses (ROCm builds of PyTorch use "cuda" device strings).
TORCH_DEVICE_TYPE: Dict[ComputeBackend, str] = {
    ComputeBackend.CUDA: "cuda",
    ComputeBackend.ROCM: "cuda",
    ComputeBackend.CPU: "cpu",
    ComputeBackend.NPU: "npu",
    ComputeBackend.MPS: "mps",
}


@dataclass
class BackendStatus:
    """What detection found for one backend.

    ``devices`` are torch device strings for torch backends (``"cuda:0"``), execution-provider names
    for ONNX, adapter descriptions for WebGPU. ``reason`` says why an unavailable backend is missing.
    ``details`` carries extra facts (versions, device names, which WebGPU route works).
    """

    backend: ComputeBackend
    available: bool
    devices: List[str] = field(default_factory=list)
    reason: Optional[str] = None
    details: Dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        """One line for ``info`` output: ``cuda: available (cuda:0)`` or ``npu: missing - torch_npu ...``."""
        if self.available:
            return f"{self.backend.value}: available ({', '.join(self.devices) or 'no devices listed'})"
        return f"{self.backend.value}: missing - {self.reason}"


_CACHE: Dict[ComputeBackend, BackendStatus] = {}
_LOCK = threading.RLock()


def _cuda_like(backend: ComputeBackend) -> BackendStatus:
    hip = getattr(torch.version, "hip", None)
    cuda = getattr(torch.version, "cuda", None)
    wanted_hip = backend is ComputeBackend.ROCM
    if wanted_hip and not hip:
        why = "PyTorch was built with CUDA, not ROCm (HIP)" if cuda else "PyTorch was built without ROCm (HIP)"
        return BackendStatus(backend, False, reason=f"{why} (torch {torch.__version__})")
    if not wanted_hip and not cuda:
        if hip:
            return BackendStatus(
                backend, False,
                reason=f"this PyTorch is a ROCm (HIP {hip}) build; its AMD GPUs are reported as ROCM, not CUDA")
        return BackendStatus(backend, False, reason=f"PyTorch {torch.__version__} was built without CUDA")
    if not torch.cuda.is_available():
        return BackendStatus(
            backend, False,
            reason="torch.cuda.is_available() is False: no GPU visible or the driver is missing/too old")
    count = torch.cuda.device_count()
    devices = [f"cuda:{i}" for i in range(count)]
    details: Dict[str, Any] = {"hip" if wanted_hip else "cuda": hip if wanted_hip else cuda}
    if torch.cuda.is_initialized():  # reading names initialises CUDA, so only do it when that already happened
        details["names"] = [torch.cuda.get_device_name(i) for i in range(count)]
    return BackendStatus(backend, True, devices, details=details)


def _probe_npu() -> BackendStatus:
    b = ComputeBackend.NPU
    if importlib.util.find_spec("torch_npu") is None:
        return BackendStatus(b, False, reason="torch_npu (Huawei Ascend) is not installed")
    try:
        importlib.import_module("torch_npu")
    except Exception as exc:
        return BackendStatus(b, False, reason=f"torch_npu failed to import: {type(exc).__name__}: {exc}")
    npu = getattr(torch, "npu", None)
    if npu is None or not npu.is_available():
        return BackendStatus(b, False, reason="torch_npu imported but torch.npu.is_available() is False")
    return BackendStatus(b, True, [f"npu:{i}" for i in range(npu.device_count())])


def _probe_mps() -> BackendStatus:
    b = ComputeBackend.MPS
    mps = getattr(torch.backends, "mps", None)
    if mps is None or not mps.is_built():
        return BackendStatus(b, False, reason="PyTorch was built without MPS (Apple Metal) support")
    if not mps.is_available():
        return BackendStatus(b, False, reason="MPS is built but not available (needs macOS 12.3+ on Apple Silicon)")
    return BackendStatus(b, True, ["mps:0"])


def _probe_cpu() -> BackendStatus:
    return BackendStatus(ComputeBackend.CPU, True, ["cpu"], details={"threads": torch.get_num_threads()})


def _probe_onnx() -> BackendStatus:
    b = ComputeBackend.ONNX
    if importlib.util.find_spec("onnxruntime") is None:
        return BackendStatus(b, False, reason="onnxruntime is not installed (pip install onnxruntime)")
    try:
        ort = importlib.import_module("onnxruntime")
        providers = list(ort.get_available_providers())
    except Exception as exc:
        return BackendStatus(b, False, reason=f"onnxruntime failed to import: {type(exc).__name__}: {exc}")
    details: Dict[str, Any] = {"version": getattr(ort, "__version__", "?")}
    if importlib.util.find_spec("onnx") is None:
        details["note"] = "the onnx package is missing, so torch.onnx.export cannot run"
    # ONNX Runtime lists the providers it was compiled with; a listed CUDA provider can still fail at
    # session creation when its libraries are missing. Sessions fall back per the provider list given.
    return BackendStatus(b, True, providers, details=details)


def _probe_webgpu_ort() -> Optional[str]:
    """None when ONNX Runtime's WebGpuExecutionProvider really runs a tiny graph, else the reason."""
    if importlib.util.find_spec("onnxruntime") is None:
        return "onnxruntime is not installed"
    ort = importlib.import_module("onnxruntime")
    if "WebGpuExecutionProvider" not in ort.get_available_providers():
        return "this onnxruntime build has no WebGpuExecutionProvider (pip install onnxruntime-webgpu)"
    try:
        import numpy as np
        from onnx import TensorProto, helper

        node = helper.make_node("Add", ["a", "b"], ["c"])
        info = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4]) for n in ("a", "b", "c")]
        graph = helper.make_graph([node], "probe", info[:2], info[2:])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        # ORT prints its EP failure and falls back to CPU; keep that text for the reason, off the console
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            sess = ort.InferenceSession(model.SerializeToString(), providers=["WebGpuExecutionProvider"])
        if "WebGpuExecutionProvider" not in sess.get_providers():
            detail = [ln.strip() for ln in captured.getvalue().splitlines() if "adapter" in ln or "EP Error" in ln]
            return ("WebGpuExecutionProvider is listed but could not start (the session fell back to "
                    + ", ".join(sess.get_providers()) + ")" + (f": {detail[-1][-200:]}" if detail else ""))
        a = np.arange(4, dtype=np.float32)
        out = sess.run(None, {"a": a, "b": a})[0]
        if not np.allclose(out, 2 * a):
            return "WebGpuExecutionProvider returned wrong numbers for a 4-element Add"
    except Exception as exc:
        return f"WebGpuExecutionProvider failed to run a tiny graph: {type(exc).__name__}: {exc}"
    return None


def _probe_webgpu() -> BackendStatus:
    b = ComputeBackend.WEBGPU
    reasons: List[str] = []
    devices: List[str] = []
    details: Dict[str, Any] = {}
    ort_reason = _probe_webgpu_ort()
    details["onnxruntime_ep"] = ort_reason is None
    if ort_reason is None:
        devices.append("onnxruntime:WebGpuExecutionProvider")
    else:
        reasons.append(f"onnxruntime route: {ort_reason}")
    # Local import: wgpu lives in our own webgpu.py and is imported only when probing.
    from . import webgpu as _wg

    info, wgpu_reason = _wg.probe_adapter()
    details["wgpu"] = info
    if wgpu_reason is None and info is not None:
        devices.append(f"wgpu:{info.get('device', '?')} ({info.get('backend_type', '?')}, {info.get('adapter_type', '?')})")
    else:
        reasons.append(f"wgpu route: {wgpu_reason}")
    if devices:
        details["routes_missing"] = reasons
        return BackendStatus(b, True, devices, details=details)
    return BackendStatus(b, False, reason="no WebGPU adapter initialises - " + "; ".join(reasons), details=details)


_PROBES = {
    ComputeBackend.CUDA: lambda: _cuda_like(ComputeBackend.CUDA),
    ComputeBackend.CPU: _probe_cpu,
    ComputeBackend.NPU: _probe_npu,
    ComputeBackend.MPS: _probe_mps,
    ComputeBackend.ONNX: _probe_onnx,
    ComputeBackend.ROCM: lambda: _cuda_like(ComputeBackend.ROCM),
    ComputeBackend.WEBGPU: _probe_webgpu,
}


def backend_status(backend: Union[ComputeBackend, str], refresh: bool = False) -> BackendStatus:
    """Detection result for one backend (probed once and cached unless ``refresh``)."""
    b = ComputeBackend.parse(backend)
    with _LOCK:
        if refresh or b not in _CACHE:
            try:
                status = _PROBES[b]()
            except Exception as exc:  # a probe must never take the process down
                status = BackendStatus(b, False, reason=f"probe failed: {type(exc).__name__}: {exc}")
            _CACHE[b] = status
            logger.debug("%s", status.describe())
        return _CACHE[b]


def detect_backends(refresh: bool = False) -> Dict[ComputeBackend, BackendStatus]:
    """Every :class:`ComputeBackend` member → :class:`BackendStatus`, in enum order.

    Probed once per process and cached; ``refresh=True`` probes again.
    """
    return {b: backend_status(b, refresh=refresh) for b in ComputeBackend}


def available_backends(refresh: bool = False) -> List[ComputeBackend]:
    """The members that detection found available, in enum order."""
    return [b for b, s in detect_backends(refresh).items() if s.available]


def clear_detection_cache() -> None:
    """Forget every probe result (tests use this; the next question probes again)."""
    with _LOCK:
        _CACHE.clear()
