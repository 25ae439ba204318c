"""Bridges between ComfyUI's types and Genesis TENSOR tokens, a seeded tensor source, and GenesisTensorInfo."""
from __future__ import annotations

import math

import torch

from ..genesis_core._memory import over_limit
from ..genesis_core.comfyui import ComfyUINodeInterface, register_comfyui_node
from ._common import TENSOR, check_tensor, describe_value, input_error, tooltip


def latent_to_tokens(samples: torch.Tensor) -> torch.Tensor:
    """[B, C, *spatial] -> [B, prod(spatial), C]."""
    b, c = samples.shape[:2]
    return samples.reshape(b, c, -1).transpose(1, 2).contiguous()


def tokens_to_latent(tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B, prod(spatial), C] -> [B, C, *spatial] with ``like``'s spatial shape."""
    b, n, c = tokens.shape
    spatial = tuple(like.shape[2:])
    return tokens.transpose(1, 2).reshape(b, c, *spatial).contiguous()


@register_comfyui_node("GenesisLatentToTensor", display_name="Genesis Latent To Tensor")
class GenesisLatentToTensor(ComfyUINodeInterface):
    CATEGORY = "genesis/tensor"
    DESCRIPTION = "Turns a LATENT [B, C, H, W] (or [B, C, T, H, W]) into tokens [B, H·W, C] for Genesis tensor nodes."
    RETURN_TYPES = (TENSOR,)
    RETURN_NAMES = ("tokens",)
    OUTPUT_TOOLTIPS = ("Latent tokens [B, H·W, C].",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"latent": ("LATENT", tooltip("The latent to flatten into tokens."))}}

    def execute(self, latent):
        node = "GenesisLatentToTensor"
        if not isinstance(latent, dict) or not isinstance(latent.get("samples"), torch.Tensor):
            raise input_error(node, "latent", "a LATENT (a dict with 'samples')", describe_value(latent))
        samples = latent["samples"]
        if samples.ndim < 3:
            raise input_error(node, "latent", "samples of rank >= 3 [B, C, H, W]", describe_value(samples))
        return (latent_to_tokens(samples),)


@register_comfyui_node("GenesisTensorToLatent", display_name="Genesis Tensor To Latent")
class GenesisTensorToLatent(ComfyUINodeInterface):
    CATEGORY = "genesis/tensor"
    DESCRIPTION = ("Turns tokens [B, H·W, C] back into a LATENT with the shape of a reference latent "
                   "(the one the tokens came from); the reference's other entries (noise mask, batch index) are kept.")
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The tokens as a latent with the reference's shape.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "tokens": (TENSOR, tooltip("Tokens [B, H·W, C].")),
                "like": ("LATENT", tooltip("Reference latent giving the shape [B, C, H, W] to restore.")),
            }
        }

    def execute(self, tokens, like):
        node = "GenesisTensorToLatent"
        tokens = check_tensor(node, "tokens", tokens, (3,), "[B, H·W, C]")
        if not isinstance(like, dict) or not isinstance(like.get("samples"), torch.Tensor):
            raise input_error(node, "like", "a LATENT (a dict with 'samples')", describe_value(like))
        ref = like["samples"]
        b, c = ref.shape[:2]
        n = math.prod(ref.shape[2:])
        if tuple(tokens.shape) != (b, n, c):
            raise input_error(node, "tokens", f"shape ({b}, {n}, {c}) to match the reference latent {tuple(ref.shape)}",
                              describe_value(tokens))
        out = dict(like)
        out["samples"] = tokens_to_latent(tokens, ref).to(ref.dtype)
        return (out,)


@register_comfyui_node("GenesisConditioningToTensor", display_name="Genesis Conditioning To Tensor")
class GenesisConditioningToTensor(ComfyUINodeInterface):
    CATEGORY = "genesis/tensor"
    DESCRIPTION = "Takes the token embeddings [B, M, C] out of a CONDITIONING (one entry of it) as a TENSOR."
    RETURN_TYPES = (TENSOR,)
    RETURN_NAMES = ("tokens",)
    OUTPUT_TOOLTIPS = ("The conditioning's token embeddings [B, M, C].",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "conditioning": ("CONDITIONING", tooltip("Conditioning from a text encoder.")),
                "index": ("INT", tooltip("Which entry of the conditioning list.", default=0, min=0, max=1024)),
            }
        }

    def execute(self, conditioning, index=0):
        node = "GenesisConditioningToTensor"
        if not isinstance(conditioning, (list, tuple)) or not conditioning:
            raise input_error(node, "conditioning", "a non-empty CONDITIONING list", describe_value(conditioning))
        if not 0 <= index < len(conditioning):
            raise input_error(node, "index", f"in 0..{len(conditioning) - 1}", index)
        entry = conditioning[index]
        cond = entry[0] if isinstance(entry, (list, tuple)) and entry else None
        if not isinstance(cond, torch.Tensor) or cond.ndim != 3:
            raise input_error(node, "conditioning", "entries of the form [tensor [B, M, C], {...}]", describe_value(cond))
        return (cond,)


