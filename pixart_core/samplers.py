"""Samplers: small pure functions over an epsilon predictor, in the style of k-diffusion.

Every sampler has the same shape:

    sample_x(eps_fn, x, schedule, timesteps, *, noise_fn=..., callback=...) -> x

- `eps_fn(x, t) -> eps`: x is the latent (B, C, H, W) in the usual DDPM ("variance preserving") scale, t a (B,) float
  tensor of discrete timesteps (0..999, possibly fractional). It knows about the network, text and guidance; the
  samplers know nothing about PixArt (see guidance.py).
- `x`: the noisy latent at `timesteps[0]` (pure noise for text-to-image; `noisy_start` builds it for img2img).
- `noise_fn(like) -> noise`: fresh standard normal noise shaped like `like`; the stochastic samplers (LCM, SA-Solver,
  DDIM with eta > 0) call it in the same order as the diffusers schedulers draw theirs, so a noise_fn that draws from
  per-image torch.Generators reproduces diffusers exactly.
- `callback(step, total, x, denoised)`: after each step (step counts from 0). Raising in it stops sampling at once.

The update rules follow the diffusers schedulers the PixArt pipelines use, step for step (tests compare trajectories):
`LCMScheduler`, `DPMSolverMultistepScheduler` (defaults: 2M, dpmsolver++, midpoint, lower_order_final, final σ 0),
`SASolverScheduler` (defaults: data prediction, predictor/corrector order 2, τ = 1 for 200 <= t <= 800),
`EulerDiscreteScheduler` and `DDIMScheduler`. Coefficients are computed in float64, the latent stays float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from . import schedule as sched
from .errors import PixArtError
from .schedule import DiscreteSchedule, alpha_sigma

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseFn = Callable[[torch.Tensor], torch.Tensor]
Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


def default_noise(like: torch.Tensor) -> torch.Tensor:
    return torch.randn(like.shape, dtype=like.dtype, device=like.device)


def _eps(eps_fn: EpsFn, x: torch.Tensor, t: float) -> torch.Tensor:
    tt = torch.full((x.shape[0],), float(t), dtype=torch.float32, device=x.device)
    return eps_fn(x, tt).to(x.dtype)


def _run(x: torch.Tensor, timesteps: Sequence[float], callback: Optional[Callback],
         step: Callable[[int, float, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The loop every sampler shares: `x, denoised = step(i, t, x)` at each timestep, each reported to `callback`."""
    total = len(timesteps)
    for i, t in enumerate(timesteps):
        x, denoised = step(i, t, x)
        if callback is not None:
            callback(i, total, x, denoised)
    return x


def _lambda(sigma: float) -> float:
    """Half log-SNR λ = log(α_t/σ_t) = -log σ."""
    return -math.log(sigma)


