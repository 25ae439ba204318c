"""Genesis for ComfyUI: the custom-node pack entry point.

ComfyUI imports this folder as a package and reads NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS and
WEB_DIRECTORY. Everything is imported relatively (``from .nodes``): ComfyUI has its own top-level
``nodes`` module, which this pack must never shadow.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from .nodes import routes as _routes

WEB_DIRECTORY = "./web"

_routes.register()  # only does something inside a running ComfyUI server

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
