"""Nodes: the PixArt-δ LCM sampler (few steps, no CFG) and the general sampler (DPM-Solver++, SA-Solver, Euler, DDIM).

Both take and return ComfyUI's own LATENT ({"samples": (B, 4, H/8, W/8)} in the VAE's raw scale, as ComfyUI keeps
latents), so native latent nodes and VAE Decode work before and after them. Inside ComfyUI, sampling reports progress
with previews and stops at the next model evaluation when Cancel is pressed. Both offer optional step caching
(Δ-DiT / T-GATE, pixart_core/step_cache.py), off by default.
"""

from __future__ import annotations

import logging

import torch

from pixart_core.lora import loras_applied
from pixart_core.pipeline import sample_batch
from pixart_core.step_cache import MODES as STEP_CACHE_MODES

from . import comfy_bridge as bridge
from .latent_size import MAX_SIZE
from .sockets import CONDITIONING, CONTROL, MODEL, Conditioning, PixArtModel, latent_tensor

log = logging.getLogger("pixart_delta")

MAX_SEED = 0xFFFFFFFFFFFFFFFF
SAMPLERS = ["dpmpp_2m", "sa_solver", "euler", "ddim"]
STEP_CACHES = list(STEP_CACHE_MODES)
OLD_STEP_CACHES = {"Δ-DiT": "delta-dit", "T-GATE": "t-gate"}  # the values workflows saved before one spelling

_SEED = ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                 "tooltip": "Noise seed. Image k of a batch uses seed + k, so it can be remade alone."})
_CONTROL = (CONTROL, {"tooltip": "Optional ControlNet guidance from PixArt-δ Apply ControlNet."})


def _size_from_latent(latent: dict) -> tuple[int, int, int]:
    samples = latent_tensor(latent)
    return samples.shape[-1] * 8, samples.shape[-2] * 8, samples.shape[0]


def run_sampler(model: PixArtModel, conditioning: Conditioning, *, sampler: str, seed: int, steps: int,
                guidance: float, width: int, height: int, batch_size: int, denoise: float,
                latent: dict | None, control, step_cache: str = "off") -> dict:
    """The one core call both sampler nodes make (pipeline.sample_batch on the LATENT's raw latents), with ComfyUI's
    model loading, progress, preview, Cancel and memory release hooked in. A LATENT with a noise_mask is inpainted:
    only where the mask is 1 is it repainted (pixart_core/inpaint.py)."""
    noise_mask = (latent or {}).get("noise_mask")  # Set Latent Noise Mask / VAE Encode (for Inpainting)
    start = latent is not None and (denoise < 1.0 or noise_mask is not None)
    init = latent_tensor(latent) if start else None
    bridge.load([model.managed] + [m for c in control or () for m in (c.controlnet.managed, c.vae.managed)])
    progress = bridge.sampling_progress(model.config.family, model.module.device)
    with loras_applied(model.module, model.loras):  # LoRAs only while sampling: the cached module stays the base
        latents = sample_batch(
            model.module, conditioning.embeds, conditioning.mask, negative_embeds=conditioning.negative_embeds,
            negative_mask=conditioning.negative_mask, width=width, height=height, batch_size=batch_size, seed=seed,
            init_latent=init, noise_mask=noise_mask, controls=[c.core() for c in control or ()], sampler=sampler,
            steps=steps, guidance_scale=guidance, denoise=denoise, raw_latents=True,
            step_cache=OLD_STEP_CACHES.get(step_cache, step_cache), interrupt=bridge.check_interrupted,
            free_memory=bridge.free_cached_memory,
            callback=lambda step, total, x, denoised: progress(step + 1, total, denoised))
    out = dict(latent or {})  # as ComfyUI's KSampler: the mask stays on the latent for a second pass
    out["samples"] = latents.to(bridge.intermediate_device())
    return out


class _SamplerNode:
    """What the two sampler nodes share: their category and output, the seed, denoise and the optional inputs."""

    CATEGORY = "PixArt/sampling"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The denoised latent (ComfyUI LATENT), for PixArt VAE Decode (Tiled) or ComfyUI's VAE Decode.",)
    FUNCTION = "sample"
    STEP_CACHE_TOOLTIP = ""

    @staticmethod
    def denoise_input(tooltip: str) -> tuple:
        return ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": tooltip})

    @classmethod
    def VALIDATE_INPUTS(cls, step_cache="off"):
        # Named here so that workflows saved with the old spellings (Δ-DiT, T-GATE) still load; they are migrated.
        if step_cache in STEP_CACHES or step_cache in OLD_STEP_CACHES:
            return True
        return f"step_cache {step_cache!r} is not one of {', '.join(STEP_CACHES)}; pick one in the node."

    @classmethod
    def optional_inputs(cls) -> dict:
        """ControlNet socket, then the step-cache widget: optional and last, so workflows saved before it keep their
        widget order and load with it off."""
        return {"control": _CONTROL,
                "step_cache": (STEP_CACHES, {"default": "off", "tooltip": cls.STEP_CACHE_TOOLTIP})}


