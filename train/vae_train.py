"""Train the nano VAE: a small diffusers AutoencoderKL (8x down, 4 latent channels) on nano scenes and edge maps.

Loss: L1 + MSE reconstruction, weighted 5x on object pixels, plus a small KL term (no GAN or LPIPS: flat-coloured shapes do not need them). Edge maps
are part of the training data because the ControlNet hint goes through this VAE, as in PixArt-δ.

Colour-aligned latent (`rgb_weight`): a 1x1 linear head (trained alongside, then discarded) must read the 8x8 average
RGB image off the posterior mean, so the latent carries colour linearly, like Stable Diffusion's latents roughly do.
Without it the six colours lie along one hue axis in latent space (red-yellow 2.5 apart against 10.7 for left vs
right), so the diffusion loss barely separates neighbouring colours and the transformer learns colour far later than
layout; with it the closest pair is ~4 apart and most are 8-15.

After training the latent is standardised exactly, per channel (quant_conv's mean rows shifted and scaled, the
log-variance shifted, post_quant_conv undoing both; `rescale_latents`), so that latents times the PixArt-α scale
0.18215 have mean 0 and std 1 in every channel: the loaders then use the α latent scale for the nano models like for
any α/δ checkpoint. Per channel, not one global factor: the colour-aligned latent has channel means down to -2 and
channel stds of 0.54-0.76 under a global std of 1, so the objects' share of each channel was only ~0.6 of the unit
the noise schedule assumes. Standardised, the v-prediction teacher (EMA, 60 prompts, colour / position) reached
.98 / .53 at 400 steps and 1.00 / .80 at 800, against .72 / .42 and .97 / .70 with the global factor.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pixart_core.config import LATENT_SCALE
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
    rgb_weight: float = 1.0  # weight of the linear latent -> 8x8 average RGB loss (0: plain VAE)
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
    # the colour-alignment head: not part of the VAE, dropped after training
    rgb_head = nn.Conv2d(vae.config.latent_channels, 3, 1)
    rng = np.random.default_rng(cfg.seed)
    opt = torch.optim.AdamW(list(vae.parameters()) + list(rgb_head.parameters()), lr=cfg.lr, weight_decay=0.0)
    stride = 2 ** (len(vae.config.block_out_channels) - 1)
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
        if cfg.rgb_weight > 0:
            colour = rgb_head(dist.mean) - F.avg_pool2d(x, stride)
            loss = loss + cfg.rgb_weight * colour.pow(2).mean()
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
def rescale_latents(vae, images: torch.Tensor, scale: float = LATENT_SCALE["alpha"]) -> torch.Tensor:
    """Reparametrise the VAE exactly so that the posterior means of `images` have, per channel, mean 0 and std
    1/scale; returns the per-channel factors used. The encoder's mean rows become k·(m - μ) (quant_conv weight and
    bias), the log-variance shifts by 2 ln k, and post_quant_conv undoes both (weight / k, bias + W μ), so
    decode(encode(x)) is unchanged and the VAE loads as a plain AutoencoderKL with the α scale."""
    mean = vae.encode(images).latent_dist.mean
    mu, std = mean.mean(dim=(0, 2, 3)), mean.std(dim=(0, 2, 3))
    k = (1.0 / scale) / std
    c = vae.config.latent_channels
    vae.quant_conv.weight[:c] *= k.view(-1, 1, 1, 1)
    vae.quant_conv.bias[:c] = (vae.quant_conv.bias[:c] - mu) * k
    vae.quant_conv.bias[c:] += 2 * torch.log(k)
    w = vae.post_quant_conv.weight  # (out, c, 1, 1)
    vae.post_quant_conv.bias += w[:, :, 0, 0] @ mu
    vae.post_quant_conv.weight /= k.view(1, -1, 1, 1)
    return k
