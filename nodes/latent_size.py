"""Nodes: pick a size from the model's own aspect-ratio bins, and make an empty latent of a size."""

from __future__ import annotations

import torch

from pixart_core.resolution import BIN_TABLES, bin_table, classify_height_width_bin, plan_size

from . import comfy_bridge as bridge
from .sockets import MODEL

# Every bin key of every table (the 2K table has a few more), ordered from wide to tall; height / width.
ASPECT_RATIOS = sorted({k for table in BIN_TABLES.values() for k in table}, key=float)
MAX_SIZE = 16384


class PixArtDeltaResolutionSelect:
    DESCRIPTION = ("Gives the width and height a PixArt model was trained on for an aspect ratio (its resolution "
                   "bins: 1024 px models get 1024-class sizes, 2K models 2048-class sizes). Feed them to Empty Latent "
                   "or a sampler.")
    CATEGORY = "PixArt-δ/latent"
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
                    "default": "1.0",
                    "tooltip": "Height divided by width: below 1 is landscape (0.57 is about 16:9), 1.0 square, "
                               "above 1 portrait. A ratio the model has no bin for picks its closest bin."}),
            }
        }

    def select(self, model, aspect_ratio: str):
        height, width = classify_height_width_bin(float(aspect_ratio), 1.0, bin_table(model.config.bin_size))
        return (width, height)


class PixArtDeltaEmptyLatent:
    DESCRIPTION = ("An empty latent of the given size for the PixArt-δ samplers (ComfyUI's own LATENT, so native "
                   "latent nodes work with it). Sizes must be multiples of 16.")
    CATEGORY = "PixArt-δ/latent"
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
