"""WebGPU through wgpu-py (wgpu-native): adapter probing and one real kernel.

Two WebGPU routes exist and Genesis uses both where they work:

* ONNX Runtime's ``WebGpuExecutionProvider`` (package ``onnxruntime-webgpu``, Dawn-based) runs arbitrary
  exported functions; the executor's WEBGPU backend uses it (see ``onnx.py``). Dawn refuses software Vulkan
  (Debian's lavapipe), so it needs a real GPU.
* wgpu-py (PyPI ``wgpu``) accepts lavapipe, so a CPU-only CI machine with ``mesa-vulkan-drivers`` and
  ``libvulkan1`` has a real (software) adapter. wgpu-py cannot run a PyTorch graph, so this module offers
  :func:`scaled_dot_product_attention`, a WGSL online-softmax attention kernel, which makes the WebGPU
  path testable and usable inside functions run by the executor.

``wgpu`` is imported only when :func:`probe_adapter` or the kernel is called.

Headless Linux. Mesa's Vulkan device-select layer (``VkLayer_MESA_device_select``, installed with
mesa-vulkan-drivers) connects to Wayland when a Vulkan instance is created, and libwayland prints
``error: XDG_RUNTIME_DIR is invalid or not set in the environment.`` to stderr - twice per probe - when no
session exists. The layer only picks a default GPU for a display, which a headless process has none of, so
on Linux without a valid ``XDG_RUNTIME_DIR`` the probe creates wgpu's instance with ``NODEVICE_SELECT=1``
(the layer's own off switch; restored right after, and never overriding a value the user set). Restricting
wgpu-native to its Vulkan backend (``set_instance_extras(backends=["Vulkan"])``) does *not* silence it
(tested here: the message comes from the Vulkan side, not the GL backend) and would lose the GL fallback.
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import sys
import threading
from typing import Any, Dict, Optional, Tuple

import torch

_LOCK = threading.Lock()
_STATE: Dict[str, Any] = {}  # "probed", "info", "reason", "device", "pipeline"

MAX_HEAD_DIM = 256  # the kernel keeps one accumulator row per invocation in private memory

_WGSL = """
struct Params { bh: u32, nq: u32, nk: u32, d: u32, dv: u32, scale: f32 };
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k: array<f32>;
@group(0) @binding(3) var<storage, read> v: array<f32>;
@group(0) @binding(4) var<storage, read_write> o: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    let h = gid.y;
    if (i >= p.nq || h >= p.bh) { return; }
    var acc: array<f32, 256>;
    for (var c = 0u; c < p.dv; c = c + 1u) { acc[c] = 0.0; }
    var m = -3.4028235e38;
    var l = 0.0;
    let qo = (h * p.nq + i) * p.d;
    for (var j = 0u; j < p.nk; j = j + 1u) {
        let ko = (h * p.nk + j) * p.d;
        var s = 0.0;
        for (var c = 0u; c < p.d; c = c + 1u) { s = s + q[qo + c] * k[ko + c]; }
        s = s * p.scale;
        let m_new = max(m, s);
        let corr = exp(m - m_new);
        let w = exp(s - m_new);
        l = l * corr + w;
        let vo = (h * p.nk + j) * p.dv;
        for (var c = 0u; c < p.dv; c = c + 1u) { acc[c] = acc[c] * corr + w * v[vo + c]; }
        m = m_new;
    }
    let oo = (h * p.nq + i) * p.dv;
    for (var c = 0u; c < p.dv; c = c + 1u) { o[oo + c] = acc[c] / l; }
}
"""


@contextlib.contextmanager
def _quiet_headless_vulkan():
    """On headless Linux, create the Vulkan instance without Mesa's device-select layer (see the module
    docstring); elsewhere, or when the user set ``NODEVICE_SELECT`` themselves, change nothing."""
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR")
    headless = not runtime_dir or not os.path.isdir(runtime_dir)
    if not sys.platform.startswith("linux") or not headless or "NODEVICE_SELECT" in os.environ:
        yield
        return
    os.environ["NODEVICE_SELECT"] = "1"
    try:
        yield
    finally:
        os.environ.pop("NODEVICE_SELECT", None)


def probe_adapter(refresh: bool = False) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """Request a wgpu adapter and device; return ``(adapter_info, None)`` or ``(None, reason)``.

    Cached per process; ``refresh=True`` probes again.
    """
    with _LOCK:
        if _STATE.get("probed") and not refresh:
            return _STATE.get("info"), _STATE.get("reason")
        _STATE.clear()
        info, reason = None, None
        if importlib.util.find_spec("wgpu") is None:
            reason = "wgpu is not installed (pip install wgpu; on Linux without a GPU also apt mesa-vulkan-drivers)"
        else:
            try:
                import wgpu

                with _quiet_headless_vulkan():  # wgpu creates its (process-wide) instance on the first request
                    adapter = wgpu.gpu.request_adapter_sync(power_preference="high-performance")
                if adapter is None:
                    reason = "wgpu found no adapter (no Vulkan/Metal/D3D12 driver; try mesa-vulkan-drivers)"
                else:
                    device = adapter.request_device_sync()
                    raw = adapter.info
                    info = {k: raw[k] for k in ("vendor", "device", "description", "adapter_type", "backend_type")
                            if k in raw}
                    info["wgpu"] = getattr(wgpu, "__version__", "?")
                    _STATE["device"] = device
            except Exception as exc:
                reason = f"wgpu could not initialise an adapter: {type(exc).__name__}: {exc}"
        _STATE.update(probed=True, info=info, reason=reason)
        return info, reason


def _device_and_pipeline():
    info, reason = probe_adapter()
    if reason is not None:
        raise RuntimeError(f"WebGPU (wgpu) is not available: {reason}")
    with _LOCK:
        if "pipeline" not in _STATE:
            device = _STATE["device"]
            module = device.create_shader_module(code=_WGSL)
            _STATE["pipeline"] = device.create_compute_pipeline(
                layout="auto", compute={"module": module, "entry_point": "main"})
        return _STATE["device"], _STATE["pipeline"]


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 scale: Optional[float] = None) -> torch.Tensor:
    """softmax(Q Kᵀ · scale) V on the wgpu adapter, float32, no mask.

    Shapes: query ``[..., Nq, D]``, key ``[..., Nk, D]``, value ``[..., Nk, Dv]`` with equal leading dims
    (e.g. BHND). Returns ``[..., Nq, Dv]`` on query's device and dtype. Dv is limited to
    ``MAX_HEAD_DIM``. Raises ``RuntimeError`` when no wgpu adapter initialises.
    """
    import numpy as np
    import wgpu

    if query.dim() < 2 or key.dim() != query.dim() or value.dim() != query.dim():
        raise ValueError(f"query, key and value must have the same rank >= 2; got shapes "
                         f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    lead = query.shape[:-2]
    if key.shape[:-2] != lead or value.shape[:-2] != lead or key.shape[-1] != query.shape[-1] \
            or value.shape[-2] != key.shape[-2]:
        raise ValueError(f"attention shapes do not match: query {tuple(query.shape)}, key {tuple(key.shape)}, "
                         f"value {tuple(value.shape)}")
    nq, d = query.shape[-2:]
    nk, dv = value.shape[-2:]
    if dv > MAX_HEAD_DIM:
        raise ValueError(f"value head dim must be <= {MAX_HEAD_DIM} for the WGSL kernel; got {dv}")
    bh = int(math.prod(lead)) if len(lead) else 1
    if bh > 65535:
        raise ValueError(f"batch*heads must be <= 65535 for one WebGPU dispatch; got {bh}")
    out_shape = (*lead, nq, dv)
    if bh == 0 or nq == 0:
        return query.new_zeros(out_shape)
    if nk == 0:
        raise ValueError("key must have at least one token; got 0")
    device, pipeline = _device_and_pipeline()
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(d)

    def host(t: torch.Tensor) -> memoryview:
        return memoryview(t.detach().to("cpu", torch.float32).contiguous().numpy()).cast("B")

    params = np.zeros(8, dtype=np.uint32)
    params[:5] = (bh, nq, nk, d, dv)
    params[5] = np.float32(scale).view(np.uint32)
    usage = wgpu.BufferUsage.STORAGE
    bufs = [
        device.create_buffer_with_data(data=memoryview(params).cast("B"), usage=wgpu.BufferUsage.UNIFORM),
        device.create_buffer_with_data(data=host(query), usage=usage),
        device.create_buffer_with_data(data=host(key), usage=usage),
        device.create_buffer_with_data(data=host(value), usage=usage),
        device.create_buffer(size=bh * nq * dv * 4, usage=usage | wgpu.BufferUsage.COPY_SRC),
    ]
    bind = device.create_bind_group(
        layout=pipeline.get_bind_group_layout(0),
        entries=[{"binding": i, "resource": {"buffer": b, "offset": 0, "size": b.size}} for i, b in enumerate(bufs)])
    encoder = device.create_command_encoder()
    cpass = encoder.begin_compute_pass()
    cpass.set_pipeline(pipeline)
    cpass.set_bind_group(0, bind)
    cpass.dispatch_workgroups((nq + 63) // 64, bh, 1)
    cpass.end()
    device.queue.submit([encoder.finish()])
    raw = device.queue.read_buffer(bufs[4])
    out = torch.frombuffer(bytearray(raw), dtype=torch.float32).reshape(out_shape)
    return out.to(device=query.device, dtype=query.dtype)
