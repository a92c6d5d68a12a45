"""Train the nano VAE: a small diffusers AutoencoderKL (8x down, 4 latent channels) on nano scenes and edge maps.

Loss: L1 + MSE reconstruction, weighted 5x on object pixels, plus a small KL term (no GAN or LPIPS: flat-coloured shapes do not need them). Edge maps
are part of the training data because the ControlNet hint goes through this VAE, as in PixArt-δ.

After training the latent is rescaled exactly (the mean rows of quant_conv multiplied by k, post_quant_conv divided by
k, the log-variance shifted by 2 ln k) so that latents times the PixArt-α scale 0.18215 have unit standard deviation:
the loaders then use the α latent scale for the nano models like for any α/δ checkpoint.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..config import LATENT_SCALE
from . import data
from .common import build_vae, warmup_lr


_BACKGROUND = (torch.tensor(data.BACKGROUND, dtype=torch.float32) / 127.5 - 1).view(1, 3, 1, 1)


@dataclass
class VAETrainConfig:
    steps: int = 800
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 50
    kl_weight: float = 1e-4
    edge_fraction: float = 0.25
    object_weight: float = 4.0  # extra loss weight on non-background pixels: small objects must keep their colour
    rescale_samples: int = 256  # scenes used to measure the latent std for the rescaling
    seed: int = 0


@dataclass
class VAETrainResult:
    vae: object
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def _batch(rng: np.random.Generator, n: int, edge_fraction: float) -> torch.Tensor:
    images = []
    for _ in range(n):
        scene = data.random_scene(rng) if rng.random() < 0.85 else data.random_single(rng, free_placement=True)
        images.append(data.render_edges(scene) if rng.random() < edge_fraction else data.render(scene))
    return data.to_signed_tensor(images)


def train_vae(cfg: VAETrainConfig, log: Callable[[str], None] = print, log_every: int = 100) -> VAETrainResult:
    torch.manual_seed(cfg.seed)
    vae = build_vae(cfg.seed).train()
    rng = np.random.default_rng(cfg.seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    result = VAETrainResult(vae)
    start = time.time()
    for step in range(cfg.steps):
        warmup_lr(opt, step, cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))), cfg.warmup)
        x = _batch(rng, cfg.batch_size, cfg.edge_fraction)
        dist = vae.encode(x).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        kl = 0.5 * (dist.mean.pow(2) + dist.var - 1 - dist.logvar).mean()
        weight = 1 + cfg.object_weight * ((x - _BACKGROUND).abs().amax(dim=1, keepdim=True) > 0.1).float()
        err = rec - x
        loss = (weight * (err.abs() + err.pow(2))).mean() / weight.mean() + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        result.losses.append(float(loss.detach()))
        if log_every and (step % log_every == 0 or step == cfg.steps - 1):
            log(f"vae step {step}/{cfg.steps} loss {np.mean(result.losses[-log_every:]):.4f} "
                f"({time.time() - start:.0f}s)")
    vae.eval().requires_grad_(False)
    rescale_latents(vae, _batch(np.random.default_rng(cfg.seed + 1), cfg.rescale_samples, 0.0))
    result.seconds = time.time() - start
    return result


@torch.no_grad()
def rescale_latents(vae, images: torch.Tensor, scale: float = LATENT_SCALE["alpha"]) -> float:
    """Reparametrise the VAE so that posterior means of `images` have std 1/scale; returns the factor used."""
    std = float(vae.encode(images).latent_dist.mean.std())
    k = (1.0 / scale) / std
    c = vae.config.latent_channels
    vae.quant_conv.weight[:c] *= k
    vae.quant_conv.bias[:c] *= k
    vae.quant_conv.bias[c:] += 2 * math.log(k)
    vae.post_quant_conv.weight[:, :c] /= k
    return k
