"""``fa4`` backend: FlashAttention-4 (``flash_attn.cute.flash_attn_func``, PyPI ``flash-attn-4``), written in the
CUTLASS CuTe DSL (``nvidia-cutlass-dsl``) and compiled at the first call of each configuration.

Limits, from flash_attn/cute/interface.py (4.0.0b36) and the package's README (Hopper and Blackwell):
float16/bfloat16 (its FP8 path is SM100-only), compute capability 9.0 or newer, head_dim a multiple of
16 bytes / element size = 8, <= 256 on Hopper (``_validate_head_dims``); on SM100/SM110 head_dim <= 128 or
exactly 256 (refused per call). v's head_dim equal to q's (Hopper would take others; not offered here),
no arbitrary mask, grouped-query attention native. Forward only here: Genesis serves it without autograd.

Compiling: the first call of a new configuration (dtype, head dims, query heads per kv head) compiles the
kernel, which takes seconds. That call is timed (``Backend.first_call_s``, :func:`first_calls`) and logged
once ("[Genesis] fa4: first call of ... compiled in X s"); the autotuner's warm-up run and the bench's
untimed first call pay it, never a timed sample. ``FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1`` makes FA4 keep
compiled kernels on disk across processes.

``pip install --target`` does not process ``nvidia-cutlass-dsl``'s ``.pth`` file, which puts
``nvidia_cutlass_dsl/dsl_packages`` on the path; the probe adds that folder itself when it is missing.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Dict, Optional, Tuple

import torch

from ..._log import first_line, log_once
from ..limits import HALF, Limits, capability, dtype_name
from ..registry import Backend, register
from ..types import AttentionCall
from . import _flash_pkg as pkg

PIP = "pip install flash-attn-4 (it pulls nvidia-cutlass-dsl; on CUDA 13: pip install 'flash-attn-4[cu13]')"
CORE_PIP = "pip install nvidia-cutlass-dsl-libs-core matching your nvidia-cutlass-dsl version"
LIMITS = Limits(dtypes=HALF, devices=("cuda",), max_head_dim=256, head_dim_multiple=8, equal_v_head_dim=True,
                mask=False, min_capability=(9, 0), autograd=False)
TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 2e-2}
PROBE_HEAD_DIM = 128  # the probe compiles the configuration most image/video models use (Flux, Wan, SD3)

_fn: Optional[Callable] = None
_path_added: Optional[str] = None
_compiled: Dict[tuple, float] = {}  # configuration -> seconds its first call took
_compile_lock = threading.Lock()


def _installed() -> bool:
    return pkg.dist_version("flash-attn-4") is not None or pkg.installed("flash_attn.cute")


def _probe() -> Optional[str]:
    global _fn, _path_added
    _fn = None
    if not _installed():
        return f"not installed ({PIP})"
    device = pkg.probe_device()
    if device is None:
        return "installed, but no CUDA device: FlashAttention-4 runs on CUDA only"
    _path_added = pkg.add_cutlass_dsl_path()
    try:
        fn = pkg.import_module("flash_attn.cute").flash_attn_func
    except Exception as exc:
        text = first_line(exc)
        if "cutlass.cute" in text or "cutlass'" in text:
            return (f"import failed: {text} (the CuTe Python package comes in nvidia-cutlass-dsl-libs-core, which "
                    f"nvidia-cutlass-dsl-libs-base requires; an install made with --no-deps misses it: {CORE_PIP})")
        return f"import failed: {text} ({PIP})"
    _fn = fn
    why = pkg.probe_call(run, device, torch.bfloat16, TOLERANCE[torch.bfloat16], head_dim=PROBE_HEAD_DIM,
                         refusal=backend.refusal)
    if why is not None:
        _fn = None
    return why


def _unsupported(call: AttentionCall) -> Optional[str]:
    """SM100/SM110 head dims (interface.py ``_validate_head_dims``): <= 128, or exactly 256."""
    if _arch_major(call) in (10, 11):
        d = call.head_dim
        if 128 < d < 256:
            return f"head_dim {d} not supported: needs <= 128 or 256 on compute capability 10.x/11.x"
    return None


def _arch_major(call: AttentionCall) -> Optional[int]:
    return capability(call.device)[0] if call.device.type == "cuda" else None


def config(call: AttentionCall) -> Tuple:
    """What FA4 compiles one kernel for: (dtype, head_dim, v head_dim, query heads per kv head)."""
    return call.dtype, call.head_dim, call.v_head_dim, call.heads // call.kv_heads


def _label(key: Tuple) -> str:
    dtype, d, dv, group = key
    dims = f"head_dim {d}" + (f"/{dv}" if dv != d else "")
    return f"{dtype_name(dtype)} {dims}" + (f", {group} query heads per kv head" if group > 1 else "")


def _first_call(call: AttentionCall, key: Tuple) -> torch.Tensor:
    """The first call of a configuration: compiled by FA4, timed and logged once."""
    cuda = call.device.type == "cuda"
    if cuda and torch.cuda.is_current_stream_capturing():
        return pkg.run_bnhd(_fn, call)  # cannot synchronise here; a compile inside a capture fails anyway
    with _compile_lock:
        if key in _compiled:
            return pkg.run_bnhd(_fn, call)
        if cuda:
            torch.cuda.synchronize(call.device)
        t0 = time.perf_counter()
        out = pkg.run_bnhd(_fn, call)
        if cuda:
            torch.cuda.synchronize(call.device)
        seconds = time.perf_counter() - t0
        _compiled[key] = seconds
        backend.first_call_s = max(_compiled.values())
    log_once(("fa4-compile", key), f"fa4: first call of {_label(key)} compiled in {seconds:.1f} s",
             level=logging.INFO)
    return out


def run(call: AttentionCall) -> torch.Tensor:
    key = config(call)
    if key not in _compiled:
        return _first_call(call, key)
    return pkg.run_bnhd(_fn, call)


def _direct(call: AttentionCall) -> Optional[Callable[..., torch.Tensor]]:
    if _fn is None or call.mask is not None:
        return None
    fast = pkg.direct_bnhd(_fn)
    key = config(call)
    if key in _compiled:
        return fast

    def direct_after_compile(q, k, v):  # this plan's configuration compiles at its first call
        if key in _compiled:
            return fast(q, k, v)
        return _first_call(AttentionCall(q, k, v, None, q.shape[-1] ** -0.5), key)

    return direct_after_compile


def first_calls() -> Dict[str, float]:
    """{configuration: seconds} of every first call (compile) seen in this process, the probe's included."""
    return {_label(k): s for k, s in _compiled.items()}


def _description() -> str:
    backend.available()
    text = "FlashAttention-4 (flash_attn.cute, CuTe DSL; forward only), compiled per configuration at its first call"
    if _compiled:
        text += "; " + ", ".join(f"{label} in {s:.1f} s" for label, s in first_calls().items())
    if _path_added:
        text += f"; added {_path_added} to sys.path (nvidia-cutlass-dsl's .pth file was not processed)"
    return text


def _version() -> Optional[str]:
    ver = pkg.dist_version("flash-attn-4")
    dsl = pkg.dist_version("nvidia-cutlass-dsl", "nvidia-cutlass-dsl-libs-base")
    if ver is None:
        return None
    return f"{ver} (nvidia-cutlass-dsl {dsl})" if dsl else ver


backend = register(
    Backend(
        name="fa4",
        probe=_probe,
        run=run,
        description=_description,
        version=_version,
        limits=LIMITS,
        unsupported=_unsupported,
        precision="exact",
        tolerance=dict(TOLERANCE),
        direct=_direct,
    ),
    rank=11,
)
