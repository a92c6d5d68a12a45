"""Nodes: pick a size from the model's own aspect-ratio bins, and make an empty latent of a size."""

from __future__ import annotations

import torch

from pixart_core.resolution import BIN_TABLES, bin_for_aspect, plan_size

from . import comfy_bridge as bridge
from .sockets import MODEL

# Width:height labels from wide to tall; each picks the model's bin closest to its height / width.
ASPECT_RATIOS = ["4:1", "3:1", "21:9", "2:1", "16:9", "3:2", "4:3", "5:4", "1:1", "4:5", "3:4", "2:3", "9:16", "1:2",
                 "9:21", "1:3", "1:4"]
# Workflows saved before the labels hold a bin key (height / width as a decimal, e.g. "0.57"); they still load.
DECIMAL_RATIOS = sorted({k for table in BIN_TABLES.values() for k in table}, key=float)
MAX_SIZE = 16384  # px: the largest width / height the size widgets take


def height_over_width(aspect_ratio: str) -> float:
    """A "W:H" label, or an older workflow's height / width decimal, as height / width."""
    if ":" in aspect_ratio:
        width, height = aspect_ratio.split(":")
        return float(height) / float(width)
    return float(aspect_ratio)


class PixArtDeltaResolutionSelect:
    DESCRIPTION = ("Gives the width and height a PixArt model was trained on for an aspect ratio (its resolution "
                   "bins: 1024 px models get 1024-class sizes, 2K models 2048-class sizes). Feed them to Empty Latent "
                   "or a sampler.")
    CATEGORY = "PixArt/latent"
    RETURN_TYPES = ("INT", "INT")
    RETURN_NAMES = ("width", "height")
    OUTPUT_TOOLTIPS = ("Width in pixels (a multiple of 16).", "Height in pixels (a multiple of 16).")
    FUNCTION = "select"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL, {"tooltip": "The transformer whose training bins to use."}),
                "aspect_ratio": (ASPECT_RATIOS, {
                    "default": "1:1",
                    "tooltip": "Width:height, e.g. 16:9 landscape, 1:1 square, 9:16 portrait. The model's trained "
                               "size closest to that shape is picked."}),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, aspect_ratio):
        # Named here so that older workflows' decimal values (height / width, e.g. "0.57") still pass.
        if aspect_ratio in ASPECT_RATIOS or aspect_ratio in DECIMAL_RATIOS:
            return True
        return f"aspect_ratio {aspect_ratio!r} is not one of {', '.join(ASPECT_RATIOS)}; pick one in the node."

    def select(self, model, aspect_ratio: str):
        height, width = bin_for_aspect(model.config.bin_size, height_over_width(aspect_ratio))
        return (width, height)


class PixArtDeltaEmptyLatent:
    DESCRIPTION = ("An empty latent of the given size for the PixArt samplers (ComfyUI's own LATENT, so native "
                   "latent nodes work with it). Sizes must be multiples of 16.")
    CATEGORY = "PixArt/latent"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("An all-zero latent batch (B, 4, height/8, width/8).",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "width": ("INT", {"default": 1024, "min": 16, "max": MAX_SIZE, "step": 16,
                                  "tooltip": "Image width in pixels, a multiple of 16."}),
                "height": ("INT", {"default": 1024, "min": 16, "max": MAX_SIZE, "step": 16,
                                   "tooltip": "Image height in pixels, a multiple of 16."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64,
                                       "tooltip": "How many images to make at once."}),
            }
        }

    def make(self, width: int, height: int, batch_size: int):
        plan = plan_size(width, height, bin_size=1024, binning=False)  # raises a clear error off the 16-px grid
        h, w = plan.latent_shape
        return ({"samples": torch.zeros(batch_size, 4, h, w, device=bridge.intermediate_device())},)