def noisy_start(schedule: DiscreteSchedule, t: float, noise: torch.Tensor,
                latent: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The latent a sampler starts from at timestep t: pure noise, or `latent` noised to t (img2img, diffusers'
    `add_noise`: sqrt(ᾱ_t)·latent + sqrt(1-ᾱ_t)·noise)."""
    if latent is None:
        return noise
    a = schedule.noise_level(t)
    return math.sqrt(a) * latent + math.sqrt(1.0 - a) * noise


# --------------------------------------------------------------------------------------------------- LCM
LCM_TIMESTEP_SCALING = 10.0
LCM_SIGMA_DATA = 0.5


def lcm_boundary_scalings(t, timestep_scaling: float = LCM_TIMESTEP_SCALING, sigma_data: float = LCM_SIGMA_DATA):
    """Consistency-model boundary condition (c_skip, c_out) at timestep t (a float, or a tensor of timesteps, as the
    distillation uses it); c_out ≈ 1 for every t the LCM tables use."""
    scaled = t * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


@torch.no_grad()
def sample_lcm(eps_fn: EpsFn, x: torch.Tensor, schedule: DiscreteSchedule, timesteps: Sequence[int], *,
               noise_fn: NoiseFn = default_noise, callback: Optional[Callback] = None) -> torch.Tensor:
    """Multistep latent-consistency sampling: predict x0, then re-noise it to the next timestep with fresh noise."""

    def step(i: int, t: float, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        eps = _eps(eps_fn, x, t)
        a_t = schedule.alpha_bar(t)
        x0 = (x - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)
        c_skip, c_out = lcm_boundary_scalings(t)
        denoised = c_out * x0 + c_skip * x
        if i == len(timesteps) - 1:
            return denoised, denoised
        a_next = schedule.alpha_bar(timesteps[i + 1])
        return math.sqrt(a_next) * denoised + math.sqrt(1.0 - a_next) * noise_fn(denoised), denoised

    return _run(x, timesteps, callback, step)


# --------------------------------------------------------------------------------------------------- DPM-Solver++ 2M
@torch.no_grad()
def sample_dpmpp_2m(eps_fn: EpsFn, x: torch.Tensor, schedule: DiscreteSchedule, timesteps: Sequence[float], *,
                    noise_fn: NoiseFn = default_noise, callback: Optional[Callback] = None) -> torch.Tensor:
    """DPM-Solver++(2M), midpoint form; first order on the first and the last step, ending at σ = 0."""
    sigmas = [schedule.sigma(t) for t in timesteps] + [0.0]
    prev_x0 = None

    def step(i: int, t: float, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal prev_x0
        alpha_s, sigma_s = alpha_sigma(sigmas[i])
        x0 = (x - sigma_s * _eps(eps_fn, x, t)) / alpha_s
        previous, prev_x0 = prev_x0, x0
        if sigmas[i + 1] == 0.0:
            return x0, x0  # the first-order step to σ = 0 lands exactly on the data prediction
        alpha_t, sigma_t = alpha_sigma(sigmas[i + 1])
        h = _lambda(sigmas[i + 1]) - _lambda(sigmas[i])
        phi = alpha_t * math.expm1(-h)  # α_t (e^{-h} - 1)
        x = (sigma_t / sigma_s) * x - phi * x0
        if previous is not None:
            r0 = (_lambda(sigmas[i]) - _lambda(sigmas[i - 1])) / h
            d1 = (x0 - previous) / r0
            x = x - 0.5 * phi * d1
        return x, x0

    return _run(x, timesteps, callback, step)


# --------------------------------------------------------------------------------------------------- SA-Solver
def sa_solver_tau(t: float) -> float:
    """Default SA-Solver stochasticity: SDE (τ = 1) in the middle of the schedule, ODE (τ = 0) at both ends."""
    return 1.0 if 200 <= t <= 800 else 0.0


def _sa_coefficients(order: int, lam_s: float, lam_t: float, nodes: Sequence[float], tau: float) -> list[float]:
    """Weights of the data predictions at `nodes` (λ values, newest first) in one SA-Solver step from λ_s to λ_t.

    Each weight is e^{-cλ_t} ∫_{λ_s}^{λ_t} e^{cλ} ℓ_i(λ) dλ with c = 1+τ² and ℓ_i the Lagrange basis polynomial of
    node i, i.e. the diffusers coefficient divided by e^{cλ_t}. For order 2 the same UniPC-like correction term as
    diffusers is added (it keeps the convergence order and helps at few steps); diffusers writes it separately for the
    predictor and the corrector, but with the corrector's nodes (λ_t, λ_s) both are this one expression.
    """
    c = 1.0 + tau * tau
    h = lam_t - lam_s
    j0 = -math.expm1(-c * h) / c  # ∫_{-h}^{0} e^{cu} du
    if order == 1:
        return [j0]
    if order != 2:
        raise PixArtError(f"SA-Solver order {order} is not supported (1 or 2).")
    k1 = (math.exp(-c * h) * (c * h + 1.0) - 1.0) / (c * c)  # ∫_{-h}^{0} u e^{cu} du
    n0, n1 = nodes
    w0 = ((lam_t - n1) * j0 + k1) / (n0 - n1)
    w1 = ((lam_t - n0) * j0 + k1) / (n1 - n0)
    extra = (h * h / 2.0 - (h * c - 1.0 + math.exp(-c * h)) / (c * c)) / (n0 - n1)
    return [w0 + extra, w1 - extra]


def _sa_update(x: torch.Tensor, x0s: Sequence[torch.Tensor], noise: torch.Tensor, sigma_s: float, sigma_t: float,
               nodes: Sequence[float], tau: float) -> torch.Tensor:
    """One stochastic Adams step (predictor or corrector) from σ_s to σ_t in data-prediction form."""
    alpha_t, sig_t = alpha_sigma(sigma_t)
    _, sig_s = alpha_sigma(sigma_s)
    lam_s, lam_t = _lambda(sigma_s), _lambda(sigma_t)
    h = lam_t - lam_s
    c = 1.0 + tau * tau
    weights = _sa_coefficients(len(x0s), lam_s, lam_t, nodes, tau)
    out = (math.exp(-tau * tau * h) * sig_t / sig_s) * x
    for w, x0 in zip(weights, x0s):
        out = out + (c * alpha_t * w) * x0
    noise_scale = sig_t * math.sqrt(-math.expm1(-2.0 * tau * tau * h))
    if noise_scale != 0.0:
        out = out + noise_scale * noise
    return out


@torch.no_grad()
def sample_sa_solver(eps_fn: EpsFn, x: torch.Tensor, schedule: DiscreteSchedule, timesteps: Sequence[float], *,
                     noise_fn: NoiseFn = default_noise, callback: Optional[Callback] = None,
                     tau_fn: Callable[[float], float] = sa_solver_tau) -> torch.Tensor:
    """SA-Solver (stochastic Adams, predictor order 2 + corrector order 2), ending at σ(t=0) like diffusers."""
    sigmas = [schedule.sigma(t) for t in timesteps] + [schedule.sigma(0)]
    lams = [_lambda(s) for s in sigmas]
    prev_x0 = last_x = last_noise = None

    def step(i: int, t: float, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal prev_x0, last_x, last_noise
        alpha_i, sigma_i = alpha_sigma(sigmas[i])
        x0 = (x - sigma_i * _eps(eps_fn, x, t)) / alpha_i
        if last_x is not None:
            # Corrector: redo the last step with the data prediction just made at its end point.
            x = _sa_update(last_x, [x0, prev_x0], last_noise, sigmas[i - 1], sigmas[i], [lams[i], lams[i - 1]],
                           tau_fn(timesteps[i - 1]))
        noise = noise_fn(x)
        last_x, last_noise = x, noise
        if prev_x0 is None or i == len(timesteps) - 1:
            x = _sa_update(x, [x0], noise, sigmas[i], sigmas[i + 1], [lams[i]], tau_fn(t))
        else:
            x = _sa_update(x, [x0, prev_x0], noise, sigmas[i], sigmas[i + 1], [lams[i], lams[i - 1]],
                           tau_fn(t))
        prev_x0 = x0
        return x, x0

    return _run(x, timesteps, callback, step)


# --------------------------------------------------------------------------------------------------- Euler
@torch.no_grad()
def sample_euler(eps_fn: EpsFn, x: torch.Tensor, schedule: DiscreteSchedule, timesteps: Sequence[float], *,
                 noise_fn: NoiseFn = default_noise, callback: Optional[Callback] = None) -> torch.Tensor:
    """Euler on the probability-flow ODE in σ space (x_σ = x·sqrt(1+σ²)), ending at σ = 0."""
    sigmas = [schedule.sigma(t) for t in timesteps] + [0.0]
    xs = x * math.sqrt(1.0 + sigmas[0] ** 2)  # the state lives in σ space; the loop and the callback see x

    def step(i: int, t: float, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal xs
        eps = _eps(eps_fn, x, t)
        x0 = xs - sigmas[i] * eps
        xs = xs + (sigmas[i + 1] - sigmas[i]) * eps
        return xs / math.sqrt(1.0 + sigmas[i + 1] ** 2), x0

    _run(xs / math.sqrt(1.0 + sigmas[0] ** 2), timesteps, callback, step)
    return xs


# --------------------------------------------------------------------------------------------------- DDIM
@torch.no_grad()
def sample_ddim(eps_fn: EpsFn, x: torch.Tensor, schedule: DiscreteSchedule, timesteps: Sequence[int], *,
                noise_fn: NoiseFn = default_noise, callback: Optional[Callback] = None,
                eta: float = 0.0) -> torch.Tensor:
    """DDIM; eta = 0 is deterministic, eta = 1 is DDPM-like ancestral sampling. Ends at ᾱ = 1."""

    def step(i: int, t: float, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        eps = _eps(eps_fn, x, t)
        a_t = schedule.alpha_bar(t)
        a_prev = schedule.alpha_bar(timesteps[i + 1]) if i + 1 < len(timesteps) else 1.0
        x0 = (x - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)
        std = eta * math.sqrt((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev))
        x = math.sqrt(a_prev) * x0 + math.sqrt(max(1.0 - a_prev - std * std, 0.0)) * eps
        return (x + std * noise_fn(x) if eta > 0 else x), x0

    return _run(x, timesteps, callback, step)


# --------------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class SamplerSpec:
    """A sampler with the defaults the official demos use for it."""

    fn: Callable[..., torch.Tensor]
    timesteps: Callable[[int], list]
    default_steps: int
    default_guidance: float  # <= 1 means no classifier-free guidance (one forward per step)
    description: str


SAMPLERS: dict[str, SamplerSpec] = {
    "lcm": SamplerSpec(sample_lcm, sched.lcm_timesteps, 4, 0.0,
                       "PixArt-δ LCM: 1-8 steps, guidance distilled in (LCMScheduler)"),
    "dpmpp_2m": SamplerSpec(sample_dpmpp_2m, sched.linspace_timesteps, 20, 4.5,
                            "DPM-Solver++ 2M: the α/Σ default (DPMSolverMultistepScheduler)"),
    "sa_solver": SamplerSpec(sample_sa_solver, sched.linspace_timesteps, 25, 3.0,
                             "SA-Solver: stochastic, the official demos' alternative (SASolverScheduler)"),
    "euler": SamplerSpec(sample_euler, sched.euler_timesteps, 20, 4.5,
                         "Euler (EulerDiscreteScheduler)"),
    "ddim": SamplerSpec(sample_ddim, sched.trailing_timesteps, 20, 4.5,
                        "DDIM, eta 0, trailing spacing (DDIMScheduler)"),
}


def get_sampler(name: str) -> SamplerSpec:
    if name not in SAMPLERS:
        raise PixArtError(f"Unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}.")
    return SAMPLERS[name]


def sampler_timesteps(name: str, steps: int, strength: float = 1.0, lcm_table: str = "diffusers") -> list:
    """The timesteps `name` visits for `steps` steps at denoise `strength` (1 = text-to-image).

    LCM shortens its distillation skeleton and keeps `steps` steps (diffusers' LCM img2img); the others skip their
    first steps, as diffusers' img2img pipelines do.
    """
    spec = get_sampler(name)
    if not 0.0 <= strength <= 1.0:
        raise PixArtError(f"denoise strength must be between 0 and 1; got {strength}.")
    if name == "lcm":
        if strength == 0.0:
            return []
        return sched.lcm_timesteps(steps, table=lcm_table, strength=strength)
    full = spec.timesteps(steps)
    return full[sched.img2img_start_index(steps, strength):]


def sample(name: str, eps_fn: EpsFn, noise: torch.Tensor, schedule: DiscreteSchedule, timesteps: Sequence[float], *,
           init_latent: Optional[torch.Tensor] = None, noise_fn: NoiseFn = default_noise,
           callback: Optional[Callback] = None) -> torch.Tensor:
    """Run sampler `name` over `timesteps` from `noise` (text-to-image) or from `init_latent` noised to the first
    timestep (img2img). No timesteps (denoise 0) returns `init_latent` unchanged."""
    spec = get_sampler(name)
    if len(timesteps) == 0:
        if init_latent is None:
            raise PixArtError("denoise 0 leaves nothing to do without an input latent; raise denoise above 0.")
        return init_latent
    x = noisy_start(schedule, timesteps[0], noise, init_latent)
    return spec.fn(eps_fn, x, schedule, timesteps, noise_fn=noise_fn, callback=callback)
