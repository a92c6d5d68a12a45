"""Recipe 2: latent-consistency distillation exactly as PixArt-δ (`train_scripts/train_pixart_lcm.py`,
α repo `train_scripts/train_pixart_lcm.py`), for any PixArtTransformer teacher.

- teacher: frozen; student: initialised from the teacher; target network: EMA of the student, decay 0.95;
- DDIM skeleton of 50 steps, skip k = 1000 // 50 = 20: start t ∈ {19, 39, ..., 999}, target t = start - 20 (>= 0);
- guidance fixed, not embedded: w = 4.5, x0 = x0_c + w(x0_c - x0_u), ε = ε_c + w(ε_c - ε_u); the unconditional
  input is the learned null caption y_embedding (masked like the prompt);
- consistency boundary scalings c_skip = 0.25/((10t)²+0.25), c_out = 10t/sqrt((10t)²+0.25) (σ_data 0.5, timestep
  scaling 10), applied to the student at the start step and to the target at the previous step;
- loss: pseudo-Huber sqrt((pred-target)² + c²) - c with c = 0.001; no caption dropout.
The learning rate (PixArt-δ: 2e-5 for a 0.6B model) is a size-dependent choice; the nano build uses a larger one.
A v-prediction teacher (config.prediction_type "v_prediction", the nano build) gets a v student: every network
runs through VPredictionAsEpsilon, so the formulas above are unchanged. An ε student initialised from a v teacher
cannot follow (measured, 300 steps from a .98 / .70 colour / position teacher: LCM 4 steps .35 / .45 with an ε
student, .98 / .75 with a v student; see pretrain.py for why ε fails at high noise on this model).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from pixart_core.config import V_PREDICTION
from pixart_core.samplers import lcm_boundary_scalings
from pixart_core.transformer import PixArtTransformer
from .common import EMA, LatentPool, TrainSchedule, encode_text, null_text, warmup_lr
from .pretrain import VPredictionAsEpsilon

NUM_DDIM_TIMESTEPS = 50


@dataclass
class LCMConfig:
    steps: int = 800
    batch_size: int = 64
    lr: float = 2e-4
    warmup: int = 50
    guidance_w: float = 4.5
    target_ema: float = 0.95
    huber_c: float = 0.001
    num_ddim_timesteps: int = NUM_DDIM_TIMESTEPS
    seed: int = 0


@dataclass
class LCMResult:
    student: PixArtTransformer
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def boundary_scalings(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    c_skip, c_out = lcm_boundary_scalings(t.float())
    return c_skip.view(-1, 1, 1, 1), c_out.view(-1, 1, 1, 1)


def lcm_distill(teacher: PixArtTransformer, t5: nn.Module, tokenizer, pool: LatentPool, cfg: LCMConfig,
                log: Callable[[str], None] = print, log_every: int = 50) -> LCMResult:
    sched = TrainSchedule()
    gen = torch.Generator().manual_seed(cfg.seed)
    teacher.eval().requires_grad_(False)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    student.y_embedder.y_embedding.requires_grad_(False)
    target = EMA(student, cfg.target_ema, warmup=False)
    # the student (a copy of the teacher) keeps its parametrisation; a v model is read through its ε view, so the
    # DDIM step and c_skip/c_out below are the ε formulas for both
    as_eps = VPredictionAsEpsilon if teacher.config.prediction_type == V_PREDICTION else (lambda m: m)
    teacher_eps, student_eps, target_eps = as_eps(teacher), as_eps(student), as_eps(target.model)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    k = 1000 // cfg.num_ddim_timesteps
    ddim_timesteps = torch.arange(1, cfg.num_ddim_timesteps + 1) * k - 1  # 19, 39, ..., 999
    ab = sched.alphas_cumprod
    null = teacher.y_embedder.y_embedding
    result = LCMResult(student)
    start = time.time()
    for step in range(cfg.steps):
        warmup_lr(opt, step, cfg.lr, cfg.warmup)
        idx = torch.randint(0, len(pool), (cfg.batch_size,), generator=gen)
        x0, captions = pool.sample(idx, gen)
        with torch.no_grad():
            text = encode_text(t5, tokenizer, captions)
        b = x0.shape[0]
        index = torch.randint(0, cfg.num_ddim_timesteps, (b,), generator=gen)
        t_start = ddim_timesteps[index]
        t_prev = (t_start - k).clamp(min=0)
        noise = torch.randn(x0.shape, generator=gen)
        xt = sched.add_noise(x0, noise, t_start)

        cond = student.prepare_text(text.embeds, text.mask)
        eps_s = student_eps(xt, t_start.float(), cond)[:, :4]
        c_skip_s, c_out_s = boundary_scalings(t_start)
        pred = c_skip_s * xt + c_out_s * sched.x0_from_eps(xt, eps_s, t_start)

        with torch.no_grad():
            both = torch.cat([text.embeds, null_text(null, text.mask).embeds.to(text.embeds.dtype)])
            t_cond = teacher.prepare_text(both, torch.cat([text.mask, text.mask]))
            out = teacher_eps(torch.cat([xt, xt]), torch.cat([t_start, t_start]).float(), t_cond)[:, :4]
            eps_c, eps_u = out.chunk(2)
            x0_c, x0_u = sched.x0_from_eps(xt, eps_c, t_start), sched.x0_from_eps(xt, eps_u, t_start)
            w = cfg.guidance_w
            x0_g = x0_c + w * (x0_c - x0_u)
            eps_g = eps_c + w * (eps_c - eps_u)
            # one DDIM step from t_start to t_prev (ᾱ of t_prev; at index 0 the previous is ᾱ_0, as DDIMSolver)
            ab_prev = ab[t_prev].view(-1, 1, 1, 1)
            x_prev = ab_prev.sqrt() * x0_g + (1 - ab_prev).sqrt() * eps_g

            eps_t = target_eps(x_prev, t_prev.float(), target.model.prepare_text(text.embeds, text.mask))[:, :4]
            c_skip, c_out = boundary_scalings(t_prev)
            tgt = c_skip * x_prev + c_out * sched.x0_from_eps(x_prev, eps_t, t_prev)

        loss = (torch.sqrt((pred - tgt) ** 2 + cfg.huber_c**2) - cfg.huber_c).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        target.update(student)
        result.losses.append(float(loss.detach()))
        if log_every and (step % log_every == 0 or step == cfg.steps - 1):
            log(f"lcm step {step}/{cfg.steps} huber {np.mean(result.losses[-log_every:]):.5f} "
                f"({time.time() - start:.0f}s)")
    student.eval().requires_grad_(False)
    result.seconds = time.time() - start
    return result
