"""The values that travel on this pack's own sockets (ComfyUI's LATENT and IMAGE are used as they are).

Socket type names carry the PIXART_ prefix so no other pack's sockets connect to them by accident.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pixart_core.config import PixArtConfig

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
    """A loaded transformer with its detected shape and a readable summary."""

    config: PixArtConfig
    summary: dict


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
