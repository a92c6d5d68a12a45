"""Recipe 1: PixArt pre-training of any PixArtTransformer (the nano model here).

The PixArt-α objective: x0 = VAE latent x scale, t ~ U{0..999}, x_t = sqrt(ᾱ)x0 + sqrt(1-ᾱ)ε, loss = MSE on ε plus
the IDDPM VLB for the learned variance (losses.py). Caption dropout for classifier-free guidance (0.1, PixArt's
class_dropout_prob): a dropped caption becomes the learned null caption y_embedding or the empty prompt (common.py).
An EMA of the weights is what gets shipped.

Nano-specific choices, all optional arguments:
- `prediction="v"` (what build_nano uses): the MSE is on v = sqrt(ᾱ)ε - sqrt(1-ᾱ)x0 instead of ε. The PixArt
  transformer has no skip from its input to its output, so at t ≈ 999 an ε model must rebuild x_t to ~1e-3 before
  its output says anything about x0 (x0 = (x_t - sqrt(1-ᾱ)ε)/sqrt(ᾱ), 1/sqrt(ᾱ_999) = 156); a 1.8 M-parameter
  model cannot, and the high-noise steps are where an 8x8 latent's layout and colour are decided. v is ≈ -x0 there.
  Measured (800 steps, 1 thread, 7 min, EMA, DPM-Solver++ 20 steps CFG 4.5, 60 prompts, colour / position): ε with
  the weighting below .87 / .30, v .97 / .70, v with the per-channel standardised VAE (vae_train.py) 1.00 / .80.
  The trained model's config says so (prediction_type "v_prediction"); the exporters record it in the files and the
  loaders read it back, so GuidedEpsilon hands the samplers ε. Its LCM student is a v model too (lcm_distill.py).
- `high_noise_weight_cap` (ε prediction only; 0, PixArt's plain ε-MSE, by default): the ε-MSE of each sample is
  weighted by min(1/ᾱ_t, cap) (v-prediction's weighting of an ε error, capped). With plain ε-MSE the nano teacher's x0
  estimate at t >= 700 stayed no better than predicting 0 (measured); a cap of 100 makes those steps learn (colour /
  position .42 / .32 -> .85 / .25 at 600 steps), but far less than v-prediction does.
- `train_text_encoder`: True trains the tiny T5 jointly (builds 1-3; frozen afterwards for the LCM and ControlNet
  recipes); that left the two-object relation at chance, because nothing makes a colour word carry its object's
  place. build_nano now pre-trains the T5 on text first (text_pretrain.py) and passes False: the encoder stays
  frozen here, as PixArt keeps its pre-trained T5 frozen.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from pixart_core.config import EPSILON, V_PREDICTION
from pixart_core.transformer import PixArtTransformer
from .common import EMA, LatentPool, TrainSchedule, cosine_lr, drop_captions, encode_text, warmup_lr
from .losses import diffusion_loss, pixel_x0_loss


@dataclass
class PretrainConfig:
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    final_lr_fraction: float = 1.0  # cosine decay of the learning rate to this fraction (1.0: constant, builds 1-6)
    weight_decay: float = 0.0
    caption_dropout: float = 0.1
    ema_decay: float = 0.998
    prediction: str = "epsilon"
    learned_sigma: bool = True
    # ε-MSE weighted by min(1/ᾱ_t, cap) (losses.high_noise_weights); 0 = PixArt's plain ε-MSE
    high_noise_weight_cap: float = 0.0
    train_text_encoder: bool = True
    # > 0: add losses.pixel_x0_loss (x0 estimate decoded by the frozen VAE, MSE in pixels) on the first
    # pixel_batch samples of each batch; needs pretrain(..., decoder=vae). 0 = PixArt's latent loss only
    pixel_weight: float = 0.0
    pixel_batch: int = 16
    seed: int = 0


@dataclass
class PretrainResult:
    model: PixArtTransformer  # the EMA weights (y_embedding included)
    text_encoder: nn.Module  # the EMA weights when trained jointly
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def pretrain(model: PixArtTransformer, t5: nn.Module, tokenizer, pool: LatentPool, cfg: PretrainConfig,
             log: Callable[[str], None] = print, log_every: int = 100, decoder=None) -> PretrainResult:
    """decoder: the frozen VAE (diffusers AutoencoderKL), only for cfg.pixel_weight > 0."""
    if cfg.pixel_weight > 0 and decoder is None:
        raise ValueError("pixel_weight > 0 needs the VAE: pretrain(..., decoder=vae)")
    if decoder is not None:
        decoder.eval().requires_grad_(False)
    sched = TrainSchedule()
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train().requires_grad_(True)
    model.config.prediction_type = V_PREDICTION if cfg.prediction == "v" else EPSILON  # before the EMA copies it
    t5.train(cfg.train_text_encoder).requires_grad_(cfg.train_text_encoder)
    # y_embedding is a buffer in the inference model; train it as a parameter and copy it back after each step
    null = nn.Parameter(model.y_embedder.y_embedding.detach().clone())
    params = [p for p in model.parameters()] + [null]
    if cfg.train_text_encoder:
        params += list(t5.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    ema = EMA(model, cfg.ema_decay)
    ema_t5 = EMA(t5, cfg.ema_decay) if cfg.train_text_encoder else None
    result = PretrainResult(ema.model, ema_t5.model if ema_t5 else t5)
    start = time.time()
    for step in range(cfg.steps):
        warmup_lr(opt, step, cosine_lr(cfg.lr, step, cfg.steps, cfg.final_lr_fraction), cfg.warmup)
        idx = torch.randint(0, len(pool), (cfg.batch_size,), generator=gen)
        x0, captions = pool.sample(idx, gen)
        with torch.set_grad_enabled(cfg.train_text_encoder):
            text = encode_text(t5, tokenizer, captions)
            empty = encode_text(t5, tokenizer, [""])
        text = drop_captions(text, null, cfg.caption_dropout, gen, empty)
        t = torch.randint(0, 1000, (cfg.batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        xt = sched.add_noise(x0, noise, t)
        out = model(xt, t.float(), model.prepare_text(text.embeds, text.mask))
        loss, parts = diffusion_loss(out, x0, xt, noise, t, sched, cfg.prediction, cfg.learned_sigma,
                                     cfg.high_noise_weight_cap)
        if cfg.pixel_weight > 0:
            pixel = _pixel_loss(decoder, pool.scale, out, x0, xt, t, sched, cfg)
            loss = loss + cfg.pixel_weight * pixel
            parts["pixel"] = float(pixel.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            model.y_embedder.y_embedding.copy_(null)
        ema.update(model)
        if ema_t5 is not None:
            ema_t5.update(t5)
        result.losses.append(parts["mse"])
        if log_every and (step % log_every == 0 or step == cfg.steps - 1):
            log(f"pretrain step {step}/{cfg.steps} mse {np.mean(result.losses[-log_every:]):.4f} "
                f"vb {parts.get('vb', 0):.4f} pixel {parts.get('pixel', 0):.4f} ({time.time() - start:.0f}s)")
    model.eval().requires_grad_(False)
    t5.eval().requires_grad_(False)
    result.seconds = time.time() - start
    return result


def _pixel_loss(decoder, scale, out, x0, xt, t, sched: TrainSchedule, cfg: PretrainConfig) -> torch.Tensor:
    """losses.pixel_x0_loss on the first cfg.pixel_batch samples (the decoder costs as much as the transformer)."""
    n = cfg.pixel_batch
    c = x0.shape[1]
    pred = out[:n, :c]
    if cfg.prediction == "v":
        x0_pred = sched.at(sched.alphas_cumprod, t[:n]).sqrt() * xt[:n] \
            - (1 - sched.at(sched.alphas_cumprod, t[:n])).sqrt() * pred
    else:
        x0_pred = sched.x0_from_eps(xt[:n], pred, t[:n])
    return pixel_x0_loss(decoder, scale, x0_pred, x0[:n], t[:n], sched)


class VPredictionAsEpsilon(nn.Module):
    """Wrap a v-prediction transformer so it returns ε in channels 0-3, for the training recipes' ε formulas:
    ε = sqrt(ᾱ_t)·v + sqrt(1-ᾱ_t)·x_t (t rounded to the training grid). Inference needs no wrapper: GuidedEpsilon
    reads config.prediction_type."""

    def __init__(self, model: PixArtTransformer):
        super().__init__()
        self.inner = model
        self.config = model.config
        self._sched = TrainSchedule()

    @property
    def dtype(self):
        return self.inner.dtype

    @property
    def device(self):
        return self.inner.device

    @property
    def y_embedder(self):
        return self.inner.y_embedder

    def __getattr__(self, name):  # anything else (check_latent, blocks, ...) is the wrapped transformer's
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("inner")
            if inner is None:
                raise
            return getattr(inner, name)

    def prepare_text(self, y, y_mask=None):
        return self.inner.prepare_text(y, y_mask)

    def null_text(self, batch, y_mask=None):
        return self.inner.null_text(batch, y_mask)

    def forward(self, x, timestep, text, **kwargs):
        out = self.inner(x, timestep, text, **kwargs)
        t = torch.as_tensor(timestep, device=x.device).reshape(-1).round().clamp(0, 999).long()
        if t.numel() == 1:
            t = t.expand(x.shape[0])
        c = self.config.in_channels
        eps = self._sched.eps_from_v(x.float(), out[:, :c].float(), t).to(out.dtype)
        return torch.cat([eps, out[:, c:]], dim=1)
