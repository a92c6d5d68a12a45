"""The discrete noise schedule PixArt was trained on, and the timestep tables each sampler walks.

PixArt-α/Σ/δ all use the DDPM schedule of the original code: 1000 steps, betas linear in β from 1e-4 to 0.02
(not "scaled_linear"), epsilon prediction. `alphas_cumprod` is built exactly as diffusers builds it (float32 linspace
and cumprod), so the same timestep gives the same ᾱ; the samplers then do their coefficient math in float64.

The timestep tables reproduce the diffusers schedulers the PixArt pipelines use:
- LCM: `LCMScheduler` (default) or the original repo's `diffusion/lcm_scheduler.py` table.
- DPM-Solver++ / SA-Solver: "linspace" spacing (999, 949, ..., 50 for 20 steps).
- Euler: `EulerDiscreteScheduler` "linspace" spacing, fractional timesteps.
- DDIM: "trailing" spacing (999, 949, ..., 49), so the first step starts from pure noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .errors import PixArtError

NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 1e-4
BETA_END = 0.02
LCM_ORIGINAL_STEPS = 50  # the DDIM skeleton the LCM was distilled on (1000 // 50 = 20 apart)
LCM_TABLES = ("diffusers", "original")


def linear_betas(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """β_t of the PixArt training schedule, t = 0..999 (the inference schedule builds on the float32 values as
    diffusers does; the training recipes on float64)."""
    return torch.linspace(BETA_START, BETA_END, NUM_TRAIN_TIMESTEPS, dtype=dtype)


def eps_from_v(x_t: torch.Tensor, v: torch.Tensor, alpha_t, sigma_t) -> torch.Tensor:
    """ε from a v-prediction (v = α_t·ε - σ_t·x0, VP terms, α_t = sqrt(ᾱ_t), σ_t = sqrt(1-ᾱ_t)): ε = α_t·v + σ_t·x_t."""
    return alpha_t * v + sigma_t * x_t


def alpha_sigma(sigma: float) -> tuple[float, float]:
    """VE σ -> (α_t, σ_t) of the VP process: α = 1/sqrt(1+σ²), σ_t = σ·α."""
    alpha = 1.0 / math.sqrt(sigma * sigma + 1.0)
    return alpha, sigma * alpha


@dataclass(frozen=True)
class DiscreteSchedule:
    """ᾱ_t and σ_t = sqrt((1-ᾱ_t)/ᾱ_t) for t = 0..999, float64 copies of the float32 values diffusers computes."""

    alphas_cumprod: torch.Tensor
    sigmas: torch.Tensor

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def alpha_bar(self, t: float) -> float:
        """ᾱ at a discrete timestep; t < 0 means "fully denoised" (ᾱ = 1, diffusers' set_alpha_to_one)."""
        if t < 0:
            return 1.0
        return float(self.alphas_cumprod[int(t)])

    def sigma(self, t: float) -> float:
        """The VE noise level σ = sqrt((1-ᾱ)/ᾱ), linearly interpolated between integer timesteps (as diffusers)."""
        sigmas = self.sigmas
        t = float(t)
        if not 0.0 <= t <= self.num_train_timesteps - 1:
            raise PixArtError(f"timestep {t} is outside 0..{self.num_train_timesteps - 1}.")
        lo = int(np.floor(t))
        hi = min(lo + 1, self.num_train_timesteps - 1)
        w = t - lo
        return float((1 - w) * sigmas[lo] + w * sigmas[hi])

    def noise_level(self, t: float) -> float:
        """ᾱ of the latent at timestep t as the samplers noise one: ᾱ_t at integer t (diffusers' add_noise), 1/(1+σ²)
        at a fractional t (Euler's first timestep), the same thing where both are defined."""
        return self.alpha_bar(t) if float(t).is_integer() else 1.0 / (1.0 + self.sigma(t) ** 2)

    def eps_from_v(self, x: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """ε from a v-prediction (v = α_t·ε - σ_t·x0 in VP terms): ε = α_t·v + σ_t·x_t, with α_t = 1/sqrt(1+σ²) and
        σ_t = σ·α_t from the interpolated σ(t), the same noise level the samplers assume at a fractional t.
        x, v: (B, C, H, W); t: (B,) timesteps. Computed in float32."""
        coeffs = torch.tensor([alpha_sigma(self.sigma(float(ti))) for ti in t.reshape(-1)], dtype=torch.float32)
        alpha, sigma_t = coeffs.to(v.device).view(-1, 2, 1, 1, 1).unbind(1)
        return eps_from_v(x.float(), v.float(), alpha, sigma_t)


def ddpm_schedule() -> DiscreteSchedule:
    """The PixArt training schedule (linear betas 1e-4..0.02 over 1000 steps)."""
    betas = linear_betas(torch.float32)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5  # float32 like diffusers; interpolated in float64
    return DiscreteSchedule(alphas_cumprod=alphas_cumprod.double(), sigmas=sigmas.double())


def _check_steps(steps: int, maximum: int = NUM_TRAIN_TIMESTEPS) -> None:
    if not isinstance(steps, int) or steps < 1 or steps > maximum:
        raise PixArtError(f"steps must be a whole number from 1 to {maximum}; got {steps!r}.")


def lcm_timesteps(steps: int, table: str = "diffusers", strength: float = 1.0,
                  original_steps: int = LCM_ORIGINAL_STEPS) -> list[int]:
    """LCM timesteps: 4 steps give [999, 759, 499, 259] (diffusers) or [999, 759, 519, 279] (original repo).

    Both pick `steps` entries from the distillation skeleton [19, 39, ..., 999]; strength < 1 (img2img) shortens that
    skeleton first, exactly as `LCMScheduler.set_timesteps(strength=...)` and the repo scheduler do.
    """
    if table not in LCM_TABLES:
        raise PixArtError(f"Unknown LCM timestep table {table!r}; use one of {', '.join(LCM_TABLES)}.")
    k = NUM_TRAIN_TIMESTEPS // original_steps
    skeleton = np.arange(1, int(original_steps * strength) + 1) * k - 1
    if len(skeleton) == 0:
        raise PixArtError(
            f"denoise {strength:g} is too low for LCM: one step needs denoise >= {1 / original_steps:g} "
            f"({original_steps} distillation steps). Raise denoise, or use another sampler for very light changes.")
    if steps < 1 or len(skeleton) < steps:
        raise PixArtError(
            f"LCM can take 1 to {len(skeleton)} steps at denoise {strength:g} "
            f"({original_steps} distillation steps x denoise); got {steps}. Use fewer steps or a higher denoise.")
    if table == "diffusers":
        reversed_skeleton = skeleton[::-1]
        idx = np.floor(np.linspace(0, len(reversed_skeleton), num=steps, endpoint=False)).astype(np.int64)
        picked = reversed_skeleton[idx]
    else:
        picked = skeleton[:: -(len(skeleton) // steps)][:steps]
    return [int(t) for t in picked]


def linspace_timesteps(steps: int) -> list[int]:
    """DPM-Solver / SA-Solver "linspace" spacing: 20 steps give 999, 949, ..., 50 (the final step goes to t=0)."""
    _check_steps(steps)
    ts = np.linspace(0, NUM_TRAIN_TIMESTEPS - 1, steps + 1).round()[::-1][:-1]
    return [int(t) for t in ts]


def euler_timesteps(steps: int) -> list[float]:
    """EulerDiscreteScheduler "linspace" spacing: fractional timesteps from 999 down to 0 (float32 values)."""
    _check_steps(steps)
    ts = np.linspace(0, NUM_TRAIN_TIMESTEPS - 1, steps, dtype=np.float32)[::-1]
    return [float(t) for t in ts]


def trailing_timesteps(steps: int) -> list[int]:
    """DDIM "trailing" spacing: 20 steps give 999, 949, ..., 49."""
    _check_steps(steps)
    ratio = NUM_TRAIN_TIMESTEPS / steps
    ts = np.round(np.arange(NUM_TRAIN_TIMESTEPS, 0, -ratio)).astype(np.int64) - 1
    return [int(t) for t in ts]


def img2img_start_index(steps: int, strength: float) -> int:
    """How many leading steps img2img skips at this denoise strength (diffusers' `get_timesteps`)."""
    if not 0.0 <= strength <= 1.0:
        raise PixArtError(f"denoise strength must be between 0 and 1; got {strength}.")
    run = min(int(steps * strength), steps)
    return max(steps - run, 0)


def step_of_timestep(timestep: float, timesteps: Sequence[float]) -> int:
    """The index of the sampling step a model evaluation at `timestep` belongs to: every sampler here evaluates the
    model once per step, at its entry of `timesteps`, so the nearest entry is that step."""
    if len(timesteps) == 0:
        raise PixArtError("No sampling timesteps to place this step on.")
    t = float(timestep)
    return min(range(len(timesteps)), key=lambda i: abs(float(timesteps[i]) - t))
