"""PixArt-δ for ComfyUI. ComfyUI imports this file as a package (custom_nodes/<this folder>/__init__.py); it only
publishes the node mappings of the pack's node package, pixart_nodes/ (imported relative to this package, so no
top-level name is needed or taken; `pixart_nodes` shadows no ComfyUI module)."""

import os
import sys

# The nodes import the model core as the top-level package `pixart_core` (absolute imports, the same way the CLI,
# the benchmarks and the tests import it without ComfyUI), so this folder goes on sys.path. Appended: ComfyUI's own
# modules always win, and none of ComfyUI's top-level names (nodes, comfy, utils, ...) is a folder here.
_PACK_DIR = os.path.dirname(os.path.abspath(__file__))
if _PACK_DIR not in sys.path:
    sys.path.append(_PACK_DIR)

if __package__:  # imported as a package: by ComfyUI, or by pytest collecting this folder
    from .pixart_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:  # executed as a plain module; nothing to register
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
