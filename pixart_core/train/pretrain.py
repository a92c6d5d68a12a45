"""Recipe 1: PixArt pre-training of any PixArtTransformer (the nano model here).

The PixArt-α objective: x0 = VAE latent x scale, t ~ U{0..999}, x_t = sqrt(ᾱ)x0 + sqrt(1-ᾱ)ε, loss = MSE on ε plus
the IDDPM VLB for the learned variance (losses.py). Caption dropout for classifier-free guidance (0.1, PixArt's
class_dropout_prob): a dropped caption becomes the learned null caption y_embedding or the empty prompt (common.py).
An EMA of the weights is what gets shipped.

Nano-specific choices, all optional arguments:
- `train_text_encoder`: the tiny T5 is trained jointly (PixArt keeps its huge pre-trained T5 frozen; a tiny T5
  built from scratch has nothing to be frozen at). Frozen afterwards for the LCM and ControlNet recipes.
- `prediction="v"`: v-prediction instead of ε. Not needed for the nano model (ε converges in latent space); a
  v-model would need `VPredictionAsEpsilon` to sample with the project's ε samplers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..transformer import PixArtTransformer
from .common import EMA, LatentPool, TrainSchedule, drop_captions, encode_text, warmup_lr
from .losses import diffusion_loss


@dataclass
class PretrainConfig:
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.0
    caption_dropout: float = 0.1
    ema_decay: float = 0.998
    prediction: str = "epsilon"
    learned_sigma: bool = True
    train_text_encoder: bool = True
    seed: int = 0


@dataclass
class PretrainResult:
    model: PixArtTransformer  # the EMA weights (y_embedding included)
    text_encoder: nn.Module  # the EMA weights when trained jointly
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def pretrain(model: PixArtTransformer, t5: nn.Module, tokenizer, pool: LatentPool, cfg: PretrainConfig,
             log: Callable[[str], None] = print, log_every: int = 100) -> PretrainResult:
    sched = TrainSchedule()
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train().requires_grad_(True)
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
        warmup_lr(opt, step, cfg.lr, cfg.warmup)
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
        loss, parts = diffusion_loss(out, x0, xt, noise, t, sched, cfg.prediction, cfg.learned_sigma)
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
                f"vb {parts.get('vb', 0):.4f} ({time.time() - start:.0f}s)")
    model.eval().requires_grad_(False)
    t5.eval().requires_grad_(False)
    result.seconds = time.time() - start
    return result


class VPredictionAsEpsilon(nn.Module):
    """Wrap a v-prediction transformer so it returns ε in channels 0-3, for the project's ε samplers and guidance:
    ε = sqrt(ᾱ_t)·v + sqrt(1-ᾱ_t)·x_t (t rounded to the training grid)."""

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
