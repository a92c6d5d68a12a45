"""Nodes: load the SD / SDXL VAE (models/vae) and decode / encode with the seam-free tiled VAE.

ComfyUI's LATENT holds the VAE's raw latent (ComfyUI scales it inside its models), so these nodes hand the core VAE
raw latents in its scaled convention and back: they interoperate with ComfyUI's VAE Decode / Encode and latent nodes.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from pixart_core.errors import PixArtError
from pixart_core.vae import from_comfy_image, latent_samples, load_vae, to_comfy_image

from . import comfy_bridge as bridge
from . import model_cache
from .sockets import VAE, Vae

log = logging.getLogger("pixart_delta")

FOLDER = "vae"
FIRST_OOM_TILE = 512  # px: the first retry after an out-of-memory error with an automatic tile size
MIN_OOM_TILE = 64  # px: below this, tiles cost more in overlap than they save
KINDS = ["auto", "sd", "sdxl"]
PRECISIONS = ["auto", "fp32", "bf16", "fp16"]
MODES = ["auto", "exact", "fast"]
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_TILE = ("INT", {"default": 0, "min": 0, "max": 8192, "step": 64,
                 "tooltip": "Tile side in image pixels; 0 picks one from the free memory. Smaller tiles use less "
                            "memory; the result is the same (no seams) either way."})


class PixArtDeltaVAELoader:
    DESCRIPTION = ("Loads the VAE PixArt decodes with, from models/vae: the SD VAE (sd-vae-ft-ema) for PixArt-α and δ, "
                   "the SDXL VAE for PixArt-Σ. Single files (ldm or diffusers layout) and diffusers folders load.")
    CATEGORY = "PixArt-δ/loaders"
    RETURN_TYPES = (VAE,)
    RETURN_NAMES = ("vae",)
    OUTPUT_TOOLTIPS = ("The VAE, for PixArt-δ VAE Decode / Encode (Tiled) and Apply ControlNet.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae_name": (bridge.list_models(FOLDER), {
                    "tooltip": "The VAE file in models/vae: sd-vae-ft-ema for α/δ, sdxl_vae for Σ."}),
                "kind": (KINDS, {
                    "default": "auto",
                    "tooltip": "Which VAE this is (the weights cannot tell): auto reads the file name ('sdxl' in it "
                               "means SDXL) and is only used to check it against the model's latent space."}),
                "precision": (PRECISIONS, {
                    "default": "auto",
                    "tooltip": "auto: fp32 on the CPU, ComfyUI's VAE precision on a GPU. fp16 tiles that overflow are "
                               "redone in bf16/fp32 automatically."}),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, vae_name):
        if vae_name not in bridge.list_models(FOLDER):
            try:
                bridge.model_path(FOLDER, vae_name, "VAE file")
            except PixArtError as exc:
                return str(exc)
        return True

    def load(self, vae_name: str, kind: str, precision: str):
        if kind not in KINDS:
            raise PixArtError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}.")
        path = bridge.model_path(FOLDER, vae_name, "VAE file")
        load_device, offload_device = bridge.vae_devices()
        dtype = bridge.vae_dtype(load_device) if precision == "auto" else _DTYPES[precision]
        key = (model_cache.file_identity(path), kind, str(dtype), str(load_device))

        def load_new() -> Vae:
            module = load_vae(path, kind=kind, dtype=dtype, device=offload_device)
            info = {"kind": module.kind, "scaling_factor": module.scaling_factor, "can_encode": module.can_encode}
            return Vae(bridge.ManagedModel(module, load_device, offload_device), vae_name, info)

        with bridge.about_file("VAE file", vae_name):
            return (model_cache.VAES.get_or_load(key, load_new),)


class PixArtDeltaVAEDecodeTiled:
    DESCRIPTION = ("Decodes a latent to an image tile by tile with shared GroupNorm statistics, so even 4K images "
                   "decode in limited memory without seams. exact equals an untiled decode; fast bounds memory by "
                   "the tile size; auto picks the untiled network on the CPU while it fits (fastest), else exact "
                   "while it fits, else fast.")
    CATEGORY = "PixArt-δ/latent"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The decoded images (ComfyUI IMAGE, 0..1).",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "samples": ("LATENT", {"tooltip": "The latent to decode (from a PixArt-δ sampler or any SD/SDXL "
                                                  "latent of the same VAE)."}),
                "vae": (VAE, {"tooltip": "The VAE the latent belongs to (SD VAE for α/δ, SDXL VAE for Σ)."}),
                "mode": (MODES, {"default": "auto",
                                 "tooltip": "exact: identical to an untiled decode, memory grows with the image; "
                                            "fast: memory set by the tile, still seam-free; auto: on the CPU the "
                                            "untiled network (fastest) while it fits in memory, then exact while it "
                                            "fits, else fast."}),
                "tile_size": _TILE,
            }
        }

    @torch.no_grad()
    def decode(self, samples: dict, vae: Vae, mode: str, tile_size: int):
        bridge.load([vae.managed])
        module = vae.module
        raw = latent_samples(samples)
        images = run_with_smaller_tiles(
            "decoding", mode, tile_size,
            lambda m, t: module.decode(raw * module.scaling_factor, mode=m, tile_size=t or None,
                                       callback=bridge.tile_progress(), interrupt=bridge.check_interrupted))
        return (to_comfy_image(images).to(bridge.intermediate_device()),)


def run_with_smaller_tiles(what: str, mode: str, tile_size: int, run: Callable[[str, int], torch.Tensor]):
    """run(mode, tile_size); out of memory, again in fast mode with ever smaller tiles (the result differs from exact
    only by the fast mode's shared statistics), then a PixArtError saying what to do."""
    tile = tile_size
    while True:
        try:
            return run(mode, tile)
        except Exception as exc:
            if not bridge.is_out_of_memory(exc):
                raise
            bridge.free_cached_memory(collect=tile == tile_size)  # collect once, on the first retry
            if not tile:
                smaller = FIRST_OOM_TILE
            else:  # halve (in steps of 64 px), never below the smallest useful tile nor above the user's own
                smaller = min(tile, max(MIN_OOM_TILE, (tile // 2) // 64 * 64))
            if mode == "fast" and tile and tile <= MIN_OOM_TILE:
                raise PixArtError(f"Out of memory while {what} even with {tile} px tiles. Free memory (close other "
                                  "models or programs), use a smaller image, or precision fp16/bf16 for the VAE."
                                  ) from exc
            log.warning("PixArt-δ VAE: out of memory while %s (mode %s, tile %s); retrying in fast mode with %d px "
                        "tiles.", what, mode, tile or "auto", smaller)
            mode, tile = "fast", smaller


class PixArtDeltaVAEEncodeTiled:
    DESCRIPTION = ("Encodes an image to a latent tile by tile (seam-free, limited memory), for img2img with the "
                   "PixArt-δ samplers. Image sides should be multiples of 16 px for PixArt.")
    CATEGORY = "PixArt-δ/latent"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The image's latent (ComfyUI LATENT).",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "pixels": ("IMAGE", {"tooltip": "The image to encode (e.g. from Load Image)."}),
                "vae": (VAE, {"tooltip": "The VAE of the model that will use the latent."}),
                "tile_size": _TILE,
            }
        }

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, vae: Vae, tile_size: int):
        if not isinstance(pixels, torch.Tensor) or pixels.ndim != 4 or pixels.shape[-1] not in (1, 3, 4):
            shape = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
            raise PixArtError(f"The pixels input is {shape}; expected a ComfyUI IMAGE (batch, height, width, 3) with "
                              "1, 3 or 4 (RGBA) channels. Connect Load Image or another node's IMAGE output.")
        if pixels.shape[-1] == 1:
            pixels = pixels.repeat(1, 1, 1, 3)  # grey -> RGB
        bridge.load([vae.managed])
        module = vae.module
        latents = run_with_smaller_tiles(
            "encoding", "auto", tile_size,
            lambda m, t: module.encode(from_comfy_image(pixels), mode=m, tile_size=t or None,
                                       callback=bridge.tile_progress(), interrupt=bridge.check_interrupted))
        return ({"samples": (latents / module.scaling_factor).to(bridge.intermediate_device())},)
