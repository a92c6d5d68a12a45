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

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pixart_core.config import LATENT_SCALE
from . import data
from .common import build_vae, cosine_lr, warmup_lr


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
    shape_weight: float = 0.0  # weight of the shape-separation hinge (0: off, as builds 1-6)
    shape_margin: float = 0.25  # wanted latent distance between two shapes, relative to the object's own
    shape_objects: int = 8  # single objects drawn as all three shapes for the hinge, per step
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


def _shape_triplets(rng: np.random.Generator, n: int) -> torch.Tensor:
    """(3n + 1, 3, 64, 64): n random single objects, each drawn as a circle, a square and a triangle (same colour,
    centre and size), then the empty background."""
    scenes = []
    for _ in range(n):
        o = data.random_single(rng, free_placement=True).objects[0]
        scenes += [data.Scene([data.SceneObject(shape, o.colour, o.cx, o.cy, o.size)]) for shape in data.SHAPES]
    return data.batch(scenes + [data.Scene([])])[0]


def shape_separation_loss(latent_mean: torch.Tensor, margin: float,
                          channel_std: torch.Tensor | None = None) -> torch.Tensor:
    """Hinge on how far apart the latents of one object drawn as two different shapes are, relative to how far the
    object is from the empty background (detached, so the term cannot be met by shrinking the object).
    latent_mean: posterior means of _shape_triplets; channel_std: the latent's std per channel (detached), so that
    distances are those of the standardised latent the transformer sees (rescale_latents), not of the raw one.
    Why: without it a square and a circle of the same colour, place and size differ by 1.3-2.7 % of the object's
    latent energy against 12-14 % in pixels (shape_report.shape_signal). With it they differ by 44-73 %; that moved
    the LCM's squares a little and the teacher's not at all (docs/nano.md, build 7)."""
    if channel_std is not None:
        latent_mean = latent_mean / channel_std.view(1, -1, 1, 1)
    objects, empty = latent_mean[:-1], latent_mean[-1:]
    by_shape = objects.view(-1, len(data.SHAPES), *objects.shape[1:])
    energy = (by_shape[:, 0] - empty).pow(2).sum(dim=(1, 2, 3)).detach()
    loss = latent_mean.new_zeros(())
    for i in range(len(data.SHAPES)):
        for j in range(i + 1, len(data.SHAPES)):
            ratio = (by_shape[:, i] - by_shape[:, j]).pow(2).sum(dim=(1, 2, 3)) / energy
            loss = loss + F.relu(margin - ratio).mean()
    return loss


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
        warmup_lr(opt, step, cosine_lr(cfg.lr, step, cfg.steps, 0.1), cfg.warmup)
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
        if cfg.shape_weight > 0:
            triplets = vae.encode(_shape_triplets(rng, cfg.shape_objects)).latent_dist.mean
            channel_std = dist.mean.detach().std(dim=(0, 2, 3))
            loss = loss + cfg.shape_weight * shape_separation_loss(triplets, cfg.shape_margin, channel_std)
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
