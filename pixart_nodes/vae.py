"""Nodes: load the SD / SDXL VAE (models/vae) and decode / encode with the seam-free tiled VAE.

ComfyUI's LATENT holds the VAE's raw latent (ComfyUI scales it inside its models), so these nodes hand the core VAE
raw latents in its scaled convention and back: they interoperate with ComfyUI's VAE Decode / Encode and latent nodes.
"""

from __future__ import annotations

import torch

from pixart_core.errors import PixArtError
from pixart_core.loading.vae_files import load_vae
from pixart_core.vae import decode_fitting, encode_fitting

from . import comfy_bridge as bridge
from . import model_cache
from .sockets import VAE, Vae, image_from_core, image_to_core, latent_tensor

FOLDER = "vae"
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
    CATEGORY = "PixArt/loaders"
    RETURN_TYPES = (VAE,)
    RETURN_NAMES = ("vae",)
    OUTPUT_TOOLTIPS = ("The VAE, for PixArt VAE Decode / Encode (Tiled) and Apply ControlNet.",)
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
        return bridge.validate_model_name(FOLDER, vae_name, "VAE file")

    def load(self, vae_name: str, kind: str, precision: str):
        if kind not in KINDS:
            raise PixArtError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}.")
        path = bridge.model_path(FOLDER, vae_name, "VAE file")
        load_device, offload_device = bridge.vae_devices()
        dtype = bridge.vae_dtype(load_device) if precision == "auto" else _DTYPES[precision]

        def load_new() -> Vae:
            module = load_vae(path, kind=kind, dtype=dtype, device=offload_device)
            info = {"kind": module.kind, "scaling_factor": module.scaling_factor, "can_encode": module.can_encode}
            return Vae(bridge.ManagedModel(module, load_device, offload_device), vae_name, info)

        settings = (kind, str(dtype), str(load_device))
        return (model_cache.load_file(model_cache.VAES, path, settings, load_new, "VAE file", vae_name),)


class PixArtDeltaVAEDecodeTiled:
    DESCRIPTION = ("Decodes a latent to an image tile by tile with shared GroupNorm statistics, so even 4K images "
                   "decode in limited memory without seams. exact equals an untiled decode; fast bounds memory by "
                   "the tile size; auto picks the untiled network on the CPU while it fits (fastest), else exact "
                   "while it fits, else fast.")
    CATEGORY = "PixArt/latent"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The decoded images (ComfyUI IMAGE, 0..1).",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "samples": ("LATENT", {"tooltip": "The latent to decode (from a PixArt sampler or any SD/SDXL "
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
        images = decode_fitting(vae.module, latent_tensor(samples), mode, tile_size or None, raw_latents=True,
                                free_memory=bridge.free_cached_memory, callback=bridge.tile_progress(),
                                interrupt=bridge.check_interrupted)
        return (image_from_core(images).to(bridge.intermediate_device()),)


class PixArtDeltaVAEEncodeTiled:
    DESCRIPTION = ("Encodes an image to a latent tile by tile (seam-free, limited memory), for img2img with the "
                   "PixArt samplers. Image sides should be multiples of 16 px for PixArt.")
    CATEGORY = "PixArt/latent"
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
        images = image_to_core(pixels, "pixels")
        bridge.load([vae.managed])
        latents = encode_fitting(vae.module, images, tile_size or None, raw_latents=True,
                                 free_memory=bridge.free_cached_memory, callback=bridge.tile_progress(),
                                 interrupt=bridge.check_interrupted)
        return ({"samples": latents.to(bridge.intermediate_device())},)