@register_comfyui_node("GenesisRandomTensor", display_name="Genesis Random Tensor")
class GenesisRandomTensor(ComfyUINodeInterface):
    CATEGORY = "genesis/tensor"
    DESCRIPTION = "Makes tokens [B, N, D] of seeded standard-normal noise: a model-free source for trying the tensor nodes."
    RETURN_TYPES = (TENSOR,)
    RETURN_NAMES = ("tokens",)
    OUTPUT_TOOLTIPS = ("Random tokens [B, N, D] (float32, CPU).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "batch": ("INT", tooltip("B: batch size.", default=1, min=1, max=64)),
                "tokens": ("INT", tooltip("N: number of tokens.", default=64, min=1, max=16384)),
                "dim": ("INT", tooltip("D: features per token.", default=64, min=1, max=8192)),
                "seed": ("INT", tooltip("Random seed.", default=0, min=0, max=2**63 - 1)),
            }
        }

    def execute(self, batch=1, tokens=64, dim=64, seed=0):
        b, n, d = int(batch), int(tokens), int(dim)
        # Checked before the allocator sees it: at the widget maxima this is 32 GiB.
        why = over_limit(b * n * d * 4, "cpu")
        if why:
            raise ValueError(f"GenesisRandomTensor: a float32 tensor of batch x tokens x dim = {b} x {n} x {d} "
                             f"needs {why}; lower batch, tokens or dim")
        gen = torch.Generator().manual_seed(int(seed))
        return (torch.randn(b, n, d, generator=gen),)


STATS_CHUNK = 1 << 20  # elements per step of tensor_summary: its temporaries stay near 20 MiB at any size


def _chunks(x: torch.Tensor, n: int):
    """``x``'s elements as 1-D pieces of at most ``n`` (views where x is contiguous, else copies of <= n)."""
    if x.numel() <= n or x.dim() == 0:
        yield x.reshape(-1)
    elif x.is_contiguous():
        flat = x.view(-1)
        for i in range(0, flat.numel(), n):
            yield flat[i:i + n]
    else:
        per = x[0].numel()
        if per > n:
            for i in range(x.shape[0]):
                yield from _chunks(x[i], n)
        else:
            step = max(1, n // max(per, 1))
            for i in range(0, x.shape[0], step):
                yield x[i:i + step].reshape(-1)


def tensor_stats(x: torch.Tensor, chunk: int = STATS_CHUNK) -> dict:
    """min, max and mean of the finite values (None where there are none), the NaN count and the finite count,
    in bounded memory: ``chunk`` elements at a time, reductions only (no boolean indexing, which builds int64
    indices and a copy: about 7x the input)."""
    lo, hi, total, count, nans = math.inf, -math.inf, 0.0, 0, 0
    if x.is_complex():
        x = torch.view_as_real(x)  # the real and imaginary parts (a view)
    floating = x.is_floating_point()
    for c in _chunks(x.detach(), chunk):
        if floating:
            finite = torch.isfinite(c)
            k = int(finite.sum())
            nans += int(torch.isnan(c).sum())
            if k == 0:
                continue
            if k < c.numel():
                lo = min(lo, float(torch.where(finite, c, math.inf).min()))
                hi = max(hi, float(torch.where(finite, c, -math.inf).max()))
                total += float(torch.where(finite, c, 0).sum(dtype=torch.float64))
            else:
                lo, hi = min(lo, float(c.min())), max(hi, float(c.max()))
                total += float(c.sum(dtype=torch.float64))
            count += k
        elif c.numel():
            lo, hi = min(lo, float(c.min())), max(hi, float(c.max()))
            total += float(c.sum(dtype=torch.float64))
            count += c.numel()
    if not count:
        return {"min": None, "max": None, "mean": None, "nan": nans, "finite": 0}
    return {"min": lo, "max": hi, "mean": total / count, "nan": nans, "finite": count}


def tensor_summary(x: torch.Tensor) -> str:
    """Two lines: shape, dtype, device; then min/max/mean and NaN count (bounded memory: :func:`tensor_stats`)."""
    shape = "x".join(str(s) for s in x.shape) or "scalar"
    dtype = str(x.dtype).replace("torch.", "")
    st = tensor_stats(x)
    if st["finite"]:
        stats = f"min {st['min']:.4g}  max {st['max']:.4g}  mean {st['mean']:.4g}"
    else:
        stats = "no finite values"
    return f"shape [{shape}]  {dtype}  {x.device}\n{stats}  NaN {st['nan']}"


@register_comfyui_node("GenesisTensorInfo", display_name="Genesis Tensor Info")
class GenesisTensorInfo(ComfyUINodeInterface):
    CATEGORY = "genesis/tensor"
    DESCRIPTION = "Shows a tensor's shape, dtype, device, min/max/mean and NaN count on the node, and passes the text on."
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("info",)
    OUTPUT_TOOLTIPS = ("The same summary as text.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"tensor": (TENSOR, tooltip("Any Genesis TENSOR to inspect."))}}

    def execute(self, tensor):
        if not isinstance(tensor, torch.Tensor):
            raise input_error("GenesisTensorInfo", "tensor", "a TENSOR", describe_value(tensor))
        text = tensor_summary(tensor)
        return {"ui": {"text": [text]}, "result": (text,)}
