"""The PixArt training loss: MSE on the prediction (epsilon, or v as a documented option) plus IDDPM's variational
bound for the learned-range variance channels 4-7 (LossType.MSE with LEARNED_RANGE; the mean is detached there, so
the VLB term trains only the variance)."""

from __future__ import annotations

import math

import torch

from .common import TrainSchedule

PREDICTIONS = ("epsilon", "v")


def _normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def variance_vlb(sched: TrainSchedule, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                 var_values: torch.Tensor) -> torch.Tensor:
    """Per-sample VLB in bits/dim for the learned-range variance (IDDPM `_vb_terms_bpd`, mean frozen).
    At t = 0 the decoder term is the Gaussian NLL of x0 (latents are continuous, not 8-bit pixels)."""
    frac = (var_values + 1) / 2
    min_log = sched.at(sched.post_log_var, t)
    max_log = sched.at(torch.log(sched.betas), t)
    model_log_var = frac * max_log + (1 - frac) * min_log
    pred_x0 = sched.x0_from_eps(xt, eps.detach(), t)
    c0, ct = sched.at(sched.post_coef_x0, t), sched.at(sched.post_coef_xt, t)
    model_mean = c0 * pred_x0 + ct * xt
    true_mean = c0 * x0 + ct * xt
    kl = _normal_kl(true_mean, min_log, model_mean, model_log_var).mean(dim=(1, 2, 3)) / math.log(2.0)
    nll = (0.5 * (math.log(2 * math.pi) + model_log_var + (x0 - model_mean) ** 2 * torch.exp(-model_log_var)))
    nll = nll.mean(dim=(1, 2, 3)) / math.log(2.0)
    return torch.where(t == 0, nll, kl)


def high_noise_weights(sched: TrainSchedule, t: torch.Tensor, cap: float) -> torch.Tensor:
    """Per-sample weights min(1/ᾱ_t, cap), normalised to mean 1 over t ~ U{0..999}.

    ε-MSE x 1/ᾱ_t is the v-prediction MSE of the same ε output: it weights each t by how much an ε error moves the
    x0 estimate. Plain ε-MSE gives the high-noise steps, where an 8x8 latent's layout is decided, ~50x less gradient
    than t ~ 100; the cap keeps t near 999 (1/ᾱ = 25 000) from taking over."""
    table = (1.0 / sched.alphas_cumprod).clamp(max=cap)
    return table.to(t.device)[t.long()] / table.mean()


def diffusion_loss(out: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                   sched: TrainSchedule, prediction: str = "epsilon", learned_sigma: bool = True,
                   weight_cap: float = 0.0) -> tuple[torch.Tensor, dict]:
    """out: (B, 8, H, W) model output. Returns the loss and its parts (floats); "mse" is the unweighted MSE.
    weight_cap > 0: ε-MSE weighted by high_noise_weights (ε prediction only)."""
    c = x0.shape[1]
    pred = out[:, :c]
    if prediction == "epsilon":
        target, eps = noise, pred
    elif prediction == "v":
        target, eps = sched.v_target(x0, noise, t), sched.eps_from_v(xt, pred, t)
    else:
        raise ValueError(f"prediction must be one of {PREDICTIONS}")
    per_sample = (pred - target).pow(2).mean(dim=(1, 2, 3))
    mse = per_sample.mean()
    if weight_cap > 0 and prediction == "epsilon":
        loss = (high_noise_weights(sched, t, weight_cap) * per_sample).mean()
    else:
        loss = mse
    parts = {"mse": float(mse.detach())}
    if learned_sigma and out.shape[1] == 2 * c:
        vb = variance_vlb(sched, x0, xt, t, eps, out[:, c:]).mean()
        loss = loss + vb
        parts["vb"] = float(vb.detach())
    return loss, parts


def pixel_x0_loss(decoder, scale: float, x0_pred: torch.Tensor, x0: torch.Tensor, t: torch.Tensor,
                  sched: TrainSchedule) -> torch.Tensor:
    """MSE between the decoded x0 estimate and the decoded target, per sample weighted by ᾱ_t (the high-noise
    estimates are blurred conditional means whose pixels say nothing; ᾱ_t fades them out). decoder: the frozen
    diffusers AutoencoderKL; latents are scaled by `scale`.

    Why (measured by train/shape_report.py): in the nano VAE's latent a square and a circle of the same colour, place
    and size differ by only 1-3 % of the object's squared latent norm (a triangle by 21-29 %), so the latent MSE hardly
    tells them apart and the model draws circles for squares; in pixels the corners are about 10 % of the object."""
    pred = decoder.decode(x0_pred / scale).sample
    with torch.no_grad():
        target = decoder.decode(x0 / scale).sample
    per_sample = (pred - target).pow(2).mean(dim=(1, 2, 3))
    return (sched.at(sched.alphas_cumprod, t).view(-1) * per_sample).mean()
