"""The values that travel on this pack's own sockets, and the conversions between ComfyUI's LATENT / IMAGE and the
core's tensors (the core knows neither: it takes scaled latents and (B, 3, H, W) images).

Socket type names carry the PIXART_ prefix so no other pack's sockets connect to them by accident.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pixart_core.config import PixArtConfig
from pixart_core.controlnet import ControlInput
from pixart_core.errors import PixArtError

from .comfy_bridge import ManagedModel

MODEL = "PIXART_MODEL"
T5 = "PIXART_T5"
CONDITIONING = "PIXART_CONDITIONING"
VAE = "PIXART_VAE"
CONTROLNET = "PIXART_CONTROLNET"
CONTROL = "PIXART_CONTROL"


@dataclass
class LoadedModel:
    """A model from one of the loader nodes: the module as ComfyUI's model management moves it, and the name the
    loader's list showed."""

    managed: ManagedModel
    name: str

    @property
    def module(self):
        return self.managed.module


@dataclass
class PixArtModel(LoadedModel):
    """A loaded transformer with its detected shape and a readable summary, and the LoRAs (file, strength) the
    samplers apply to it while they run (Load LoRA returns a new PixArtModel; the module stays the base)."""

    config: PixArtConfig
    summary: dict
    loras: tuple = ()


@dataclass
class TextEncoder(LoadedModel):
    precision: str


@dataclass
class Conditioning:
    """T5 embeddings of one prompt and its negative, with their 0/1 masks, kept on the CPU."""

    embeds: torch.Tensor  # (1, L, D)
    mask: torch.Tensor  # (1, L)
    negative_embeds: torch.Tensor
    negative_mask: torch.Tensor
    max_length: int


@dataclass
class Vae(LoadedModel):
    info: dict = field(default_factory=dict)


@dataclass
class ControlNet(LoadedModel):
    info: dict = field(default_factory=dict)


@dataclass
class Control:
    """A ControlNet with its condition image and schedule, applied by a sampler. The PIXART_CONTROL socket carries a
    tuple of these: stacked ControlNets add up."""

    controlnet: ControlNet
    vae: Vae
    image: torch.Tensor  # IMAGE [B, H, W, C] 0..1
    strength: float
    start: float
    end: float

    def core(self) -> ControlInput:
        """The core's view: modules instead of managed models, the image with its channels first."""
        return ControlInput(self.controlnet.module, self.vae.module, image_to_core(self.image), self.strength,
                            self.start, self.end)


# ----------------------------------------------------------------------------------------------- ComfyUI types
def latent_tensor(latent: dict) -> torch.Tensor:
    """The samples of a ComfyUI LATENT (raw VAE latents, (B, 4, h, w)), or a PixArtError saying what to connect."""
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor):
        raise PixArtError("The latent input holds no 'samples' tensor; connect a LATENT from Empty Latent, a "
                          "sampler or a VAE Encode.")
    if samples.ndim != 4:
        raise PixArtError(f"The latent has shape {tuple(samples.shape)}; PixArt takes image latents (batch, 4, h, w).")
    if samples.shape[1] != 4:
        raise PixArtError(f"The latent has {samples.shape[1]} channels (shape {tuple(samples.shape)}); PixArt uses the "
                          "4-channel SD / SDXL VAE latent. Connect a latent made for SD/SDXL-family models (e.g. "
                          "PixArt Empty Latent), not one from an SD3/Flux/video model.")
    if samples.shape[0] == 0:
        raise PixArtError("The latent batch is empty (0 images); make it with a batch size of at least 1.")
    return samples


def image_to_core(image: torch.Tensor, name: str = "image") -> torch.Tensor:
    """ComfyUI IMAGE (B, H, W, C) in [0, 1], C = 1 (grey), 3 or 4 (RGBA) -> (B, 3, H, W)."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise PixArtError(f"The {name} input is {shape}; expected a ComfyUI IMAGE (batch, height, width, 3) with 1, 3 "
                          "or 4 (RGBA) channels. Connect Load Image or another node's IMAGE output.")
    return image[..., :3].expand(-1, -1, -1, 3).movedim(-1, 1)


def image_from_core(images: torch.Tensor) -> torch.Tensor:
    """(B, 1 or 3, H, W) in [0, 1] -> ComfyUI IMAGE (B, H, W, 3)."""
    return images.expand(-1, 3, -1, -1).movedim(1, -1).contiguous()
