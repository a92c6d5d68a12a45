"""PixArt-δ for ComfyUI. ComfyUI imports this file as a package (custom_nodes/<this folder>/__init__.py); it only
publishes the node mappings. The nodes import the model core as `pixart_core`, so this folder goes on sys.path
(appended: ComfyUI's own modules, such as its `nodes`, always win)."""

import os
import sys

_PACK_DIR = os.path.dirname(os.path.abspath(__file__))
if _PACK_DIR not in sys.path:
    sys.path.append(_PACK_DIR)

if __package__:  # imported as a package: by ComfyUI, or by pytest collecting this folder
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:  # executed as a plain module; nothing to register
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
