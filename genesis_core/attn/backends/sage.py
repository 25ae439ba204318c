"""``sage`` backend: SageAttention through its own dispatch, ``sageattention.sageattn``.

1.x (Triton, verified with 1.0.6): head_dim 64, 96 or 128 (its core.py: ``assert headdim in [64, 96, 128]``),
and wrong where the key length is not a multiple of its 64-key block (measured, see below). With
``smooth_k=True`` it subtracts the key mean *in place* (``k -= km``), which would modify the caller's keys:
Genesis passes a smoothed copy and ``smooth_k=False`` instead (softmax is invariant to a per-row constant).

2.x (CUDA kernels, built from thu-ml/SageAttention): ``sageattn`` picks a kernel per GPU (core.py): sm80 INT8
QK·FP16 PV (CUDA), sm86 the Triton kernel, sm89/sm120 INT8 QK·FP8 PV, sm90 the sm90 FP8 PV kernel. head_dim
<= 128 (smaller ones are padded to 64 or 128 by the library, larger raise). Every 2.x kernel smooths k by
default, out of place (``k - km`` inside its quantisation), and ``sageattn`` does not forward ``smooth_k``:
Genesis passes k as it is, no copy. The precision class is that of the kernel ``sageattn`` runs on this GPU,
set by the probe (:func:`dispatched`): ``int8`` for every kernel 1.x and 2.x run (8-bit Q·Kᵀ of smoothed keys;
the FP8 P·V of the sm89/sm90/sm120 kernels accumulates in FP32). Single kernels are the ``sage2_*`` backends
(:mod:`.sage2`).

Both: CUDA, float16/bfloat16, v's head_dim equal to q's, no mask, no backward, grouped-query attention native.
Inputs made as ComfyUI makes them (contiguous [B, N, H, D], seen as BHND views) go in as ``tensor_layout="NHD"``
views and come out as contiguous [B, N, H, D]; others go in as ``"HND"``.
"""
from __future__ import annotations

import importlib.util
import os
import re
import sys
from types import ModuleType
from typing import Optional, Tuple

import torch

from ..._log import first_line
from ..limits import HALF, Limits, capability
from ..registry import Backend, register
from ..types import AttentionCall
from . import _flash_pkg as pkg
from ._common import package_version

PIP = ("pip install sageattention (1.0.6, Triton); SageAttention 2.x: build thu-ml/SageAttention from source "
       "(python setup.py install)")
HEAD_DIMS_1X = (64, 96, 128)
MAX_HEAD_DIM_2X = 128
# SageAttention 1.0.6 is wrong when the key length is not a multiple of its 64-key block: measured on an
# H100 (torch 2.11, 2026-11-25, max-abs error over max-abs reference) 19-27% at Nk=77 (SDXL cross-attention),
# 13% at Nk=96, 11% at Nk=200, 2% at Nk=4097 (the bad block is diluted), against 1-3% at Nk=64, 128, 192,
# 320, 4096 and 4608. Genesis refuses those calls rather than return them.
KEY_BLOCK_1X = 64
PROBE_MAX_REL = 0.1  # the probe catches broken builds; the autotuner holds each call to its quality budget

# min_kv_len: with one key, k minus its mean (the smoothing) is all zeros and the INT8 scale is 0/0: NaN (seen on an
# H200, 2026-12-01, SageAttention 2.2.0 source build, Nq = Nk = 1).
LIMITS = Limits(devices=("cuda",), dtypes=HALF, max_head_dim=MAX_HEAD_DIM_2X, equal_v_head_dim=True, mask=False,
                min_kv_len=2,
                autograd=False)

_sageattn = None
_major_seen: Optional[int] = None
_kernel: str = "sageattn"  # what sageattn runs on the probed GPU


# ---------------------------------------------------------------- the package (shared with sage2)


def importlib_spec(name: str):
    """``importlib.util.find_spec(name)``, or None where finding it fails."""
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


def source_version() -> Optional[str]:
    """``version='...'`` from the setup.py beside an in-place source build (no package metadata), or None."""
    try:
        spec = importlib_spec("sageattention")
        root = os.path.dirname(os.path.dirname(spec.origin)) if spec and spec.origin else None
        text = open(os.path.join(root, "setup.py"), encoding="utf-8").read() if root else ""
    except OSError:
        return None
    m = re.search(r"version\s*=\s*['\"]([0-9][^'\"]*)['\"]", text)
    return m.group(1) if m else None


def version() -> Optional[str]:
    """The installed SageAttention version: package metadata, else the source tree's setup.py."""
    ver = package_version("sageattention")
    if ver is not None:
        return ver
    ver = source_version()
    return f"{ver} (source build)" if ver else None


def _major() -> int:
    """1 or 2 (cached; the probe looks again); 0 when unknown."""
    global _major_seen
    if _major_seen is None:
        _major_seen = find_major()
    return _major_seen


def find_major() -> int:
    """1 or 2 from the version; else 2 when the 2.x kernels' interface is there; 0 when unknown."""
    ver = version()
    if ver:
        try:
            return int(ver.split(".")[0])
        except ValueError:
            pass
    mod = sys.modules.get("sageattention")
    if mod is not None:
        return 2 if hasattr(mod, "sageattn_qk_int8_pv_fp16_cuda") else 1
    spec = importlib_spec("sageattention")
    if spec is not None and spec.submodule_search_locations:
        folder = list(spec.submodule_search_locations)[0]
        return 2 if os.path.exists(os.path.join(folder, "sm80_compile.py")) else 1
    return 0


def load() -> ModuleType:
    """Import sageattention (ImportError/OSError etc. propagate with the library's message)."""
    return pkg.import_module("sageattention")


