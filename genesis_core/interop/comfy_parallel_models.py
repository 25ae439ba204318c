"""Which ComfyUI models sequence mode can shard, and the block patches that shard them.

Every rank runs the whole model on its shard of the image / video tokens. ``transformer_options
["patches_replace"]["dit"]`` patches on every block cut the tokens at the first block (with their RoPE
frequencies, so each token keeps its position) and all-gather them after the last; text tokens stay whole on
every rank. Per model:

* **Wan** (``WanModel``): video tokens and their RoPE cut, per-token timesteps (Wan 2.2 TI2V) cut too; the
  cross-attention to the text runs locally. Shards are at least ``text length + 1`` tokens long, so a
  self-attention call is never mistaken for a cross-attention one.
* **Flux**: double blocks attend ``[text, image]`` (text joint in front), single blocks run on ``[text, image
  shard]``; no attention mask.
* **SD3** (``MMDiT``, SD3 / SD3.5): each joint block attends ``[context, image]`` (context joint in front);
  SD3.5's extra image-only self-attention (``x_block_self_attn``) is sharded with no joint tokens; the last
  block's context-pre-only half needs nothing; the sin-cos position embedding is added before the first block.
* **HunyuanVideo** (also HunyuanImage 2.1): double blocks attend ``[image, text]`` (text joint behind), single
  blocks run on ``[image shard, text]``; RoPE over (t, h, w) cut with the tokens; the text mask is a key mask
  over the whole sequence, exact on every rank (:func:`~genesis_core.parallel.sequence.sequence_attention`);
  the first-frame modulation of image-to-video (``guiding_frame_index``) follows each rank's token range.

This module never imports ComfyUI; it recognises ComfyUI's classes by their methods' qualified names.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

from .comfy_parallel_attn import BlockPatches, SequenceAttentionOverride, Shard

__all__ = ["model_family", "sequence_support", "sequence_transformer_options", "SUPPORTED", "local_ranges"]

SUPPORTED = "ComfyUI's Flux, Wan (WanModel), SD3 / SD3.5 (MMDiT) and HunyuanVideo / HunyuanImage 2.1"

_FAMILIES = {"WanModel.forward_orig": "wan", "Flux.forward_orig": "flux", "HunyuanVideo.forward_orig": "hunyuan",
             "MMDiT.forward_core_with_concat": "sd3"}


def model_family(diffusion_model) -> Optional[str]:
    """``"wan"`` / ``"flux"`` / ``"sd3"`` / ``"hunyuan"`` for ComfyUI's WanModel / Flux / MMDiT / HunyuanVideo
    (their own forward, not a subclass's that replaces it), else None."""
    for method in ("forward_orig", "forward_core_with_concat"):
        fn = getattr(type(diffusion_model), method, None)
        family = _FAMILIES.get(getattr(fn, "__qualname__", ""))
        if family:
            return family
    return None


def sequence_support(diffusion_model, ulysses: int, ring: int = 1) -> Optional[str]:
    """None if ``diffusion_model`` can be sharded ``ulysses x ring`` ways, else the reason as a sentence."""
    name = type(diffusion_model).__name__
    family = model_family(diffusion_model)
    if family is None:
        return (f"sequence mode supports {SUPPORTED} diffusion models; this model is {name} (its blocks take "
                f"inputs Genesis does not know how to shard); use mode 'cfg'")
    heads = int(getattr(diffusion_model, "num_heads", 0))
    if ulysses > 1 and heads % ulysses:
        return (f"the model's {heads} attention heads do not divide among {ulysses} Ulysses ranks; choose a ring "
                f"degree so that gpus / ring divides {heads}")
    if family in ("flux", "hunyuan") and len(diffusion_model.double_blocks) == 0:
        return f"this {name} configuration has no double blocks, where Genesis cuts the image tokens"
    if family == "sd3" and len(getattr(diffusion_model, "joint_blocks", ())) == 0:
        return "this SD3 configuration has no joint blocks, where Genesis cuts the image tokens"
    return None


def local_ranges(dims, start: int, real: int, length: int, total: int, tail: int = 0):
    """ComfyUI modulation ranges ``[(first, end or None, index)]`` over the whole sequence (``total`` sharded
    tokens, then ``tail`` joint tokens) -> the same ranges over this rank's tokens (its ``real`` tokens from
    ``start``, padded to ``length``, then the tail). None stays None (every token modulated alike)."""
    if dims is None:
        return None
    out = []
    for a, b, idx in dims:
        a, b = (a or 0), (total + tail if b is None else b)
        lo, hi = max(a, start), min(b, start + real)
        if lo < hi:
            out.append((lo - start, hi - start, idx))
        lo, hi = max(a, total), min(b, total + tail)
        if lo < hi:
            out.append((length + lo - total, length + hi - total, idx))
    return out


class _StackBlocks(BlockPatches):
    """One stack of ``n`` blocks (ComfyUI's ``double_block`` patches): the first block shards the image tokens,
    every block runs on the shard, the last gathers them. Subclasses say how the first block shards."""

    def __init__(self, mesh, n_blocks: int):
        super().__init__(mesh)
        self.n = n_blocks

    def enter(self, args: Dict[str, Any]):
        """(this rank's image shard, its :class:`Shard`) at the first block."""
        raise NotImplementedError

    def block_args(self, st: Shard, args: Dict[str, Any], x: torch.Tensor) -> Dict[str, Any]:
        return {**args, "img": x}

    def patch(self, i: int):
        def stack_block(args: Dict[str, Any], extra: Dict[str, Any]):
            x = args["img"]
            if i == 0:
                x, self.st = self.enter(args)
            st = self.st
            out = self.run(st, extra["original_block"], self.block_args(st, args, x))
            if i == self.n - 1:
                out["img"] = self.gather(out["img"], st.real)
                self.st = None
            return out

        return stack_block


class _WanBlocks(_StackBlocks):
    def enter(self, args: Dict[str, Any]):
        x, pe, vec, txt = args["img"], args["pe"], args["vec"], args["txt"]
        n = x.shape[1]
        minimum = txt.shape[1] + 1  # cross-attention keys are never as many as a shard
        x, length, real = self.split(x, 1, minimum)
        if pe is None or pe.shape[1] != n:
            raise ValueError(f"Wan sequence mode: RoPE frequencies must have one row per token ({n}); got "
                             f"{None if pe is None else tuple(pe.shape)}")
        pe = self.split(pe, 1, minimum)[0]
        if vec.dim() >= 2 and vec.shape[1] == n and n > 1:  # per-token timesteps (Wan 2.2 TI2V)
            vec = self.split(vec, 1, minimum)[0]
        elif vec.dim() >= 2 and vec.shape[1] != 1:
            raise ValueError(f"Wan sequence mode: a modulation with {vec.shape[1]} rows for {n} tokens "
                             "cannot be sharded; use mode 'cfg'")
        return x, Shard(n, length, real, pe=pe, vec=vec, joints={length: (0, 0)}, model="Wan")

    def block_args(self, st: Shard, args: Dict[str, Any], x: torch.Tensor) -> Dict[str, Any]:
        return {**args, "img": x, "pe": st.pe, "vec": st.vec}


class _FluxBlocks(BlockPatches):
    """Flux (text joint in front) and HunyuanVideo (``flipped``: text joint behind)."""

    def __init__(self, mesh, n_double: int, n_single: int, flipped: bool = False):
        super().__init__(mesh)
        self.n_double, self.n_single, self.flipped = n_double, n_single, flipped
        self.name = "HunyuanVideo" if flipped else "Flux"

    def double(self, i: int):
        def double_block(args: Dict[str, Any], extra: Dict[str, Any]):
            if not self.flipped and args.get("attn_mask") is not None:
                raise ValueError("Flux sequence mode cannot shard an attention mask; use mode 'cfg'")
            img = args["img"]
            if i == 0:
                nt, ni = args["txt"].shape[1], img.shape[1]
                img, length, real = self.split(img, 1)
                start = self.start_of(length, ni)
                pe = args["pe"]
                if pe is not None:
                    if pe.shape[2] != ni + nt:
                        raise ValueError(f"{self.name} sequence mode: RoPE frequencies must have one row per token "
                                         f"({ni + nt}); got shape {tuple(pe.shape)}")
                    txt_pe = pe.narrow(2, ni if self.flipped else 0, nt)
                    img_pe = self.split(pe.narrow(2, 0 if self.flipped else nt, ni), 2)[0]
                    pe = torch.cat((img_pe, txt_pe) if self.flipped else (txt_pe, img_pe), dim=2)
                joints = {length + nt: (0, nt) if self.flipped else (nt, 0)}
                self.st = Shard(ni, length, real, start=start, pe=pe, joints=joints, model=self.name,
                                mask_keys=ni + nt if self.flipped else None, extra={"nt": nt})
                if self.flipped:  # image-to-video: the first frame's tokens modulated apart, over this shard
                    self.st.extra["mods"] = local_ranges(args.get("modulation_dims_img"), start, real[
                        self.mesh.shard_index], length, ni)
            st = self.st
            new = {**args, "img": img, "pe": st.pe}
            if self.flipped:
                new["modulation_dims_img"] = st.extra["mods"]
            out = self.run(st, extra["original_block"], new)
            if i == self.n_double - 1 and self.n_single == 0:
                out["img"] = self.gather(out["img"], st.real)
                self.st = None
            return out

        return double_block

    def single(self, i: int):
        def single_block(args: Dict[str, Any], extra: Dict[str, Any]):
            if not self.flipped and args.get("attn_mask") is not None:
                raise ValueError("Flux sequence mode cannot shard an attention mask; use mode 'cfg'")
            st = self.st
            nt = st.extra["nt"]
            new = {**args, "pe": st.pe}
            if self.flipped:
                if i == 0:
                    st.extra["single_mods"] = local_ranges(args.get("modulation_dims"), st.start,
                                                           st.real[self.mesh.shard_index], st.length, st.total, nt)
                new["modulation_dims"] = st.extra["single_mods"]
            out = self.run(st, extra["original_block"], new)
            if i == self.n_single - 1:
                x = out["img"]
                if self.flipped:  # [image shard, text] -> [image, text]
                    out["img"] = torch.cat((self.gather(x.narrow(1, 0, st.length), st.real),
                                            x.narrow(1, st.length, nt)), dim=1)
                else:             # [text, image shard] -> [text, image]
                    out["img"] = torch.cat((x.narrow(1, 0, nt),
                                            self.gather(x.narrow(1, nt, x.shape[1] - nt), st.real)), dim=1)
                self.st = None
            return out

        return single_block


class _SD3Blocks(_StackBlocks):
    def enter(self, args: Dict[str, Any]):
        x, txt = args["img"], args.get("txt")
        nt = 0 if txt is None else txt.shape[1]
        n = x.shape[1]
        x, length, real = self.split(x, 1)
        # joint attention over [context, image shard]; SD3.5's image-only self-attention over the shard
        return x, Shard(n, length, real, start=self.start_of(length, n),
                        joints={length: (0, 0), nt + length: (nt, 0)}, model="SD3")


def sequence_transformer_options(diffusion_model, mesh, backend: str = "auto", ring_impl: str = "ring",
                                 quality: Optional[str] = None) -> Dict[str, Any]:
    """``transformer_options`` that shard ``diffusion_model`` over ``mesh``'s sequence group (raises if it cannot);
    ``backend`` and ``quality`` govern its attention calls (see :class:`SequenceAttentionOverride`)."""
    reason = sequence_support(diffusion_model, mesh.ulysses, mesh.ring)
    if reason:
        raise ValueError(reason)
    family = model_family(diffusion_model)
    dit: Dict[Any, Any] = {}
    if family in ("wan", "sd3"):
        n = len(diffusion_model.blocks if family == "wan" else diffusion_model.joint_blocks)
        blocks: List[Any] = [(_WanBlocks if family == "wan" else _SD3Blocks)(mesh, n)]
        for i in range(n):
            dit[("double_block", i)] = blocks[0].patch(i)
    else:
        fb = _FluxBlocks(mesh, len(diffusion_model.double_blocks), len(diffusion_model.single_blocks),
                         flipped=family == "hunyuan")
        for i in range(fb.n_double):
            dit[("double_block", i)] = fb.double(i)
        for i in range(fb.n_single):
            dit[("single_block", i)] = fb.single(i)
    return {"patches_replace": {"dit": dit},
            "optimized_attention_override": SequenceAttentionOverride(mesh, backend, ring_impl, quality)}
