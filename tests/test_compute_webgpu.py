"""WebGPU: the wgpu-py attention kernel (runs on lavapipe in CI) and the executor's WEBGPU backend.

Skips cleanly when no adapter initialises (CI installs mesa-vulkan-drivers + libvulkan1 and pip wgpu).
"""
from __future__ import annotations

import pytest
import torch

from genesis_core.compute import BackendUnavailableError, ComputeBackend, HeterogeneousExecutor, detect_backends
from genesis_core.compute import webgpu


def _adapter_or_skip():
    info, reason = webgpu.probe_adapter()
    if reason is not None:
        pytest.skip(f"no wgpu adapter: {reason}")
    return info


def _reference(q, k, v):
    q, k, v = q.double(), k.double(), v.double()
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v


@pytest.mark.parametrize("shape_q,shape_k,dv", [((2, 4, 70, 32), (2, 4, 77, 32), 32), ((3, 5, 16), (3, 9, 16), 8),
                                                ((1, 1, 1, 64), (1, 1, 1, 64), 64)])
def test_wgsl_attention_matches_float64(shape_q, shape_k, dv):
    _adapter_or_skip()
    q, k = torch.randn(shape_q) * 2, torch.randn(shape_k) * 2
    v = torch.randn(*shape_k[:-1], dv)
    out = webgpu.scaled_dot_product_attention(q, k, v)
    assert out.shape == (*shape_q[:-1], dv) and out.dtype == torch.float32
    err = (out.double() - _reference(q, k, v)).abs().max().item()
    assert err < 5e-6, err  # measured on lavapipe: ~1e-6


def test_wgsl_attention_rejects_bad_shapes():
    _adapter_or_skip()
    with pytest.raises(ValueError, match="attention shapes do not match"):
        webgpu.scaled_dot_product_attention(torch.randn(2, 4, 8), torch.randn(2, 4, 6), torch.randn(2, 4, 6))
    with pytest.raises(ValueError, match="head dim must be <= 256"):
        webgpu.scaled_dot_product_attention(torch.randn(1, 2, 8), torch.randn(1, 2, 8), torch.randn(1, 2, 300))


def test_wgsl_attention_inside_an_executor_call():
    _adapter_or_skip()
    ex = HeterogeneousExecutor()
    ex.register_backend("cpu")
    q, k, v = torch.randn(2, 10, 16), torch.randn(2, 12, 16), torch.randn(2, 12, 16)
    out = ex.execute_on_backend("cpu", webgpu.scaled_dot_product_attention, q, k, v)
    assert (out.double() - _reference(q, k, v)).abs().max().item() < 5e-6


def test_webgpu_detection_reports_adapter_or_reason():
    status = detect_backends()[ComputeBackend.WEBGPU]
    if status.available:
        assert status.devices and ("wgpu:" in status.devices[-1] or "WebGpu" in status.devices[0])
    else:
        assert "wgpu route" in status.reason and "onnxruntime route" in status.reason


def test_registering_webgpu_without_the_onnxruntime_provider_explains():
    status = detect_backends()[ComputeBackend.WEBGPU]
    if status.details.get("onnxruntime_ep"):
        pytest.skip("this machine has ONNX Runtime's WebGpuExecutionProvider")
    with pytest.raises(BackendUnavailableError, match="WebGpuExecutionProvider|no WebGPU adapter"):
        HeterogeneousExecutor().register_backend(ComputeBackend.WEBGPU)


def test_webgpu_backend_runs_functions_through_onnxruntime():
    status = detect_backends()[ComputeBackend.WEBGPU]
    if not status.details.get("onnxruntime_ep"):
        pytest.skip("needs onnxruntime-webgpu with a working adapter")
    ex = HeterogeneousExecutor()
    ex.register_backend(ComputeBackend.WEBGPU)
    q, k, v = torch.randn(2, 4, 64, 32), torch.randn(2, 4, 77, 32), torch.randn(2, 4, 77, 32)
    fn = lambda a, b, c: torch.softmax(a @ b.transpose(-1, -2) / 32 ** 0.5, dim=-1) @ c  # noqa: E731
    out = ex.execute_on_backend(ComputeBackend.WEBGPU, fn, q, k, v)
    assert (out.double() - _reference(q, k, v)).abs().max().item() < 1e-4


def test_probe_is_quiet_on_headless_linux():
    """Mesa's device-select layer makes libwayland print an XDG_RUNTIME_DIR error on every probe without a
    desktop session; the probe must still find the adapter, print nothing, and leave the environment as it was."""
    import os
    import subprocess
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("the XDG_RUNTIME_DIR message is a Linux (Wayland) thing")
    _adapter_or_skip()
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_RUNTIME_DIR", "NODEVICE_SELECT")}
    code = ("import os\n"
            "from genesis_core.compute import webgpu\n"
            "info, reason = webgpu.probe_adapter()\n"
            "assert reason is None, reason\n"
            "assert 'NODEVICE_SELECT' not in os.environ\n"
            "print('backend', info.get('backend_type'))\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "XDG_RUNTIME_DIR" not in done.stderr, done.stderr
    assert "backend" in done.stdout
