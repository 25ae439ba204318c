"""GenesisCrossAttention and GenesisAttentionMap: tokens attending to a context, and a picture of it."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..genesis_core._memory import over_limit
from ..genesis_core.attn.modules import CrossAttentionModule
from ..genesis_core.comfyui import ComfyUINodeInterface, register_comfyui_node
from ._common import ATTENTION_CHOICES, GENESIS_BACKEND, TENSOR, BackendChoice, check_tensor, run_on_backend, tooltip

MAX_SEED = 2**63 - 1


def build_module(node: str, query: torch.Tensor, context: torch.Tensor, num_heads: int, attention: str,
                 seed: int) -> CrossAttentionModule:
    """A CrossAttentionModule sized for ``query``/``context`` with weights drawn from ``seed`` (deterministic)."""
    dq, dc = query.shape[-1], context.shape[-1]
    if num_heads < 1 or dq % num_heads:
        raise ValueError(f"{node}: input 'num_heads' must divide the query's last dimension {dq}; got {num_heads}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        module = CrossAttentionModule(dq, dc, int(num_heads), backend=attention)
    return module.to(dtype=query.dtype).eval()


def _inputs(node: str, query, context, mask):
    query = check_tensor(node, "query", query, (3,), "[B, N, Dq]")
    context = check_tensor(node, "context", context, (3,), "[B, M, Dc]")
    if context.shape[0] not in (1, query.shape[0]):
        raise ValueError(f"{node}: input 'context' batch must be 1 or match query batch {query.shape[0]}; "
                         f"got shape {tuple(context.shape)}")
    context = context.expand(query.shape[0], -1, -1).to(query.dtype)
    if mask is not None and not isinstance(mask, torch.Tensor):
        raise ValueError(f"{node}: input 'mask' must be a TENSOR [B, M] (True/1 = attend); got a {type(mask).__name__}")
    if mask is not None and mask.dtype != torch.bool:
        mask = mask > 0.5  # 0/1 masks from image-like sources: 1 = attend
    return query, context, mask


@register_comfyui_node("GenesisCrossAttention", display_name="Genesis Cross Attention")
class GenesisCrossAttention(ComfyUINodeInterface):
    CATEGORY = "genesis/attention"
    DESCRIPTION = (
        "Query tokens [B, N, Dq] attend to context tokens [B, M, Dc] through a multi-head cross-attention "
        "layer whose weights are drawn from 'seed' (same seed, same layer). Output: [B, N, Dq]. Use the "
        "Genesis bridges to turn latents or conditioning into tokens and back."
    )
    RETURN_TYPES = (TENSOR,)
    RETURN_NAMES = ("tokens",)
    OUTPUT_TOOLTIPS = ("The attended tokens [B, N, Dq], on the input's device.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "query": (TENSOR, tooltip("Query tokens [B, N, Dq] (e.g. image latent tokens).")),
                "context": (TENSOR, tooltip("Context tokens [B, M, Dc] (e.g. text conditioning).")),
                "num_heads": ("INT", tooltip("Attention heads; must divide Dq.", default=4, min=1, max=128)),
                "attention": (list(ATTENTION_CHOICES), tooltip("Attention backend for this layer.", default="auto")),
                "seed": ("INT", tooltip("Seed for the layer's weights (deterministic).", default=0, min=0, max=MAX_SEED)),
            },
            "optional": {
                "backend": (GENESIS_BACKEND, tooltip("Where to compute (from Genesis Backend Select); default: input's device.")),
                "mask": (TENSOR, tooltip("Optional key mask [B, M]: True or 1 = attend.")),
            },
        }

    def execute(self, query, context, num_heads=4, attention="auto", seed=0, backend: Optional[BackendChoice] = None,
                mask=None):
        node = "GenesisCrossAttention"
        query, context, mask = _inputs(node, query, context, mask)
        module = build_module(node, query, context, num_heads, attention, seed)
        home = query.device

        def run(q, c, *mk):
            with torch.inference_mode():
                return module(q, c, c, mask=mk[0] if mk else None)

        args = (query, context) + ((mask,) if mask is not None else ())
        out = run_on_backend(backend, run, *args)
        return (out.to(home),)


_COLORS = torch.tensor([[0.02, 0.02, 0.10], [0.35, 0.07, 0.50], [0.85, 0.25, 0.30], [0.99, 0.80, 0.30], [1.0, 1.0, 0.85]])


def colorize(values: torch.Tensor) -> torch.Tensor:
    """[..., H, W] values in [0, 1] -> [..., H, W, 3] RGB through a dark-to-bright palette."""
    x = values.clamp(0, 1) * (len(_COLORS) - 1)
    lo = x.floor().long().clamp(max=len(_COLORS) - 2)
    t = (x - lo).unsqueeze(-1)
    return _COLORS[lo] * (1 - t) + _COLORS[lo + 1] * t


def attention_image(weights: torch.Tensor, min_size: int = 256) -> torch.Tensor:
    """[B, H, N, M] weights -> IMAGE [B, rows, cols, 3]: head-averaged, each image scaled to its max,
    enlarged with nearest-neighbour so that small maps stay visible."""
    avg = weights.float().mean(dim=1)  # [B, N, M]
    peak = avg.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)
    norm = avg / peak
    n, m = norm.shape[-2:]
    scale = max(1, -(-min_size // max(1, min(n, m))))
    scale = min(scale, max(1, 2048 // max(n, m)))
    big = F.interpolate(norm.unsqueeze(1), scale_factor=scale, mode="nearest").squeeze(1)
    return colorize(big.cpu())


@register_comfyui_node("GenesisAttentionMap", display_name="Genesis Attention Map")
class GenesisAttentionMap(ComfyUINodeInterface):
    CATEGORY = "genesis/attention"
    DESCRIPTION = (
        "Shows what attended to what: the head-averaged attention weights of the cross-attention layer that "
        "Genesis Cross Attention builds from the same inputs and seed, as an IMAGE (rows: query tokens, "
        "columns: context tokens; bright = strong). Connect it to Preview Image."
    )
    RETURN_TYPES = ("IMAGE", TENSOR)
    RETURN_NAMES = ("image", "weights")
    OUTPUT_TOOLTIPS = ("Head-averaged attention map, one image per batch item.",
                       "The raw attention weights [B, H, N, M] (rows sum to 1).")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "query": (TENSOR, tooltip("Query tokens [B, N, Dq], as given to Genesis Cross Attention.")),
                "context": (TENSOR, tooltip("Context tokens [B, M, Dc], as given to Genesis Cross Attention.")),
                "num_heads": ("INT", tooltip("Attention heads; must divide Dq.", default=4, min=1, max=128)),
                "seed": ("INT", tooltip("Seed of the layer's weights; use the cross-attention node's seed.",
                                        default=0, min=0, max=MAX_SEED)),
            },
            "optional": {
                "mask": (TENSOR, tooltip("Optional key mask [B, M]: True or 1 = attend.")),
            },
        }

    def execute(self, query, context, num_heads=4, seed=0, mask=None):
        node = "GenesisAttentionMap"
        query, context, mask = _inputs(node, query, context, mask)
        # The map materialises [B, H, N, M] float32 weights (two of them at the softmax): checked before the
        # allocator sees it, since num_heads multiplies the inputs' sizes.
        b, n, m = query.shape[0], query.shape[1], context.shape[1]
        why = over_limit(2 * b * int(num_heads) * n * m * 4, query.device)
        if why:
            raise ValueError(f"{node}: attention weights [B={b}, H={num_heads}, N={n}, M={m}] in float32 (twice, "
                             f"at the softmax) need {why}; lower num_heads, or use fewer query or context tokens")
        module = build_module(node, query, context, num_heads, "auto", seed)
        with torch.inference_mode():
            weights = module.compute_attention_weights(query, context, mask=mask)
        return (attention_image(weights), weights)
