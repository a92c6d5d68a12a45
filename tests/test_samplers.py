"""Our samplers and timestep tables against the diffusers schedulers, on a toy epsilon predictor.

The toy model is the exact epsilon predictor for Gaussian data (so magnitudes stay realistic) plus a fixed random
channel-mixing term; every step of our trajectory is compared with the diffusers scheduler driven by the same model,
the same starting latent and the same noise stream.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, LCMScheduler,
                       SASolverScheduler)

from pixart_core import samplers, schedule
from pixart_core.errors import PixArtError
from pixart_core.resolution import (ASPECT_RATIO_256_BIN, ASPECT_RATIO_512_BIN, ASPECT_RATIO_1024_BIN,
                                    ASPECT_RATIO_2048_BIN, classify_height_width_bin, plan_size, resize_and_crop)

TOL = 1e-4
SCHEDULE = schedule.ddpm_schedule()
PIXART_BETAS = dict(beta_start=1e-4, beta_end=0.02, beta_schedule="linear", num_train_timesteps=1000)


def toy_eps_fn(seed: int = 0, data_var: float = 0.5):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(4, 4, generator=g) * 0.3
    bias = torch.randn(4, generator=g)
    ac = SCHEDULE.alphas_cumprod.float()

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.shape == (x.shape[0],) and t.is_floating_point()
        a = torch.stack([_interp(ac, float(ti)) for ti in t]).view(-1, 1, 1, 1)
        exact = (1 - a).sqrt() * x / (a * data_var + 1 - a)
        wobble = torch.tanh(torch.einsum("oc,bchw->bohw", mix, x) + bias.view(1, 4, 1, 1) * (t.view(-1, 1, 1, 1) / 1000))
        return exact + 0.1 * wobble

    return eps_fn


def _interp(ac: torch.Tensor, t: float) -> torch.Tensor:
    lo = int(math.floor(t))
    hi = min(lo + 1, 999)
    w = t - lo
    return (1 - w) * ac[lo] + w * ac[hi]


def diffusers_trajectory(scheduler, eps_fn, x, timesteps_kwargs, generator=None, step_kwargs=None):
    scheduler.set_timesteps(**timesteps_kwargs)
    xs = []
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t)
        eps = eps_fn(inp, t.expand(x.shape[0]).float())
        x = scheduler.step(eps, t, x, generator=generator, return_dict=False, **(step_kwargs or {}))[0]
        xs.append(x)
    return [int(t) if not t.is_floating_point() else float(t) for t in scheduler.timesteps], xs


def our_trajectory(fn, eps_fn, x, timesteps, noise_fn=samplers.default_noise, **kw):
    xs = []
    out = fn(eps_fn, x, SCHEDULE, timesteps, noise_fn=noise_fn, callback=lambda i, n, xi, d: xs.append(xi), **kw)
    assert torch.equal(out, xs[-1])
    return xs


def seeded_noise(seed: int):
    g = torch.Generator().manual_seed(seed)
    return lambda like: torch.randn(like.shape, generator=g, dtype=like.dtype)


def start_latent(seed=1, shape=(2, 4, 8, 6)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def assert_close_trajectory(ours, theirs, tol=TOL):
    assert len(ours) == len(theirs)
    worst = max((a - b).abs().max().item() for a, b in zip(ours, theirs))
    assert worst <= tol, f"max abs diff {worst:.3e}"
    return worst


# ------------------------------------------------------------------------------------------------ schedule
def test_alphas_cumprod_matches_diffusers_and_reference_values():
    ref = LCMScheduler(**PIXART_BETAS).alphas_cumprod
    assert torch.equal(SCHEDULE.alphas_cumprod.float(), ref)
    # linear betas 1e-4..0.02 (α repo gaussian_diffusion.get_named_beta_schedule): ᾱ_999, ᾱ_759, ᾱ_499, ᾱ_259
    for t, v in [(999, 4.036e-5), (759, 2.877e-3), (499, 7.859e-2), (259, 0.4976)]:
        assert SCHEDULE.alpha_bar(t) == pytest.approx(v, rel=1e-3)


@pytest.mark.parametrize("steps", range(1, 9))
def test_lcm_table_matches_lcm_scheduler(steps):
    s = LCMScheduler(**PIXART_BETAS)
    s.set_timesteps(steps)
    assert schedule.lcm_timesteps(steps) == s.timesteps.tolist()
    s.set_timesteps(steps, strength=0.6)
    assert schedule.lcm_timesteps(steps, strength=0.6) == s.timesteps.tolist()


def test_lcm_original_table_is_the_repo_table():
    # the original repo's diffusion/lcm_scheduler.py tables.
    assert schedule.lcm_timesteps(4, table="original") == [999, 759, 519, 279]
    assert schedule.lcm_timesteps(3, table="original") == [999, 679, 359]
    assert schedule.lcm_timesteps(8, table="original") == [999, 879, 759, 639, 519, 399, 279, 159]
    assert schedule.lcm_timesteps(2, table="original") == [999, 499]
    assert schedule.lcm_timesteps(4) == [999, 759, 499, 259]


@pytest.mark.parametrize("steps", [1, 2, 7, 14, 20, 25, 50])
def test_other_tables_match_diffusers(steps):
    for cls, ours in [(DPMSolverMultistepScheduler, schedule.linspace_timesteps),
                      (SASolverScheduler, schedule.linspace_timesteps)]:
        s = cls(**PIXART_BETAS)
        s.set_timesteps(steps)
        assert ours(steps) == s.timesteps.tolist()
    s = EulerDiscreteScheduler(**PIXART_BETAS)
    s.set_timesteps(steps)
    assert schedule.euler_timesteps(steps) == s.timesteps.tolist()
    s = DDIMScheduler(**PIXART_BETAS, timestep_spacing="trailing")
    s.set_timesteps(steps)
    assert schedule.trailing_timesteps(steps) == s.timesteps.tolist()


def test_bad_step_counts_are_user_errors():
    with pytest.raises(PixArtError, match="LCM"):
        schedule.lcm_timesteps(60)
    with pytest.raises(PixArtError, match="table"):
        schedule.lcm_timesteps(4, table="nope")
    with pytest.raises(PixArtError):
        schedule.linspace_timesteps(0)
    with pytest.raises(PixArtError, match="Unknown sampler"):
        samplers.get_sampler("heun")


# ------------------------------------------------------------------------------------------------ trajectories
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_lcm_trajectory_matches_lcm_scheduler(steps):
    eps_fn, x = toy_eps_fn(), start_latent()
    ts, theirs = diffusers_trajectory(LCMScheduler(**PIXART_BETAS), eps_fn, x.clone(), {"num_inference_steps": steps},
                                      generator=torch.Generator().manual_seed(7))
    ours = our_trajectory(samplers.sample_lcm, eps_fn, x.clone(), schedule.lcm_timesteps(steps), seeded_noise(7))
    assert_close_trajectory(ours, theirs)


@pytest.mark.parametrize("steps", [5, 20])
def test_dpmpp_2m_trajectory_matches_dpm_solver_multistep(steps):
    eps_fn, x = toy_eps_fn(1), start_latent(2)
    _, theirs = diffusers_trajectory(DPMSolverMultistepScheduler(**PIXART_BETAS), eps_fn, x.clone(),
                                     {"num_inference_steps": steps})
    ours = our_trajectory(samplers.sample_dpmpp_2m, eps_fn, x.clone(), schedule.linspace_timesteps(steps))
    assert_close_trajectory(ours, theirs)


@pytest.mark.parametrize("steps", [4, 25])
def test_sa_solver_trajectory_matches_sa_solver_scheduler(steps):
    eps_fn, x = toy_eps_fn(2), start_latent(3)
    _, theirs = diffusers_trajectory(SASolverScheduler(**PIXART_BETAS), eps_fn, x.clone(),
                                     {"num_inference_steps": steps}, generator=torch.Generator().manual_seed(11))
    ours = our_trajectory(samplers.sample_sa_solver, eps_fn, x.clone(), schedule.linspace_timesteps(steps),
                          seeded_noise(11))
    assert_close_trajectory(ours, theirs)


def test_euler_trajectory_matches_euler_discrete():
    steps = 12
    eps_fn, x = toy_eps_fn(3), start_latent(4)
    s = EulerDiscreteScheduler(**PIXART_BETAS)
    s.set_timesteps(steps)
    sig = s.sigmas.double()
    # Ours starts from the exact VP->VE conversion x*sqrt(1+σ0²); diffusers would multiply by σ0 (2e-5 apart).
    x_ve = x * math.sqrt(1 + sig[0].item() ** 2)
    _, theirs_ve = diffusers_trajectory(s, eps_fn, x_ve, {"num_inference_steps": steps})
    theirs = [xv / math.sqrt(1 + sig[i + 1].item() ** 2) for i, xv in enumerate(theirs_ve)]
    ours = our_trajectory(samplers.sample_euler, eps_fn, x.clone(), schedule.euler_timesteps(steps))
    assert_close_trajectory(ours, theirs)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_trajectory_matches_ddim_scheduler(eta):
    steps = 10
    eps_fn, x = toy_eps_fn(4), start_latent(5)
    s = DDIMScheduler(**PIXART_BETAS, timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True)
    _, theirs = diffusers_trajectory(s, eps_fn, x.clone(), {"num_inference_steps": steps},
                                     generator=torch.Generator().manual_seed(3), step_kwargs={"eta": eta})
    ours = our_trajectory(samplers.sample_ddim, eps_fn, x.clone(), schedule.trailing_timesteps(steps),
                          seeded_noise(3), eta=eta)
    assert_close_trajectory(ours, theirs)


def test_img2img_start_matches_add_noise_and_strength_tables():
    latent, noise = start_latent(6), start_latent(7)
    s = DPMSolverMultistepScheduler(**PIXART_BETAS)
    s.set_timesteps(20)
    start = schedule.img2img_start_index(20, 0.6)
    ts = samplers.sampler_timesteps("dpmpp_2m", 20, strength=0.6)
    assert ts == s.timesteps[start:].tolist() and len(ts) == 12
    ref = s.add_noise(latent, noise, torch.tensor([ts[0]]))
    ours = samplers.noisy_start(SCHEDULE, ts[0], noise, latent)
    assert (ours - ref).abs().max().item() < 1e-6
    lcm = LCMScheduler(**PIXART_BETAS)
    lcm.set_timesteps(4, strength=0.5)
    assert samplers.sampler_timesteps("lcm", 4, strength=0.5) == lcm.timesteps.tolist()


def test_denoise_zero_returns_input_and_full_denoise_ignores_it():
    eps_fn, latent = toy_eps_fn(), start_latent(8)
    assert samplers.sampler_timesteps("euler", 10, strength=0.0) == []
    out = samplers.sample("euler", eps_fn, torch.zeros_like(latent), SCHEDULE, [], init_latent=latent)
    assert torch.equal(out, latent)
    with pytest.raises(PixArtError, match="denoise"):
        samplers.sampler_timesteps("ddim", 10, strength=1.5)


def test_callback_exception_stops_sampling_immediately():
    calls = []
    eps_fn = toy_eps_fn()

    def counting_eps(x, t):
        calls.append(float(t[0]))
        return eps_fn(x, t)

    def cb(i, n, x, d):
        if i == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        samplers.sample_dpmpp_2m(counting_eps, start_latent(), SCHEDULE, schedule.linspace_timesteps(20), callback=cb)
    assert len(calls) == 2


# ------------------------------------------------------------------------------------------------ resolution bins
def test_bin_tables_equal_diffusers():
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (ASPECT_RATIO_256_BIN as d256,
                                                                        ASPECT_RATIO_512_BIN as d512,
                                                                        ASPECT_RATIO_1024_BIN as d1024)
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_2048_BIN as d2048
    for ours, theirs in [(ASPECT_RATIO_256_BIN, d256), (ASPECT_RATIO_512_BIN, d512),
                         (ASPECT_RATIO_1024_BIN, d1024), (ASPECT_RATIO_2048_BIN, d2048)]:
        assert list(ours) == list(theirs)
        assert {k: tuple(map(float, v)) for k, v in ours.items()} == {k: tuple(v) for k, v in theirs.items()}


def test_classify_and_resize_match_diffusers_image_processor():
    from diffusers.image_processor import PixArtImageProcessor
    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = int(rng.integers(64, 4096)), int(rng.integers(64, 4096))
        for table in (ASPECT_RATIO_512_BIN, ASPECT_RATIO_1024_BIN, ASPECT_RATIO_2048_BIN):
            ref_table = {k: [float(a), float(b)] for k, (a, b) in table.items()}
            assert classify_height_width_bin(h, w, table) == PixArtImageProcessor.classify_height_width_bin(
                h, w, ratios=ref_table)
    img = torch.rand(2, 3, 96, 160)
    for w, h in [(150, 100), (100, 150), (160, 96), (77, 33)]:
        ref = PixArtImageProcessor.resize_and_crop_tensor(img, w, h)
        ours = resize_and_crop(img, w, h)
        assert ours.shape == ref.shape == (2, 3, h, w)
        assert torch.equal(ours, ref)


def test_plan_size_without_binning_needs_multiples_of_16():
    p = plan_size(1000, 600, 1024, binning=True)
    assert (p.gen_height, p.gen_width, p.out_height, p.out_width) == (768, 1280, 600, 1000)
    assert plan_size(512, 768, 1024, binning=False).latent_shape == (96, 64)
    with pytest.raises(PixArtError, match="multiples of 16"):
        plan_size(1000, 600, 1024, binning=False)
    # a model trained at a size with no bin table (PixArt-nano, 64 px) is never binned: the request is the size
    nano = plan_size(48, 64, 64, binning=True)  # width 48, height 64
    assert (nano.gen_height, nano.gen_width, nano.out_height, nano.out_width) == (64, 48, 64, 48)
    with pytest.raises(PixArtError, match="multiples of 16"):
        plan_size(60, 64, 64, binning=True)