def layout_args(call: AttentionCall) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """(q, k, v, tensor_layout) for SageAttention: the callers' [B, N, H, D] tensors as ``"NHD"`` where the call's
    BHND views come from contiguous [B, N, H, D] tensors, else the BHND views as ``"HND"``. Never a copy."""
    if pkg.natural_bnhd(call):
        return pkg.bnhd(call.q), pkg.bnhd(call.k), pkg.bnhd(call.v), "NHD"
    return call.q, call.k, call.v, "HND"


def as_bhnd(out: torch.Tensor, layout: str) -> torch.Tensor:
    return out.transpose(1, 2) if layout == "NHD" else out


def dispatched(cap: Tuple[int, int]) -> Tuple[str, str]:
    """(kernel name, precision class) of what 2.x's ``sageattn`` runs on compute capability ``cap`` (core.py)."""
    arch = f"sm{cap[0]}{cap[1]}"
    table = {"sm80": ("sageattn_qk_int8_pv_fp16_cuda", "int8"), "sm86": ("sageattn_qk_int8_pv_fp16_triton", "int8"),
             "sm89": ("sageattn_qk_int8_pv_fp8_cuda", "int8"), "sm90": ("sageattn_qk_int8_pv_fp8_cuda_sm90", "int8"),
             "sm120": ("sageattn_qk_int8_pv_fp8_cuda", "int8"), "sm121": ("sageattn_qk_int8_pv_fp8_cuda", "int8")}
    return table.get(arch, (f"none for {arch}", "int8"))


# ---------------------------------------------------------------- the sage backend


def _probe() -> Optional[str]:
    global _sageattn, _kernel, _major_seen
    _major_seen, _sageattn = None, None
    if not pkg.installed("sageattention"):
        return f"not installed ({PIP})"
    device = pkg.probe_device()
    if device is None:
        return "installed, but no CUDA device: SageAttention runs on CUDA only"
    try:
        mod = load()
        fn = mod.sageattn
    except Exception as exc:
        return f"import failed: {first_line(exc)}"
    _sageattn = fn
    if _major() >= 2:
        _kernel, backend.precision = dispatched(_device_cap(device))
    else:
        _kernel, backend.precision = "1.x Triton INT8-QK kernels", "int8"
    why = pkg.probe_call(run, device, torch.bfloat16, PROBE_MAX_REL, refusal=backend.refusal)
    if why is not None:
        _sageattn = None
        return f"sageattn ({_kernel}): {why}"
    return None


def _device_cap(device) -> Tuple[int, int]:
    dev = torch.device(device)
    return capability(dev) if dev.type == "cuda" else (0, 0)


# sageattn_qk_int8_pv_fp16_cuda wrote NaN for every key length from 2 to 32 on an H200 (2026-12-02, as sage2_fp16),
# and, with one head, now and then from 33 to 56 (head dims 40 and 48, 11 of 720 cells of one sweep; a GPU test drew
# it once at head dim 96, its key count not recorded). From 63 keys up nothing failed: one sweep with one head (63,
# 64, 65, 96 keys), three with two heads (64-300 keys; scripts/gpu/sage_edges.py). Served from 64 keys.
# 2.x's sageattn runs that kernel on compute capability 8.0 (A100): refused there too (inferred, not measured on one).
FP16_CUDA_MIN_KV_LEN = 64


def _unsupported(call: AttentionCall) -> Optional[str]:
    """What depends on the installed version: 1.x's head dims and its 64-key blocks; 2.x's FP16 P·V CUDA kernel
    (what sageattn runs on compute capability 8.0) needs at least 64 keys."""
    if _major() != 1:
        if call.kv_len < FP16_CUDA_MIN_KV_LEN and \
                dispatched(_device_cap(call.device))[0] == "sageattn_qk_int8_pv_fp16_cuda":
            return (f"key length {call.kv_len} not supported: sageattn runs sageattn_qk_int8_pv_fp16_cuda on this GPU, "
                    f"which needs at least {FP16_CUDA_MIN_KV_LEN} keys (it returned NaN for fewer on an H200)")
        return None
    if call.head_dim not in HEAD_DIMS_1X:
        return f"head_dim {call.head_dim} not supported: needs one of {HEAD_DIMS_1X} (SageAttention 1.x)"
    if call.kv_len % KEY_BLOCK_1X:
        return (f"key length {call.kv_len} not supported: needs a multiple of {KEY_BLOCK_1X} (SageAttention 1.x "
                "returns up to 27% relative error there, measured on H100)")
    return None


def run(call: AttentionCall) -> torch.Tensor:
    q, k, v, layout = layout_args(call)
    if _major() == 1:  # 1.x would subtract the mean from the caller's k in place: smooth a copy instead
        k = k - k.mean(dim=1 if layout == "NHD" else 2, keepdim=True)
        out = _sageattn(q, k, v, tensor_layout=layout, is_causal=False, sm_scale=call.scale, smooth_k=False)
    else:  # 2.x smooths k itself, out of place
        out = _sageattn(q, k, v, tensor_layout=layout, is_causal=False, sm_scale=call.scale)
    return as_bhnd(out, layout)


def _description() -> str:
    backend.available()
    major = _major()
    if major == 1:
        return "sageattention.sageattn (1.x Triton INT8-QK kernels; Genesis smooths a copy of k)"
    if major >= 2:
        return f"sageattention.sageattn (2.x; on this GPU: {_kernel}, precision class {backend.precision})"
    return "sageattention.sageattn (unknown version)"


backend = register(
    Backend(
        name="sage",
        probe=_probe,
        limits=LIMITS,
        unsupported=_unsupported,
        precision="int8",  # until the probe says which kernel sageattn runs on this GPU
        run=run,
        description=_description,
        version=version,
    ),
    rank=20,
)
