"""Inpainting: sampling that repaints only where a noise mask is 1, the way ComfyUI's KSampler does with a LATENT's
`noise_mask` (ComfyUI 0.3.64, comfy/samplers.py KSamplerX0Inpaint; the mask prepared by comfy.utils.reshape_mask).

- Mask: 1 = repaint, 0 = keep the input latent, values between blend. It is resized to the latent (bilinear,
  stretched if the aspect ratio differs) and broadcast over the batch, as ComfyUI does. Unlike ComfyUI, a mask
  batch that does not divide the image batch is refused instead of cut or partly repeated.
- Before every model evaluation the kept region of x is the input latent re-noised to the current level with the
  sampler's starting noise; after it, the model's data prediction (x0) in the kept region is the input latent.
  `InpaintEpsilon` does both around any `eps_fn(x, t)`, so every sampler in samplers.py honours the mask unchanged
  (CFG, ControlNet and step caching live inside the wrapped eps_fn).
- `blend` puts the input latent back outside the mask at the end, exactly. Samplers that end at σ = 0 (Euler,
  DPM-Solver++, DDIM) land there already up to rounding; LCM adds its boundary term c_skip·x after the model (ComfyUI
  adds it inside the model, before the inpainting blend, so its LCM lands exactly there too), and SA-Solver ends at
  σ(t=0) ≈ 0.01 as diffusers does.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .errors import PixArtError
from .resolution import resize_and_crop
from .samplers import EpsFn
from .schedule import DiscreteSchedule


def _as_masks(mask) -> torch.Tensor:
    """A mask (H, W), (N, H, W) or (N, 1, H, W) with values in 0..1 as (N, 1, H, W) float32, else a PixArtError."""
    if not isinstance(mask, torch.Tensor):
        raise PixArtError(f"The noise mask must be a tensor; got {type(mask).__name__}.")
    shape = tuple(mask.shape)
    if mask.ndim == 2:
        mask = mask[None, None]
    elif mask.ndim == 3:
        mask = mask[:, None]
    elif mask.ndim != 4 or mask.shape[1] != 1:
        raise PixArtError(f"The noise mask has shape {shape}; a mask is (height, width), (batch, height, width) or "
                          "(batch, 1, height, width). Make it with a mask node (Load Image's MASK, Image To Mask).")
    if 0 in mask.shape:
        raise PixArtError(f"The noise mask is empty (shape {shape}).")
    mask = mask.float()
    if not torch.isfinite(mask).all() or mask.min() < 0 or mask.max() > 1:
        raise PixArtError("The noise mask must hold values from 0 (keep) to 1 (repaint); this one has values "
                          f"from {mask.min().item():g} to {mask.max().item():g}. Scale an 8-bit mask by 1/255.")
    return mask


def mask_rows(mask, batch: int) -> torch.Tensor:
    """The mask as (batch, 1, H, W) float32: one mask is used for every image, N masks with N dividing the batch are
    repeated (as ComfyUI repeats them); anything else is a PixArtError."""
    mask = _as_masks(mask)
    if batch % mask.shape[0]:
        raise PixArtError(f"The noise mask has {mask.shape[0]} masks for a batch of {batch} images; give one mask "
                          f"for all images, or {batch}.")
    return mask.repeat(batch // mask.shape[0], 1, 1, 1)


def prepare_mask(mask, shape: tuple[int, ...], device=None) -> torch.Tensor:
    """The mask for latents of `shape` (B, C, h, w): (B, 1, h, w) float32, resized bilinearly like ComfyUI."""
    mask = mask_rows(mask, shape[0])
    if tuple(mask.shape[-2:]) != tuple(shape[-2:]):
        mask = F.interpolate(mask, size=tuple(shape[-2:]), mode="bilinear")
    return mask.to(device=device)


def pixel_mask(mask, image: Optional[torch.Tensor], width: int, height: int) -> torch.Tensor:
    """A mask over `image`'s pixels (B, 3, H, W) brought to the generation size the way the pipeline brings the
    image there (resolution.resize_and_crop); a mask of another size is first stretched to the image's."""
    if image is None:
        raise PixArtError("A mask says which part of an input image to repaint; give the image too (--init-image).")
    mask = _as_masks(mask)
    if tuple(mask.shape[-2:]) != tuple(image.shape[-2:]):
        mask = F.interpolate(mask, size=tuple(image.shape[-2:]), mode="bilinear")
    return resize_and_crop(mask, width, height)


def _level(schedule: DiscreteSchedule, t: float) -> tuple[float, float]:
    """(α_t, σ_t) of the VP latent at timestep t, as noisy_start noises the starting latent."""
    a = schedule.noise_level(t)
    return math.sqrt(a), math.sqrt(1.0 - a)


class InpaintEpsilon:
    """`eps_fn(x, t)` that repaints only where `mask` is 1 (KSamplerX0Inpaint in ε form).

    latent: the input latent (B, C, h, w) in the model's scale; noise: the noise the sampler started from (same
    shape); mask: from prepare_mask.
    """

    def __init__(self, eps_fn: EpsFn, schedule: DiscreteSchedule, latent: torch.Tensor, noise: torch.Tensor,
                 mask: torch.Tensor):
        self.eps_fn, self.schedule = eps_fn, schedule
        self.latent, self.noise = latent.float(), noise.to(device=latent.device, dtype=torch.float32)
        self.mask = mask.to(latent.device)
        self.keep = 1.0 - self.mask

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = _level(self.schedule, float(t.reshape(-1)[0]))  # the samplers give every image the same t
        known = a * self.latent + s * self.noise  # the input latent at this noise level, with the same noise
        x_in = x * self.mask + known * self.keep
        eps = self.eps_fn(x_in, t).float()
        x0 = (x_in - s * eps) / a
        # The sampler's own x must see the data prediction x0' = mask·x0 + keep·latent: ε' = (x - α·x0') / σ,
        # written as a correction of ε that is exactly zero where the mask is 1.
        return eps + self.keep * ((x - known) - a * (self.latent - x0)) / s

    def blend(self, samples: torch.Tensor) -> torch.Tensor:
        """The final latents: the sampled ones inside the mask, the input latent outside it (exactly)."""
        return samples * self.mask + self.latent * self.keep
