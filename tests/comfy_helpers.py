"""Shared helpers for the ComfyUI-facing tests (not a conftest: import it explicitly).

* :func:`load_pack` imports the repository root as a package, the way ComfyUI's custom-node loader does.
* :func:`attention_basic_reference` is an independent float64 reading of ComfyUI's ``attention_basic``
  contract (shapes, mask semantics, output layout), used to check the Genesis override.
* :func:`comfyui_path` finds a ComfyUI checkout through ``COMFYUI_PATH`` (tests skip without one).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Optional

import torch

REPO = Path(__file__).resolve().parent.parent
PACK_NAME = "genesis_pack_under_test"


def load_pack(name: str = PACK_NAME):
    """Import ``<repo>/__init__.py`` as package ``name`` (cached in sys.modules)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def comfyui_path() -> Optional[Path]:
    """The ComfyUI checkout named by ``COMFYUI_PATH`` if it looks real, else None."""
    raw = os.environ.get("COMFYUI_PATH")
    if not raw:
        return None
    path = Path(raw)
    if not path.is_absolute():
        path = (REPO / path).resolve()
    if not (path / "comfy" / "ldm" / "modules" / "attention.py").is_file():
        return None
    return path


def attention_basic_reference(q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False):
    """ComfyUI's ``attention_basic`` semantics in float64 (independent implementation).

    q/k/v: ``[B, N, heads*D]`` or, with ``skip_reshape``, ``[B, heads, N, D]``.
    mask: additive float broadcast as ComfyUI does ([Nq,Nk] -> all batches and heads, [B,Nq,Nk] -> all
    heads, [B,H,Nq,Nk]); boolean masks are key-padding masks ``[B, ..., Nk]`` (True = attend).
    Returns ``[B, Nq, heads*Dv]`` or, with ``skip_output_reshape``, ``[B, heads, Nq, Dv]``.
    """
    q, k, v = (t.detach().to(torch.float64) for t in (q, k, v))
    if skip_reshape:
        b = q.shape[0]
    else:
        b = q.shape[0]

        def split(t):
            return t.reshape(t.shape[0], t.shape[1], heads, t.shape[2] // heads).permute(0, 2, 1, 3)

        q, k, v = split(q), split(k), split(v)
    d = q.shape[-1]
    scores = torch.matmul(q, k.transpose(-1, -2)) / (d ** 0.5)  # [B, H, Nq, Nk]
    if mask is not None:
        if mask.dtype == torch.bool:
            keep = mask.reshape(mask.shape[0], -1)  # [B, Nk]
            keep = keep[:, None, None, :]
            scores = scores.masked_fill(~keep, float("-inf"))
        else:
            m = mask.to(torch.float64)
            if m.ndim == 2:
                m = m[None, None]
            elif m.ndim == 3:
                m = m[:, None]
            scores = scores + m
    p = torch.softmax(scores, dim=-1)
    out = torch.matmul(p, v)  # [B, H, Nq, Dv]
    if skip_output_reshape:
        return out
    return out.permute(0, 2, 1, 3).reshape(b, out.shape[2], -1)
