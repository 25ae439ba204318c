"""Genesis ComfyUI nodes: thin classes over genesis_core, registered through genesis_core.comfyui.

Importing this package registers every node; NODE_CLASS_MAPPINGS / NODE_DISPLAY_NAME_MAPPINGS are built
from the registry. Heavy optional packages (flash-attn, xformers, sageattention, onnxruntime) are not
imported and no GPU is touched until a node runs or the backends route is asked.
"""
from ..genesis_core.comfyui import node_class_mappings, node_display_name_mappings
from ._common import install_progress
from . import attention_switch, backend_select, bridges, cross_attention, multigpu, multimodal  # noqa: F401 (registers)

install_progress()
NODE_CLASS_MAPPINGS = node_class_mappings(prefix="Genesis")
NODE_DISPLAY_NAME_MAPPINGS = node_display_name_mappings(prefix="Genesis")

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
