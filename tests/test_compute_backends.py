"""ComputeBackend and detection: every member reported, reasons when missing, caching, ROCm vs CUDA."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from genesis_core.compute import backends as B
from genesis_core.compute import ComputeBackend, clear_detection_cache, detect_backends


@pytest.fixture(autouse=True)
def _fresh_detection():
    clear_detection_cache()
    yield
    clear_detection_cache()


def test_enum_values_match_spec():
    assert [(m.name, m.value) for m in ComputeBackend] == [
        ("CUDA", "cuda"), ("CPU", "cpu"), ("NPU", "npu"), ("MPS", "mps"), ("ONNX", "onnx"), ("ROCM", "rocm"),
        ("WEBGPU", "webgpu")]
    assert ComputeBackend.CUDA == "cuda" and str(ComputeBackend.ROCM) == "rocm"


@pytest.mark.parametrize("text,member", [("cuda", ComputeBackend.CUDA), ("CPU", ComputeBackend.CPU),
                                         (" webgpu ", ComputeBackend.WEBGPU), (ComputeBackend.MPS, ComputeBackend.MPS)])
def test_parse_accepts_values_and_names(text, member):
    assert ComputeBackend.parse(text) is member


@pytest.mark.parametrize("bad", ["tpu", "", 3, None])
def test_parse_rejects_unknown_with_the_accepted_values(bad):
    with pytest.raises(ValueError, match="one of 'cuda', 'cpu'.*got"):
        ComputeBackend.parse(bad)


def test_every_member_is_reported_available_or_with_a_reason():
    found = detect_backends()
    assert list(found) == list(ComputeBackend)
    for backend, status in found.items():
        assert status.backend is backend
        if status.available:
            assert status.reason is None and status.devices, status
        else:
            assert isinstance(status.reason, str) and len(status.reason) > 10, status
            assert status.describe().startswith(f"{backend.value}: missing - ")
    assert found[ComputeBackend.CPU].available and found[ComputeBackend.CPU].devices == ["cpu"]


def test_detection_is_cached_and_refresh_probes_again(monkeypatch):
    first = detect_backends()
    assert detect_backends()[ComputeBackend.CPU] is first[ComputeBackend.CPU]
    calls = []
    monkeypatch.setitem(B._PROBES, ComputeBackend.NPU,
                        lambda: calls.append(1) or B.BackendStatus(ComputeBackend.NPU, False, reason="patched probe"))
    assert detect_backends()[ComputeBackend.NPU].reason != "patched probe"  # cached: probe not called
    assert detect_backends(refresh=True)[ComputeBackend.NPU].reason == "patched probe"
    assert calls == [1]


def test_a_probe_that_raises_becomes_a_reason(monkeypatch):
    def boom():
        raise OSError("driver exploded")
    monkeypatch.setitem(B._PROBES, ComputeBackend.MPS, boom)
    status = B.backend_status(ComputeBackend.MPS, refresh=True)
    assert not status.available and "driver exploded" in status.reason


@pytest.mark.skipif(torch.version.cuda is not None, reason="this PyTorch has CUDA")
def test_cuda_missing_on_a_cpu_build_says_why():
    status = detect_backends()[ComputeBackend.CUDA]
    assert not status.available and "without CUDA" in status.reason


def test_hip_build_is_reported_as_rocm_not_cuda(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", "6.2.0", raising=False)
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    found = detect_backends(refresh=True)
    assert found[ComputeBackend.ROCM].available and found[ComputeBackend.ROCM].devices == ["cuda:0", "cuda:1"]
    assert not found[ComputeBackend.CUDA].available and "ROCM" in found[ComputeBackend.CUDA].reason


def test_cuda_build_without_gpu_reports_the_driver(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    found = detect_backends(refresh=True)
    assert "is_available() is False" in found[ComputeBackend.CUDA].reason
    assert "built with CUDA, not ROCm" in found[ComputeBackend.ROCM].reason


def test_onnx_lists_execution_providers():
    pytest.importorskip("onnxruntime")
    status = detect_backends()[ComputeBackend.ONNX]
    assert status.available and "CPUExecutionProvider" in status.devices


def test_importing_genesis_core_does_not_import_onnxruntime_or_wgpu():
    code = ("import sys, genesis_core, genesis_core.compute; "
            "bad = [m for m in ('onnxruntime', 'onnx', 'wgpu', 'torch_npu') if m in sys.modules]; "
            "assert not bad, bad")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(B.__file__))))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
