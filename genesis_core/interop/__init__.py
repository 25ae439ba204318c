"""Adapters between Genesis and other frameworks' calling conventions (no framework is imported here)."""
from .comfy_adapter import GenesisAttentionOverride, make_replace_patch
from .comfy_call import call_signature, comfy_attention
from .comfy_steps import make_step_wrapper, step_index, step_level

__all__ = ["GenesisAttentionOverride", "call_signature", "comfy_attention", "make_replace_patch",
           "make_step_wrapper", "step_index", "step_level"]