class PixArtDeltaLCMSampler(_SamplerNode):
    DESCRIPTION = ("Samples with PixArt-δ LCM in 2-8 steps (4 is the official setting), without CFG: the guidance is "
                   "distilled into the LCM weights, so the negative prompt is not used. Connect a latent to take "
                   "its size and batch (and, with denoise below 1, its content).")
    STEP_CACHE_TOOLTIP = (
        "Step caching, off by default: made for the multi-step samplers (14-25 steps). With 4 LCM steps delta-dit "
        "reuses work between steps far apart on the schedule, which may show: compare with it off. Measured speed "
        "and image change: docs/benchmarks.md.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL, {"tooltip": "A PixArt-δ LCM transformer (PixArt-LCM-XL-2-1024-MS)."}),
                "conditioning": (CONDITIONING, {"tooltip": "The prompt from PixArt T5 Text Encode."}),
                "seed": _SEED,
                "steps": ("INT", {"default": 4, "min": 1, "max": 50,
                                  "tooltip": "LCM steps: 4 is the official setting, 1-2 are rougher, 8 a little "
                                             "finer."}),
                "width": ("INT", {"default": 1024, "min": 16, "max": MAX_SIZE, "step": 16,
                                  "tooltip": "Image width in pixels, a multiple of 16 (ignored when a latent is "
                                             "connected). PixArt Resolution gives the model's trained sizes."}),
                "height": ("INT", {"default": 1024, "min": 16, "max": MAX_SIZE, "step": 16,
                                   "tooltip": "Image height in pixels, a multiple of 16 (ignored when a latent is "
                                              "connected)."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64,
                                       "tooltip": "Images per run (ignored when a latent is connected)."}),
                "denoise": cls.denoise_input("How much of the picture is redrawn: 1 makes a new image (a connected "
                                             "latent gives only its size); below 1 starts from the connected "
                                             "latent, and the lower the value the more of it is kept (img2img)."),
            },
            "optional": {
                "latent": ("LATENT", {"tooltip": "Optional: a latent whose size and batch to use; its content is "
                                                 "the starting image when denoise is below 1, and with a noise mask "
                                                 "(Set Latent Noise Mask) only the masked part is redrawn."}),
                **cls.optional_inputs(),
            },
        }

    @torch.no_grad()
    def sample(self, model, conditioning, seed, steps, width, height, batch_size, denoise, latent=None, control=None,
               step_cache="off"):
        if latent is not None:
            size = _size_from_latent(latent)
            if size != (width, height, batch_size):
                log.warning("PixArt-δ LCM Sampler: the connected latent (%dx%d, batch %d) sets the size; the width, "
                            "height and batch_size widgets (%dx%d, batch %d) are not used.", *size, width, height,
                            batch_size)
            width, height, batch_size = size
        return (run_sampler(model, conditioning, sampler="lcm", seed=seed, steps=steps, guidance=0.0, width=width,
                            height=height, batch_size=batch_size, denoise=denoise, latent=latent, control=control,
                            step_cache=step_cache),)


class PixArtDeltaSampler(_SamplerNode):
    DESCRIPTION = ("Samples PixArt-α / Σ (and δ) with DPM-Solver++ 2M (the official default: 20 steps, CFG 4.5), "
                   "SA-Solver (25 steps, CFG 3), Euler or DDIM. Denoise below 1 refines the connected latent "
                   "(img2img, hires-fix). A latent with a noise mask (Set Latent Noise Mask) is inpainted: only the "
                   "masked part is redrawn.")
    STEP_CACHE_TOOLTIP = (
        "Step caching, off by default: reuses work of earlier steps, faster at a small change of the image. "
        "delta-dit skips most blocks on every second step; t-gate reuses cross-attention and drops CFG for the "
        "second half of the steps; both does both. For 14-25 steps; with few steps little is left to reuse. Measured "
        "speed and image change: docs/benchmarks.md.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL, {"tooltip": "A PixArt transformer from PixArt Load Transformer."}),
                "conditioning": (CONDITIONING, {"tooltip": "Prompt and negative prompt from PixArt T5 Text Encode."}),
                "latent": ("LATENT", {"tooltip": "Sets the size and batch (PixArt Empty Latent or ComfyUI's); with "
                                                 "denoise below 1 also the starting image; with a noise mask (Set "
                                                 "Latent Noise Mask) only the masked part is redrawn. Sides: "
                                                 "multiples of 16 px."}),
                "seed": _SEED,
                "steps": ("INT", {"default": 20, "min": 1, "max": 1000,
                                  "tooltip": "Sampling steps: 20 for DPM-Solver++, 25 for SA-Solver (official)."}),
                "cfg": ("FLOAT", {"default": 4.5, "min": 0.0, "max": 30.0, "step": 0.1, "round": 0.01,
                                  "tooltip": "Classifier-free guidance: 4.5 official (3 for SA-Solver); 1 or less "
                                             "turns it off (one model run per step)."}),
                "sampler_name": (SAMPLERS, {"default": "dpmpp_2m",
                                            "tooltip": "dpmpp_2m: DPM-Solver++ 2M (default); sa_solver: stochastic "
                                                       "SA-Solver; euler; ddim."}),
                "denoise": cls.denoise_input("How much of the picture is redrawn: 1 makes a new image; below 1 starts "
                                             "from the latent, and the lower the value the more of it is kept (0.6 "
                                             "for img2img, 0.3-0.5 to refine an upscale)."),
            },
            "optional": cls.optional_inputs(),
        }

    @torch.no_grad()
    def sample(self, model, conditioning, latent, seed, steps, cfg, sampler_name, denoise, control=None,
               step_cache="off"):
        width, height, batch_size = _size_from_latent(latent)
        return (run_sampler(model, conditioning, sampler=sampler_name, seed=seed, steps=steps, guidance=cfg,
                            width=width, height=height, batch_size=batch_size, denoise=denoise, latent=latent,
                            control=control, step_cache=step_cache),)
