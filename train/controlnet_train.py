"""Recipe 3: ControlNet-Transformer training as PixArt-δ (α repo `train_scripts/train_controlnet.py`)
for any PixArtTransformer base, using the project's PixArtControlNet (controlnet.py).

- N trainable copies of the first base blocks: 13 for XL-2, half the depth for small models (`default_copies`);
- copy k starts as base block k; before_proj (copy 0 only) and every after_proj are zero-initialised, so training
  starts from the unchanged base model;
- the base is frozen; the hint is the VAE latent of the edge map (posterior sample x scale) through the frozen base
  patch embedder + position embedding (ControlHint does that);
- loss: the pre-training loss (losses.py) of base + control, in the base's parametrisation (its config.prediction_type: ε,
  or v for the nano base); caption dropout 0.5 (the PixArt ControlNet config), which makes the model lean on the edges.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from pixart_core.config import V_PREDICTION
from pixart_core.controlnet import ControlNetInfo, PixArtControlNet
from pixart_core.transformer import PixArtTransformer
from .common import LatentPool, TrainSchedule, drop_captions, encode_text, warmup_lr
from .losses import diffusion_loss


@dataclass
class ControlNetTrainConfig:
    steps: int = 600
    batch_size: int = 32
    lr: float = 5e-4
    warmup: int = 50
    caption_dropout: float = 0.5
    copies: int | None = None  # None: default_copies(depth)
    seed: int = 0


@dataclass
class ControlNetTrainResult:
    controlnet: PixArtControlNet
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def default_copies(depth: int) -> int:
    """13 copies for the 28-block XL-2 (the released ControlNets), half the depth for smaller models."""
    return 13 if depth >= 28 else max(1, depth // 2)


def controlnet_from_base(base: PixArtTransformer, copies: int) -> PixArtControlNet:
    c = base.config
    info = ControlNetInfo(num_copies=copies, hidden_size=c.hidden_size, num_heads=c.num_heads, mlp_ratio=c.mlp_ratio,
                          qk_norm=c.qk_norm, family=c.family, text_len=c.text_len,
                          caption_channels=c.caption_channels, sample_size=c.sample_size)
    cn = PixArtControlNet(info)
    with torch.no_grad():
        for i, copy_ in enumerate(cn.controlnet):
            copy_.copied_block.load_state_dict(base.blocks[i].state_dict())
            for proj in (copy_.before_proj, copy_.after_proj):
                if proj is not None:
                    proj.weight.zero_()
                    proj.bias.zero_()
    return cn


class HintPool:
    """Image latents and edge-map latents (posterior mean/std, unscaled) of the same scenes, with captions."""

    def __init__(self, images: LatentPool, hints: LatentPool):
        assert len(images) == len(hints)
        self.images, self.hints = images, hints

    def __len__(self) -> int:
        return len(self.images)

    def sample(self, idx: torch.Tensor, generator: torch.Generator):
        x0, captions = self.images.sample(idx, generator)
        hint, _ = self.hints.sample(idx, generator)
        return x0, hint, captions


def train_controlnet(base: PixArtTransformer, t5: nn.Module, tokenizer, pool: HintPool, cfg: ControlNetTrainConfig,
                     log: Callable[[str], None] = print, log_every: int = 50) -> ControlNetTrainResult:
    sched = TrainSchedule()
    gen = torch.Generator().manual_seed(cfg.seed)
    base.eval().requires_grad_(False)
    cn = controlnet_from_base(base, cfg.copies or default_copies(base.config.depth)).train()
    opt = torch.optim.AdamW(cn.parameters(), lr=cfg.lr, weight_decay=0.0)
    null = base.y_embedder.y_embedding
    prediction = "v" if base.config.prediction_type == V_PREDICTION else "epsilon"  # in losses.py's names
    result = ControlNetTrainResult(cn)
    start = time.time()
    for step in range(cfg.steps):
        warmup_lr(opt, step, cfg.lr, cfg.warmup)
        idx = torch.randint(0, len(pool), (cfg.batch_size,), generator=gen)
        x0, hint, captions = pool.sample(idx, gen)
        with torch.no_grad():
            text = encode_text(t5, tokenizer, captions)
            empty = encode_text(t5, tokenizer, [""])
        text = drop_captions(text, null, cfg.caption_dropout, gen, empty)
        t = torch.randint(0, 1000, (x0.shape[0],), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        xt = sched.add_noise(x0, noise, t)
        control = cn.bind(base, hint)
        out = base(xt, t.float(), base.prepare_text(text.embeds, text.mask), controls=[control])
        loss, parts = diffusion_loss(out, x0, xt, noise, t, sched, prediction)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(cn.parameters(), 1.0)
        opt.step()
        result.losses.append(parts["mse"])
        if log_every and (step % log_every == 0 or step == cfg.steps - 1):
            log(f"controlnet step {step}/{cfg.steps} mse {np.mean(result.losses[-log_every:]):.4f} "
                f"({time.time() - start:.0f}s)")
    cn.eval().requires_grad_(False)
    result.seconds = time.time() - start
    return result
