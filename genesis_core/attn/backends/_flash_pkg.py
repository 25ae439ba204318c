"""Helpers shared by the FlashAttention-package backends (fa2, fa3, fa4) and the SageAttention ones.

* finding and importing the packages: :func:`fa3_module` (FA3's two interface modules), the
  ``nvidia-cutlass-dsl`` path fix FA4 needs after ``pip install --target`` (:func:`add_cutlass_dsl_path`),
  versions of distributions that may be absent (:func:`dist_version`);
* BNHD plumbing: :func:`bnhd` (the [B, N, H, D] view of a BHND call tensor, never a copy), :func:`first`;
* the probe: :func:`probe_call` runs a backend's ``run`` once on a tiny call shaped as ComfyUI shapes its
  inputs (contiguous [B, N, H, D], handed over as BHND views), with the memory its output will land in
  filled with NaN beforehand (:func:`poisoned_memory`), and judges the result against float64 with
  :func:`verdict` (a pure function: a kernel that never writes its output is refused, with that reason).

Imports only torch, the registry's leaves and the backends' :mod:`._common`.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from types import ModuleType
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch

from ..._log import first_line
from ..types import AttentionCall
from ._common import module_present, package_version

# (interface module, label, distribution names, build-config module)
FA3_MODULES: Tuple[Tuple[str, str, Tuple[str, ...], str], ...] = (
    ("flash_attn_interface", "FlashAttention-3 (flash_attn_interface)", ("flash_attn_3", "flash-attn-3"),
     "flash_attn_config"),
    ("fa3_fwd_interface", "FlashAttention-3 forward-only (fa3_fwd_interface, PyPI fa3-fwd)", ("fa3_fwd", "fa3-fwd"),
     "fa3_fwd_config"),
)
FA3_PIP = ("build FlashAttention-3 from hopper/ of Dao-AILab/flash-attention (module flash_attn_interface), "
           "or pip install fa3-fwd (forward only, bfloat16)")


def probe_device() -> Optional[str]:
    """The device probes run on: ``"cuda"`` where CUDA is available, else None (tests substitute ``"cpu"``)."""
    return "cuda" if torch.cuda.is_available() else None


def installed(module: str) -> bool:
    """Whether ``module`` is importable in principle (already imported, or found without importing it)."""
    return module in sys.modules or module_present(module)


def dist_version(*dists: str) -> Optional[str]:
    """The version of the first of ``dists`` that is installed, or None."""
    for dist in dists:
        ver = package_version(dist)
        if ver is not None:
            return ver
    return None


def import_module(name: str) -> ModuleType:
    return importlib.import_module(name)


# ---------------------------------------------------------------- FA3


def fa3_module() -> Tuple[ModuleType, str]:
    """The FlashAttention-3 Python interface and its label: ``flash_attn_interface`` (the FA3 builds) if it
    imports, else ``fa3_fwd_interface`` (PyPI ``fa3-fwd``). Both offer ``flash_attn_func(q, k, v, softmax_scale=...)``
    on [B, N, H, D] tensors. Raises ImportError saying what was tried and why each failed."""
    tried = []
    for mod, label, _dists, _config in FA3_MODULES:
        if not installed(mod):
            tried.append(f"{mod}: not installed")
            continue
        try:
            return import_module(mod), label
        except Exception as exc:  # a build for another torch fails here ("undefined symbol ...")
            tried.append(f"{mod}: import failed ({first_line(exc)})")
    raise ImportError(f"no FlashAttention-3 module imports ({'; '.join(tried)}); {FA3_PIP}")


def fa3_installed() -> bool:
    return any(installed(mod) for mod, *_ in FA3_MODULES)


def fa3_version(module: ModuleType) -> Optional[str]:
    """The version of the FA3 distribution that provides ``module``."""
    for mod, _label, dists, _config in FA3_MODULES:
        if module.__name__ == mod:
            return dist_version(*dists) or getattr(module, "__version__", None)
    return getattr(module, "__version__", None)


def fa3_build_flags(module: ModuleType) -> Dict[str, bool]:
    """The build flags an FA3 build records in its config module (``FLASHATTENTION_DISABLE_FP16`` ...), or {}."""
    for mod, _label, _dists, config in FA3_MODULES:
        if module.__name__ == mod:
            try:
                return dict(import_module(config).CONFIG.get("build_flags", {}))
            except Exception:
                return {}
    return {}


# ---------------------------------------------------------------- FA4


def add_cutlass_dsl_path() -> Optional[str]:
    """Put ``nvidia_cutlass_dsl/dsl_packages`` on ``sys.path`` where the package's ``.pth`` file was not processed
    (``pip install --target`` does not process ``.pth`` files); returns the folder added, or None."""
    try:
        spec = importlib.util.find_spec("nvidia_cutlass_dsl")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = os.path.join(location, "dsl_packages")
        if os.path.isdir(path) and path not in sys.path:
            sys.path.insert(0, path)  # where the .pth would have put it
            importlib.invalidate_caches()
            return path
    return None


# ---------------------------------------------------------------- layout


def bnhd(t: torch.Tensor) -> torch.Tensor:
    """The [B, N, H, D] view of a BHND call tensor (for a BNHD caller: the caller's own tensor)."""
    return t.transpose(1, 2)


def first(out):
    """The output tensor of a kernel that returns ``out`` or ``(out, lse, ...)``."""
    return out[0] if isinstance(out, (tuple, list)) else out


def natural_bnhd(call: AttentionCall) -> bool:
    """Whether q, k and v are BHND views of contiguous [B, N, H, D] tensors (as ComfyUI makes them)."""
    return all(bnhd(t).is_contiguous() for t in (call.q, call.k, call.v))


# ---------------------------------------------------------------- the probe

POISON_COPIES = 8


@contextlib.contextmanager
def poisoned_memory(numel: int, dtype: torch.dtype, device: torch.device) -> Iterator[bool]:
    """Within the block, the CUDA caching allocator holds several free ``numel``-element blocks filled with NaN,
    kept apart by small live spacers so they do not merge; the kernel's output allocation (same size) is served
    from one of them, so an output it never writes reads as NaN. Yields whether memory was poisoned (CUDA only)."""
    if device.type != "cuda":
        yield False
        return
    blocks, spacers = [], []
    for _ in range(POISON_COPIES):
        blocks.append(torch.full((numel,), float("nan"), dtype=dtype, device=device))
        spacers.append(torch.empty(1, dtype=torch.uint8, device=device))
    blocks.clear()
    try:
        yield True
    finally:
        spacers.clear()


def reference(call: AttentionCall) -> torch.Tensor:
    """float64 attention of an unmasked call, BHND (grouped-query heads repeated)."""
    q, k, v = (t.double() for t in (call.q, call.k, call.v))
    if call.gqa:
        group = call.heads // call.kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return torch.softmax((q @ k.transpose(-1, -2)) * call.scale, dim=-1) @ v


def verdict(out, ref: torch.Tensor, max_rel: float, poisoned: bool = True) -> Optional[str]:
    """Why ``out`` is not the attention ``ref`` (float64, same shape) within relative L2 error ``max_rel``, or None.

    NaN where the reference is finite, with the output memory poisoned first, means the kernel returned memory it
    never wrote; so does an all-zero output where the reference is not zero (memory fresh from the driver)."""
    if not isinstance(out, torch.Tensor):
        return f"probe call returned {type(out).__name__}, expected a tensor of shape {tuple(ref.shape)}"
    if tuple(out.shape) != tuple(ref.shape):
        return f"probe call returned shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    o = out.detach().to(device=ref.device, dtype=torch.float64)
    if bool(torch.isnan(o).any()):
        if poisoned:
            return ("returns output memory it never wrote (NaN where the float64 reference is finite, "
                    "detected by a NaN-poisoned probe)")
        return "returns NaN where the float64 reference is finite"
    if not bool(torch.isfinite(o).all()):
        return "returns Inf where the float64 reference is finite"
    if not bool(o.any()) and bool(ref.any()):
        return "returns output memory it never wrote (all zeros where the float64 reference is not)"
    rel = float(torch.linalg.vector_norm(o - ref)) / max(float(torch.linalg.vector_norm(ref)), 1e-30)
    if rel > max_rel:
        return f"returns wrong results: relative L2 error {rel:.3g} against float64 (allowed {max_rel:.3g})"
    return None


def probe_inputs(device, dtype: torch.dtype, batch: int = 1, tokens: int = 128, heads: int = 2, kv_heads: int = 2,
                 head_dim: int = 64, seed: int = 0) -> AttentionCall:
    """A tiny call made as ComfyUI makes its inputs: contiguous [B, N, H, D] tensors, seen as BHND views."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    kv = (batch, tokens, kv_heads, head_dim)
    q, k, v = (torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in ((batch, tokens, heads, head_dim), kv, kv))
    return AttentionCall(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, head_dim ** -0.5)


def probe_call(run: Callable[[AttentionCall], torch.Tensor], device, dtype: torch.dtype, max_rel: float,
               head_dim: int = 64, heads: int = 2, kv_heads: int = 2, tokens: int = 128,
               refusal: Optional[Callable[[AttentionCall], Optional[str]]] = None) -> Optional[str]:
    """Run ``run`` once on a tiny call on ``device`` (memory poisoned first) and say why its result cannot be
    trusted (an exception, a wrong shape, unwritten or wrong output), or None when it matches float64.
    ``refusal`` (the backend's limits check) is asked first: a device outside them is named, nothing runs."""
    device = torch.device(device)
    call = probe_inputs(device, dtype, tokens=tokens, heads=heads, kv_heads=kv_heads, head_dim=head_dim)
    why = refusal(call) if refusal is not None else None
    if why is not None:
        return f"cannot run here: {why}"
    ref = reference(call)
    k_before = call.k.clone()
    numel = call.batch * call.heads * call.q_len * call.v_head_dim
    try:
        with torch.no_grad(), poisoned_memory(numel, dtype, device) as poisoned:
            out = run(call)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    except Exception as exc:
        return f"probe call failed: {first_line(exc)}"
    why = verdict(out, ref, max_rel, poisoned)
    if why is None and not torch.equal(call.k, k_before):
        why = "modifies its key input in place"
    return why


FA3_DIRECT_ARGS = ("q", "k", "v", "q_descale", "k_descale", "v_descale", "softmax_scale", "num_splits")


def fa3_fwd_op(mod) -> Optional[Callable]:
    """The compiled forward op behind an FA3 module's ``flash_attn_func`` (``fa3_fwd_cuda.fwd`` or
    ``flash_attn_3_cuda.fwd``) when its schema names :data:`FA3_DIRECT_ARGS`, else None. Calling it skips the
    wrapper's autograd Function and custom-op dispatch (hundreds of microseconds of host time per call)."""
    ops = getattr(mod, "fa3_fwd_cuda", None) or getattr(mod, "flash_attn_3_cuda", None)
    packet = getattr(ops, "fwd", None) if ops is not None else None
    if packet is None:
        return None
    op = getattr(packet, "default", packet)
    schema = getattr(op, "_schema", None)
    names = {a.name for a in getattr(schema, "arguments", ())}
    return op if set(FA3_DIRECT_ARGS) <= names else None


def run_bnhd(fn: Callable[..., object], call: AttentionCall) -> torch.Tensor:
    """``fn(q, k, v, softmax_scale=...)`` on the call's [B, N, H, D] views; its output as a BHND view."""
    out = first(fn(bnhd(call.q), bnhd(call.k), bnhd(call.v), softmax_scale=call.scale))
    return out.transpose(1, 2)


def direct_bnhd(fn: Callable[..., object]) -> Callable[..., torch.Tensor]:
    """A plain ``f(q, k, v)`` on BHND views with the default scale: ``fn`` on their [B, N, H, D] views."""
    def direct(q, k, v):
        return first(fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))).transpose(1, 2)

    return direct


__all__ = [
    "FA3_DIRECT_ARGS", "FA3_MODULES", "add_cutlass_dsl_path", "fa3_fwd_op", "bnhd", "direct_bnhd", "dist_version", "fa3_build_flags", "fa3_installed",
    "fa3_module", "fa3_version", "first", "installed", "natural_bnhd", "poisoned_memory", "probe_call", "probe_device",
    "probe_inputs", "reference", "run_bnhd", "verdict",
]
