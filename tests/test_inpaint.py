"""Inpainting (pixart_core/inpaint.py): a LATENT's noise mask honoured by every sampler as ComfyUI's KSampler does.

Oracle: `comfy_reference` below, a loop written from ComfyUI 0.3.64's formulas and not from ours: KSamplerX0Inpaint
(comfy/samplers.py) around k-diffusion's Euler, DPM-Solver++(2M) and LCM samplers, in ComfyUI's σ space (x = x0 + σ·n),
with the EPS model wrapper (input x/sqrt(1+σ²), denoised = x - σ·ε) and ComfyUI's LCM boundary scalings. It calls the
same guided ε network (tiny transformer + CFG + control + step cache) at the same timesteps; ComfyUI would map σ back
to t itself (log-σ interpolation), which gives the same t.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pixart_core import pipeline as pl
from pixart_core import samplers
from pixart_core.errors import PixArtError
from pixart_core.guidance import GuidedEpsilon
from pixart_core.inpaint import prepare_mask
from pixart_core.loading.checkpoint import load_transformer
from pixart_core.schedule import ddpm_schedule
from pixart_core.step_cache import step_cache_options
from tests.conftest import record_keyword
from tests.factories import tiny_diffusers_transformer
from tests.test_workflows import env as workflow_env  # noqa: F401  (the stand-in ComfyUI folders and tiny models)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: tiny models, shared CPU

SIZE = 128  # px: 16 x 16 latents
BATCH = 2
TEXT_LEN, CAPTION = 12, 64


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("inpaint")
    tiny_diffusers_transformer(family="sigma", sample_size=16, depth=4, seed=7).save_pretrained(root / "transformer")
    return load_transformer(root, dtype=torch.float32)


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(BATCH, TEXT_LEN, CAPTION, generator=g)
    neg = torch.randn(BATCH, TEXT_LEN, CAPTION, generator=g)
    mask = torch.zeros(BATCH, TEXT_LEN, dtype=torch.long)
    mask[:, :6] = 1
    neg_mask = torch.zeros(BATCH, TEXT_LEN, dtype=torch.long)
    neg_mask[:, 0] = 1
    latent = torch.randn(BATCH, 4, SIZE // 8, SIZE // 8, generator=g)
    return embeds, mask, neg, neg_mask, latent


def box_mask(h: int = SIZE // 8, w: int = SIZE // 8) -> torch.Tensor:
    """(1, h, w): 1 (repaint) in a box right of the centre, 0 (keep) elsewhere."""
    m = torch.zeros(1, h, w)
    m[:, h // 4: 3 * h // 4, w // 2: w - w // 8] = 1.0
    return m


class Control:
    """A stand-in ControlNet signal: a residual for block 1 that depends on the tokens it sees."""

    def __call__(self, h, t0, text, grid_hw):
        return [0.5 * torch.tanh(h)]


def options(sampler: str, extras: str = ""):
    guidance = 0.0 if sampler == "lcm" else 4.5
    return dict(sampler=sampler, steps=6 if sampler != "lcm" else 4, guidance_scale=guidance,
                step_cache=step_cache_options("both" if "cache" in extras else None),
                controls=[Control()] if "control" in extras else None)


def ours(model, sampler, noise_mask, *, denoise=0.7, extras="", seed=3, callback=None):
    embeds, mask, neg, neg_mask, latent = inputs()
    return pl.generate_latents(model, embeds, mask, negative_embeds=neg, negative_mask=neg_mask, width=SIZE,
                               height=SIZE, binning=False, seed=seed, init_latent=latent, denoise=denoise,
                               noise_mask=noise_mask, callback=callback, **options(sampler, extras))


# ------------------------------------------------------------------------------------------------ the oracle
def comfy_reference(kind, eps_net, latent, noise, mask, timesteps, fresh_noise, schedule):
    """ComfyUI's KSamplerX0Inpaint + k-diffusion's sample_euler / sample_dpmpp_2m / sample_lcm, σ space.
    Returns the final x and every step's denoised (what k-diffusion's callback shows)."""
    sigmas = [schedule.sigma(t) for t in timesteps] + [0.0]
    keep = 1.0 - mask

    def model_k(x, i):  # KSamplerX0Inpaint.__call__
        s = sigmas[i]
        x = x * mask + (latent + noise * s) * keep  # scale_latent_inpaint = noise_scaling(σ, noise, latent)
        t = torch.full((x.shape[0],), float(timesteps[i]))
        eps = eps_net(x / math.sqrt(1.0 + s * s), t)  # EPS.calculate_input
        out = x - eps * s  # EPS.calculate_denoised
        if kind == "lcm":  # model_sampling LCM.calculate_denoised: c_skip, c_out of timestep·10, σ_data 0.5
            scaled = float(timesteps[i]) * 10.0
            c_skip, c_out = 0.25 / (scaled ** 2 + 0.25), scaled / (scaled ** 2 + 0.25) ** 0.5
            out = c_out * out + c_skip * x
        return out * mask + latent * keep

    x = latent + noise * sigmas[0]  # KSAMPLER.sample: noise_scaling(sigmas[0], noise, latent), below σ_max
    old = None
    steps = []
    for i in range(len(timesteps)):
        denoised = model_k(x, i)
        steps.append(denoised)
        if kind == "euler":
            x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        elif kind == "dpmpp_2m":
            if sigmas[i + 1] == 0:
                x = denoised  # the first-order step to σ = 0
            else:
                t, t_next = -math.log(sigmas[i]), -math.log(sigmas[i + 1])
                h = t_next - t
                if old is None:
                    d = denoised
                else:
                    r = (t - (-math.log(sigmas[i - 1]))) / h
                    d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
                x = (sigmas[i + 1] / sigmas[i]) * x - math.expm1(-h) * d
            old = denoised
        elif kind == "lcm":
            x = denoised
            if sigmas[i + 1] > 0:
                x = x + sigmas[i + 1] * fresh_noise(x)
    return x, steps


def reference(model, sampler, noise_mask, *, denoise=0.7, extras="", seed=3):
    """The oracle on the same ε network, inputs, timesteps and per-image noise draws as `ours`."""
    embeds, mask, neg, neg_mask, latent = inputs()
    opts = options(sampler, extras)
    timesteps = samplers.sampler_timesteps(sampler, opts["steps"], strength=denoise)
    eps_net = GuidedEpsilon(model, embeds, mask, batch_size=BATCH, size=(SIZE, SIZE), negative_embeds=neg,
                            negative_mask=neg_mask, guidance_scale=opts["guidance_scale"], controls=opts["controls"],
                            timesteps=timesteps, step_cache=opts["step_cache"])
    draws = pl.PerImageNoise(pl.image_generators(seed, BATCH))  # the pipeline's seed rule, in its draw order
    noise = draws(latent)
    mask_l = prepare_mask(noise_mask, latent.shape)
    kind = "euler" if sampler == "ddim" else sampler  # DDIM with eta 0 is Euler in σ space (ComfyUI's "ddim")
    with torch.no_grad():
        return comfy_reference(kind, eps_net, latent, noise, mask_l, timesteps, draws, ddpm_schedule())


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("sampler, extras", [("euler", ""), ("ddim", ""), ("dpmpp_2m", ""), ("lcm", ""),
                                             ("dpmpp_2m", "control+cache"), ("lcm", "control")])
def test_matches_comfyui_inpainting_formulas(model, sampler, extras):
    seen = []
    got = ours(model, sampler, box_mask(), extras=extras, callback=lambda i, n, x, x0: seen.append(x0)).latents
    want, want_steps = reference(model, sampler, box_mask(), extras=extras)
    # float32: ~1e-7 relative per operation over a few steps, amplified by 1/α ≈ 12 at the first step (t ≈ 700);
    # ComfyUI's LCM puts c_skip (≤ 1e-6 here) on σ-space x, diffusers' on the VP x.
    scale = want.abs().max().item()
    assert 0.5 < scale < 100
    assert (got - want).abs().max().item() <= 2e-5 * scale
    # every step's data prediction too, the kept region included (there it is the input latent)
    steps, want_steps = torch.stack(seen), torch.stack(want_steps)
    assert (steps - want_steps).abs().max().item() <= 2e-5 * want_steps.abs().max().item()


@pytest.mark.parametrize("sampler", list(samplers.SAMPLERS))
def test_outside_the_mask_the_input_latent_is_kept_exactly(model, sampler):
    _, _, _, _, latent = inputs()
    got = ours(model, sampler, box_mask()).latents
    keep = prepare_mask(box_mask(), latent.shape) == 0
    repaint = ~keep
    assert torch.equal(got.masked_select(keep.expand_as(got)), latent.masked_select(keep.expand_as(latent)))
    change = (got - latent).masked_select(repaint.expand_as(got)).abs()
    assert change.mean().item() > 0.1, change.mean().item()


def test_mask_of_ones_is_img2img_and_mask_of_zeros_keeps_everything(model):
    plain = ours(model, "dpmpp_2m", None).latents
    ones = ours(model, "dpmpp_2m", torch.ones(1, 16, 16)).latents
    assert torch.equal(ones, plain)  # the wrapper adds exact zeros where the mask is 1
    _, _, _, _, latent = inputs()
    assert torch.equal(ours(model, "sa_solver", torch.zeros(1, 16, 16)).latents, latent)


def test_masks_are_resized_and_broadcast_like_comfyui(model):
    big = box_mask(SIZE, SIZE)  # pixel size, as Load Image's MASK
    shape = (4, 4, 16, 16)
    want = F.interpolate(big[:, None], size=(16, 16), mode="bilinear")  # comfy.utils.reshape_mask
    assert torch.equal(prepare_mask(big, shape), want.expand(4, 1, 16, 16))
    assert torch.equal(prepare_mask(big[:, None], shape), prepare_mask(big, shape))
    two = torch.stack([big[0], 1 - big[0]])
    tiled = prepare_mask(two, shape)  # ComfyUI repeats a smaller mask batch: m0, m1, m0, m1
    assert torch.equal(tiled[2:], tiled[:2]) and torch.equal(tiled[1], 1 - tiled[0])
    stretched = prepare_mask(torch.ones(1, 40, 24), shape)  # another aspect ratio is stretched, as ComfyUI does
    assert stretched.shape == (4, 1, 16, 16) and torch.equal(stretched, torch.ones_like(stretched))
    # through the pipeline: the pixel-size mask gives the same latents as the latent-size one
    assert torch.equal(ours(model, "euler", big).latents, ours(model, "euler", want[0]).latents)


def test_sample_batch_gives_each_image_its_mask_row(model):
    embeds, mask, neg, neg_mask, latent = inputs()
    masks = torch.stack([box_mask()[0], 1 - box_mask()[0]])
    kw = dict(negative_embeds=neg, negative_mask=neg_mask, width=SIZE, height=SIZE, sampler="euler", steps=3,
              guidance_scale=4.5, denoise=0.6)
    both = pl.sample_batch(model, embeds, mask, batch_size=2, seed=5, init_latent=latent, noise_mask=masks, **kw)
    second = pl.generate_latents(model, embeds[1:], mask[1:], negative_embeds=neg[1:], negative_mask=neg_mask[1:],
                                 width=SIZE, height=SIZE, binning=False, seed=6, init_latent=latent[1:],
                                 noise_mask=masks[1:], sampler="euler", steps=3, guidance_scale=4.5, denoise=0.6)
    assert torch.allclose(both[1:], second.latents, atol=1e-5, rtol=0)  # image k alone with seed + k


@pytest.mark.parametrize("bad, message", [
    (torch.ones(3, 16, 16), "3 masks for a batch of 2"),
    (torch.ones(1, 4, 16, 16), "a mask is \\(height, width\\)"),
    (torch.ones(16), "a mask is \\(height, width\\)"),
    (torch.ones(1, 1, 1, 16, 16), "a mask is \\(height, width\\)"),
    (torch.full((1, 16, 16), 255.0), "from 0 \\(keep\\) to 1"),
    (torch.full((1, 16, 16), float("nan")), "from 0 \\(keep\\) to 1"),
    (torch.ones(1, 0, 16), "empty"),
    ([[1.0]], "must be a tensor"),
])
def test_bad_masks_get_one_clear_message(model, bad, message):
    with pytest.raises(PixArtError, match=message):
        ours(model, "euler", bad)


def test_a_mask_needs_the_latent_to_repaint(model):
    embeds, mask, _, _, _ = inputs()
    with pytest.raises(PixArtError, match="noise mask needs an input image or latent"):
        pl.generate_latents(model, embeds, mask, width=SIZE, height=SIZE, binning=False, sampler="lcm", steps=2,
                            noise_mask=box_mask())


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_init_image_and_mask(tmp_path, capsys, monkeypatch):
    from pixart_core import cli
    from tests.test_cli import build_tiny_pipeline

    model_dir = build_tiny_pipeline(tmp_path / "PixArt-tiny")
    Image.new("RGB", (256, 256), (200, 90, 40)).save(tmp_path / "in.png")
    mask = Image.new("L", (64, 48), 0)  # another size than the image: stretched to it, as ComfyUI does
    mask.paste(255, (32, 0, 64, 48))  # right half white: repaint
    mask.save(tmp_path / "mask.png")
    seen = record_keyword(monkeypatch, pl, "generate_latents", "noise_mask")
    common = ["--model", str(model_dir), "--width", "256", "--height", "256", "--dtype", "fp32", "--t5-precision",
              "fp32", "--steps", "2", "--no-progress", "--init-image", str(tmp_path / "in.png")]
    code = cli.main(["generate", "a cat", "-o", str(tmp_path / "out.png"), "--mask", str(tmp_path / "mask.png"),
                     *common])
    assert code == 0, capsys.readouterr().err
    assert Image.open(tmp_path / "out.png").size == (256, 256)
    (got,) = seen
    assert got.shape == (1, 1, 256, 256)
    assert torch.equal(got[..., :120], torch.zeros(1, 1, 256, 120))
    assert torch.equal(got[..., 136:], torch.ones(1, 1, 256, 120))

    (tmp_path / "broken.png").write_bytes(b"not a png")
    assert cli.main(["generate", "x", "-o", str(tmp_path / "x.png"), "--mask", str(tmp_path / "broken.png"),
                     *common]) == 2
    err = capsys.readouterr().err
    assert "error: Cannot read the mask" in err and err.count("error:") == 1 and "Traceback" not in err
    assert cli.main(["generate", "x", "-o", str(tmp_path / "x.png"), "--mask", str(tmp_path / "mask.png")]) == 2
    assert "give --init-image too" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ the example workflow
def test_inpaint_workflow_repaints_only_the_masked_latent(workflow_env, monkeypatch):
    """Load Image's MASK -> Set Latent Noise Mask -> our sampler node: the mask reaches the core and is honoured."""
    from pixart_nodes import sampling
    from tests import comfy_harness as harness
    from tests.test_workflows import CLASSES, WORKFLOWS, load, shrink

    seen = []
    core = sampling.sample_batch

    def spy(*args, **kwargs):
        out = core(*args, **kwargs)
        seen.append((kwargs["init_latent"], kwargs["noise_mask"], out))
        return out

    monkeypatch.setattr(sampling, "sample_batch", spy)
    harness.Executor(CLASSES).run(shrink(load(WORKFLOWS / "api" / "pixart_alpha_inpaint.json")))
    ((init, noise_mask, out),) = seen
    keep = (prepare_mask(noise_mask, out.shape) == 0).expand_as(out)
    assert keep.any() and not keep.all()
    assert torch.equal(out[keep], init.expand_as(out)[keep])
    assert (out[~keep] - init.expand_as(out)[~keep]).abs().mean() > 0.1
