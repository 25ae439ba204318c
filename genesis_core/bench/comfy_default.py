"""ComfyUI's default attention call, reproduced (ComfyUI need not be installed): the bench's baseline.

On CUDA, ComfyUI's ``comfy.ops`` calls ``F.scaled_dot_product_attention`` inside
``torch.nn.attention.sdpa_kernel([CUDNN_ATTENTION, FLASH_ATTENTION, EFFICIENT_ATTENTION, MATH],
set_priority=True)``; elsewhere (and on a torch without backend priorities) it calls SDPA plainly. Its
``attention_pytorch`` hands SDPA the BHND *views* of the contiguous [B, N, H, D] tensors its model made
(``view(b, -1, heads, dim_head).transpose(1, 2)``): the attention section gives this call the same views
as every other row (the ``comfyui-default`` row).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

COMFY_ROW = "comfyui-default"


def comfy_sdpa(device: torch.device) -> Callable:
    """SDPA as ComfyUI's ``comfy.ops`` calls it on ``device`` (see the module docstring)."""
    if device.type != "cuda":
        return F.scaled_dot_product_attention
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                 SDPBackend.MATH]
        sdpa_kernel(order, set_priority=True)
    except (ImportError, TypeError):  # torch without priorities: ComfyUI calls SDPA plainly then
        return F.scaled_dot_product_attention

    def sdpa(q, k, v, *args, **kwargs):
        with sdpa_kernel(order, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, *args, **kwargs)

    return sdpa


def comfy_default_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Callable[[], torch.Tensor]:
    """A no-argument function running ComfyUI's default attention on these BHND tensors (or views), as
    ``attention_pytorch`` calls it without a mask: ``dropout_p=0.0, is_causal=False``, default scale."""
    sdpa = comfy_sdpa(q.device)
    return lambda: sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False)
