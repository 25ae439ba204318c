"""GenesisMultiModalGen: the spec's "Integration Example" as a working node.

Image features attend to text embeddings (CrossAttentionModule), then self-attend (AdaptiveAttentionSwitch
set to the chosen attention type), on the chosen compute backend.
"""
from __future__ import annotations

import torch

from ..genesis_core.attn import AttentionType
from ..genesis_core.attn.modules import AdaptiveAttentionSwitch, CrossAttentionModule
from ..genesis_core.comfyui import ComfyUINodeInterface, register_comfyui_node
from ..genesis_core.compute.backends import ComputeBackend, backend_status
from ._common import TENSOR, BackendChoice, check_tensor, run_on_backend, tooltip

NODE = "GenesisMultiModalGen"
ATTN_MAP = {
    "flash": AttentionType.FLASH_ATTENTION,
    "xformers": AttentionType.XFORMERS,
    "sdpa": AttentionType.SDPA,
}


@register_comfyui_node(NODE, display_name="Genesis Multi-Modal Gen")
class MultiModalGenNode(ComfyUINodeInterface):
    """ComfyUI node using all four Genesis interfaces (the spec's integration example)."""

    CATEGORY = "genesis/examples"
    DESCRIPTION = (
        "The Genesis spec's integration example: image features [B, N, Di] attend to text embeddings "
        "[B, M, Dt] (cross-attention), then self-attend with the chosen attention type, on cuda or cpu. "
        "Layer weights come from 'seed'. Output: [B, N, Di]."
    )
    RETURN_TYPES = (TENSOR,)
    RETURN_NAMES = ("features",)
    OUTPUT_TOOLTIPS = ("Image features after cross- and self-attention [B, N, Di].",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image_features": (TENSOR, tooltip("Image features [B, N, Di].")),
                "text_embeddings": (TENSOR, tooltip("Text embeddings [B, M, Dt].")),
                "backend": (["cuda", "cpu"], tooltip("Compute device.", default="cpu")),
                "attention_type": (list(ATTN_MAP), tooltip("Self-attention implementation.", default="sdpa")),
            },
            "optional": {
                "num_heads": ("INT", tooltip("Heads; must divide Di.", default=8, min=1, max=128)),
                "seed": ("INT", tooltip("Seed for the layers' weights.", default=0, min=0, max=2**63 - 1)),
            },
        }

    def execute(self, image_features, text_embeddings, backend="cpu", attention_type="sdpa", num_heads=8, seed=0):
        img = check_tensor(NODE, "image_features", image_features, (3,), "[B, N, Di]")
        txt = check_tensor(NODE, "text_embeddings", text_embeddings, (3,), "[B, M, Dt]")
        if txt.shape[0] not in (1, img.shape[0]):
            raise ValueError(f"{NODE}: input 'text_embeddings' batch must be 1 or {img.shape[0]}; got shape {tuple(txt.shape)}")
        if attention_type not in ATTN_MAP:
            raise ValueError(f"{NODE}: input 'attention_type' must be one of {', '.join(ATTN_MAP)}; got {attention_type!r}")
        if num_heads < 1 or img.shape[-1] % num_heads:
            raise ValueError(f"{NODE}: input 'num_heads' must divide Di={img.shape[-1]}; got {num_heads}")
        member = ComputeBackend.parse(backend)
        status = backend_status(member)
        if not status.available:
            raise ValueError(f"{NODE}: input 'backend' is {backend!r}, which is not available here: {status.reason}")
        device = status.devices[0] if member is ComputeBackend.CUDA and status.devices else member.value

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            cross = CrossAttentionModule(img.shape[-1], txt.shape[-1], int(num_heads))
            self_attn = AdaptiveAttentionSwitch(img.shape[-1], int(num_heads))
        self_attn.set_attention_type(ATTN_MAP[attention_type])
        cross.eval(), self_attn.eval()
        txt = txt.expand(img.shape[0], -1, -1).to(img.dtype)

        cross, self_attn = cross.to(img.dtype), self_attn.to(img.dtype)

        def process(img_feat, txt_emb):
            with torch.inference_mode():
                # Cross-attention: image attends to text; then self-attention.
                cross_out = cross(img_feat, txt_emb, txt_emb)
                return self_attn(cross_out)

        home = img.device
        out = run_on_backend(BackendChoice(member.value, device), process, img, txt)
        return (out.to(home),)
