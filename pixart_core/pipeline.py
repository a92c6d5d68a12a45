"""Prompt -> latent -> image with PixArt-α/Σ/δ, without ComfyUI: the standalone pipeline behind the CLI.

Two levels:
- `generate_latents(transformer, embeds, mask, ...)`: from T5 embeddings to the final latent. This is the loop the
  ComfyUI sampler node and the tests use (no T5, no VAE).
- `PixArtPipeline(transformer, text_encoder, vae)`: prompts in, PIL images out (encode, sample, decode, crop back).

Per-image seed rule (reproducible images inside batches): image k of a batch (k = 0, 1, ...) draws ALL its noise, the
starting latent first and then every noise the sampler adds (LCM, SA-Solver, DDIM eta > 0), from its own
`torch.Generator("cpu").manual_seed(seed + k)`, in float32 on the CPU. So image k of a batch equals a batch of one with
seed + k, on any device, and a run with seed s is the diffusers pipeline called with
`generator=[torch.Generator().manual_seed(s + k) for k in range(batch)]`. With several prompts and several images per
prompt, images are ordered prompt by prompt (diffusers' order), k counting across the whole batch.

Defaults: an LCM checkpoint (PixArt-δ) samples with LCM, 4 steps, no guidance; anything else with DPM-Solver++ 2M,
20 steps, guidance 4.5 (samplers.SAMPLERS has every sampler's defaults). Resolution binning is on by default.
Step caching (step_cache.py: Δ-DiT, T-GATE) is off by default; `step_cache="delta-dit"` (or "t-gate", "both", or
StepCacheOptions) turns it on for one generation.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from . import samplers
from .controlnet import ControlInput, bind_controls
from .errors import PixArtError
from .guidance import GuidedEpsilon, InterruptCheck
from .inpaint import InpaintEpsilon, mask_rows, pixel_mask, prepare_mask
from .memory import FreeMemory, free_memory, is_out_of_memory
from .resolution import SizePlan, plan_size, resize_and_crop
from .schedule import ddpm_schedule
from .step_cache import StepCacheOptions, step_cache_options
from .vae import raw_to_scaled, scaled_to_raw

MAX_SEED = 2**64

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------- seeds and noise
def image_generators(seed: int, count: int) -> list[torch.Generator]:
    """The per-image seed rule: image k gets its own CPU generator seeded with seed + k (mod 2**64)."""
    return [torch.Generator("cpu").manual_seed((int(seed) + k) % MAX_SEED) for k in range(count)]


class PerImageNoise:
    """A sampler noise_fn drawing each image's rows from that image's own generator (float32, CPU, then moved)."""

    def __init__(self, generators: Sequence[torch.Generator]):
        self.generators = list(generators)

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        if like.shape[0] != len(self.generators):
            raise PixArtError(f"{like.shape[0]} latents but {len(self.generators)} seeds.")
        rows = [torch.randn((1, *like.shape[1:]), generator=g, dtype=torch.float32) for g in self.generators]
        return torch.cat(rows).to(device=like.device, dtype=like.dtype)


# --------------------------------------------------------------------------------------------------- checkpoint kind
def _scheduler_class(root: Path) -> Optional[str]:
    """The scheduler class a diffusers pipeline folder names, if it is one."""
    for name in ("scheduler/scheduler_config.json", "model_index.json"):
        f = root / name
        if not f.is_file():
            continue
        try:
            info = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        entry = info.get("_class_name") if name.startswith("scheduler") else (info.get("scheduler") or [None])[-1]
        if entry:
            return entry
    return None


def is_lcm_checkpoint(path: Optional[str | Path]) -> bool:
    """True for PixArt-δ LCM weights in a diffusers pipeline whose scheduler is LCMScheduler.

    The LCM weights have the same shapes as PixArt-XL-2-1024-MS, so only the files around them can tell; as in
    checkpoint detection, file names are never trusted (a single LCM file samples with the default sampler unless
    sampler="lcm" is given)."""
    if path is None:
        return False
    p = Path(path)
    for root in ([p.parent, p.parent.parent] if p.is_file() else [p, p.parent]):
        scheduler = _scheduler_class(root)
        if scheduler:
            return scheduler == "LCMScheduler"
    return False


def default_sampler(transformer) -> str:
    return "lcm" if is_lcm_checkpoint(getattr(transformer, "source_path", None)) else "dpmpp_2m"


# --------------------------------------------------------------------------------------------------- latent loop
@dataclass
class LatentResult:
    latents: torch.Tensor  # (B, 4, h, w) float32, in the model's latent scale
    plan: SizePlan
    sampler: str
    timesteps: list
    guidance_scale: float
    seed: int


def generate_latents(
    transformer,
    embeds: torch.Tensor,
    mask: Optional[torch.Tensor],
    *,
    width: int,
    height: int,
    negative_embeds: Optional[torch.Tensor] = None,
    negative_mask: Optional[torch.Tensor] = None,
    sampler: Optional[str] = None,
    steps: Optional[int] = None,
    guidance_scale: Optional[float] = None,
    seed: int = 0,
    batch_size: Optional[int] = None,
    binning: bool = True,
    lcm_table: str = "diffusers",
    init_latent: Optional[torch.Tensor] = None,
    denoise: float = 1.0,
    noise_mask: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
    controls: Optional[Sequence] = None,
    callback: Optional[samplers.Callback] = None,
    interrupt: Optional[InterruptCheck] = None,
    step_cache: Optional[StepCacheOptions | str] = None,
) -> LatentResult:
    """Sample final latents from T5 embeddings (B or 1, L, C) and masks.

    batch_size defaults to the prompt batch. init_latent (img2img, model latent scale) must already have the
    generation size (plan.latent_shape). noise_mask: inpainting (inpaint.py): only where it is 1 is init_latent
    repainted; (h, w), (1 or B, h, w) or (1 or B, 1, h, w) at any size, resized to the latent. noise: explicit
    starting noise instead of the seeded one (the per-image generators still supply the sampler's later noise).
    step_cache: None/"off" (default), "delta-dit", "t-gate", "both" or StepCacheOptions; it trades a small
    change of the image for speed (step_cache.py).
    """
    sampler = sampler or default_sampler(transformer)
    cache_options = step_cache_options(step_cache)  # checked here, before any work
    spec = samplers.get_sampler(sampler)
    steps = spec.default_steps if steps is None else int(steps)
    guidance_scale = spec.default_guidance if guidance_scale is None else float(guidance_scale)
    batch = batch_size or embeds.shape[0]
    if embeds.shape[0] not in (1, batch):
        raise PixArtError(f"{embeds.shape[0]} prompts for a batch of {batch} images; use one prompt or one per image.")

    plan = plan_size(width, height, transformer.config.bin_size, binning)
    lh, lw = plan.latent_shape
    shape = (batch, transformer.config.in_channels, lh, lw)
    device = transformer.device
    if init_latent is not None:
        if tuple(init_latent.shape[-2:]) != (lh, lw) or init_latent.shape[1] != shape[1]:
            raise PixArtError(f"The input latent is {tuple(init_latent.shape)} but this generation needs "
                              f"(batch, {shape[1]}, {lh}, {lw}) ({plan.gen_width}x{plan.gen_height} px). Resize the "
                              "image to that size before encoding it, or turn binning off.")
        if init_latent.shape[0] not in (1, batch):
            raise PixArtError(f"{init_latent.shape[0]} input latents for a batch of {batch}; give 1 or {batch}.")
        init_latent = init_latent.to(device=device, dtype=torch.float32).expand(shape).contiguous()
    elif denoise < 1.0 or noise_mask is not None:
        raise PixArtError(f"{'A noise mask' if noise_mask is not None else 'denoise below 1'} needs an input image "
                          "or latent to start from.")

    timesteps = samplers.sampler_timesteps(sampler, steps, strength=denoise, lcm_table=lcm_table)
    noise_fn = PerImageNoise(image_generators(seed, batch))
    start_noise = noise_fn(torch.empty(shape, device=device))  # each generator's first draw: the starting latent
    if noise is not None:
        if tuple(noise.shape) != shape:
            raise PixArtError(f"The starting noise is {tuple(noise.shape)}; this generation needs {shape}.")
        start_noise = noise.to(device=device, dtype=torch.float32)

    eps_fn = GuidedEpsilon(
        transformer, embeds.to(device), None if mask is None else mask.to(device),
        batch_size=batch, size=(plan.gen_height, plan.gen_width),
        negative_embeds=None if negative_embeds is None else negative_embeds.to(device),
        negative_mask=None if negative_mask is None else negative_mask.to(device),
        guidance_scale=guidance_scale, controls=controls, interrupt=interrupt, timesteps=timesteps,
        step_cache=cache_options,
    )
    schedule = ddpm_schedule()
    if noise_mask is not None:
        eps_fn = InpaintEpsilon(eps_fn, schedule, init_latent, start_noise, prepare_mask(noise_mask, shape, device))
    latents = samplers.sample(sampler, eps_fn, start_noise, schedule, timesteps, init_latent=init_latent,
                              noise_fn=noise_fn, callback=callback)
    if noise_mask is not None:
        latents = eps_fn.blend(latents)
    return LatentResult(latents, plan, sampler, list(timesteps), guidance_scale, int(seed))


# --------------------------------------------------------------------------------------------------- a batch that fits
def sample_batch(
    transformer,
    embeds: torch.Tensor,
    mask: Optional[torch.Tensor],
    *,
    width: int,
    height: int,
    batch_size: int,
    seed: int = 0,
    init_latent: Optional[torch.Tensor] = None,
    noise_mask: Optional[torch.Tensor] = None,
    controls: Sequence[ControlInput] = (),
    interrupt: Optional[InterruptCheck] = None,
    free_memory: FreeMemory = free_memory,
    raw_latents: bool = False,
    **options,
) -> torch.Tensor:
    """generate_latents at exactly width x height (no binning) for `batch_size` images, with control images still to
    encode, and a fallback when memory runs out: the images are sampled one at a time instead (image k of a batch uses
    seed + k, so the result is the same); with one image it is a PixArtError saying what to lower.

    init_latent: scaled latents (1 or batch_size images). noise_mask: the inpainting mask (generate_latents).
    controls: ControlInputs whose image batch is 1 or batch_size. options: the rest of generate_latents' keywords
    (sampler, steps, guidance_scale, denoise, callback, negative_embeds, negative_mask, step_cache).
    Returns the final scaled latents (B, 4, h, w).
    raw_latents: init_latent and the result are raw VAE latents (what ComfyUI's LATENT holds) instead."""
    if raw_latents:
        scale = transformer.config.latent_scale
        init = None if init_latent is None else raw_to_scaled(init_latent, scale)
        return scaled_to_raw(sample_batch(transformer, embeds, mask, width=width, height=height, batch_size=batch_size,
                                          seed=seed, init_latent=init, noise_mask=noise_mask, controls=controls,
                                          interrupt=interrupt, free_memory=free_memory, **options), scale)
    _check_batch_inputs(transformer, embeds, init_latent, controls, batch_size)
    masks = None if noise_mask is None else mask_rows(noise_mask, batch_size)  # one per image, for the split below

    def generate(first: int, count: int) -> torch.Tensor:
        """Images first .. first+count-1 of the batch (their seeds, start latents and control images)."""
        part = [_rows(c, first, count) for c in controls]
        hints = bind_controls(part, transformer, width, height, interrupt) if part else None
        start = init_latent if init_latent is None or init_latent.shape[0] == 1 else init_latent[first:first + count]
        return generate_latents(transformer, embeds, mask, width=width, height=height, seed=seed + first,
                                batch_size=count, binning=False, init_latent=start, controls=hints,
                                noise_mask=None if masks is None else masks[first:first + count],
                                interrupt=interrupt, **options).latents

    try:
        return generate(0, batch_size)
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        free_memory(True)
        if batch_size == 1:
            raise _out_of_memory("sampling", width, height, batch_size) from exc
        log.warning("PixArt: out of memory sampling %d images at %dx%d at once; sampling them one at a time "
                    "(same images, less memory).", batch_size, width, height)
    try:
        return torch.cat([generate(k, 1) for k in range(batch_size)])
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        free_memory(True)
        raise _out_of_memory("sampling one image at a time", width, height, 1) from exc


def _rows(control: ControlInput, first: int, count: int) -> ControlInput:
    if control.image.shape[0] == 1:
        return control
    return replace(control, image=control.image[first:first + count])


def _check_batch_inputs(transformer, embeds, init_latent, controls, batch_size: int) -> None:
    channels = transformer.config.caption_channels
    if embeds.shape[-1] != channels:
        raise PixArtError(f"The conditioning has {embeds.shape[-1]} channels but this model reads {channels}: encode "
                          "the prompt with the T5 v1.1 XXL encoder.")
    if init_latent is not None and not torch.isfinite(init_latent).all():
        raise PixArtError("The input latent contains NaN or Inf values (a sampler upstream diverged, or the image it "
                          "was encoded from was broken). Make the latent again, or set denoise to 1 to use only its "
                          "size.")
    for c in controls:
        if c.image.shape[0] not in (1, batch_size):
            raise PixArtError(f"The ControlNet image batch has {c.image.shape[0]} images but the sampler makes "
                              f"{batch_size}; give one control image (used for every image) or one per image.")


def _out_of_memory(what: str, width: int, height: int, batch_size: int) -> PixArtError:
    return PixArtError(
        f"Out of memory while {what} at {width}x{height} px (batch {batch_size}). Lower the batch size or the size "
        "(then upscale), load the transformer with precision fp16/bf16 or int8, or close other models; on the CPU, "
        "free some RAM.")


# --------------------------------------------------------------------------------------------------- images
def latents_to_images(vae, latents: torch.Tensor, plan: Optional[SizePlan] = None, mode: str = "auto",
                      callback: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
    """Decode model-scale latents with a PixArtVAE to (B, 3, H, W) images in [0, 1], resized and cropped back to the
    requested size when the generation was binned (before clamping, as diffusers does: clamped pixels would
    interpolate differently)."""
    images = vae.decode(latents, mode=mode, output="signed", callback=callback)
    if plan is not None:
        images = resize_and_crop(images, plan.out_width, plan.out_height)
    return (images / 2 + 0.5).clamp(0, 1)


def to_pil(images: torch.Tensor) -> list:
    from PIL import Image

    arr = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in arr]


class PixArtPipeline:
    """Prompts to images with a loaded transformer, T5 encoder and VAE.

    Build it from loaded parts, or with `PixArtPipeline.from_paths(...)` (paths may be left out to use the official
    PixArt-δ LCM pipeline from the Hugging Face cache, or the bundled PixArt-nano without it; see loading/hub.py).
    """

    def __init__(self, transformer, text_encoder, vae):
        self.transformer = transformer
        self.text_encoder = text_encoder
        self.vae = vae

    @classmethod
    def from_paths(
        cls,
        model: Optional[str | Path] = None,
        *,
        transformer: Optional[str | Path] = None,
        t5: Optional[str | Path] = None,
        vae: Optional[str | Path] = None,
        dtype: torch.dtype = torch.bfloat16,
        t5_precision: str = "bf16",
        vae_dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        weights: str = "none",
    ) -> "PixArtPipeline":
        """Load the three parts. `model` is a diffusers pipeline folder providing whatever is not given separately
        ("nano" and "official" name the bundled and the official pipeline, hub.resolve_model); with neither, the
        official PixArt-LCM-XL-2-1024-MS pipeline from the Hugging Face cache, else the bundled PixArt-nano.
        weights: the transformer's block weights ("none" or an 8-bit mode of quantize.MODES), as load_transformer."""
        from .loading.hub import resolve_model

        # before importing the loaders: a failure to find the model should be quick
        model = resolve_model(model, parts_given=None not in (transformer, t5, vae))[0]
        from .loading.checkpoint import load_transformer
        from .loading.t5_loading import load_t5
        from .text_encoder import PromptEmbeddingCache
        transformer = transformer or model
        t5 = t5 or model
        vae = vae or Path(model) / "vae"
        tr = load_transformer(transformer, dtype=dtype, device=device, weights=weights)
        # outside ComfyUI nothing else keeps encoded prompts: a repeated prompt skips T5
        encoder = load_t5(t5, precision=t5_precision, device=device, cache=PromptEmbeddingCache())
        return cls(tr, encoder, _load_vae(vae, tr.config.latent_scale, vae_dtype, device))

    @property
    def default_sampler(self) -> str:
        return default_sampler(self.transformer)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] = "",
        *,
        width: Optional[int] = None,
        height: Optional[int] = None,
        num_images_per_prompt: int = 1,
        sampler: Optional[str] = None,
        steps: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        seed: int = 0,
        binning: bool = True,
        lcm_table: str = "diffusers",
        clean_caption: bool = False,
        unconditional: str = "empty",
        init_image: Optional[torch.Tensor] = None,
        denoise: float = 1.0,
        inpaint_mask: Optional[torch.Tensor] = None,
        callback: Optional[samplers.Callback] = None,
        interrupt: Optional[InterruptCheck] = None,
        output_type: str = "pil",
        step_cache: Optional[StepCacheOptions | str] = None,
    ):
        """Generate images. output_type: "pil" (list of PIL images), "pt" ((B, 3, H, W) in [0, 1]) or "latent"
        (the LatentResult, nothing decoded). init_image: (B or 1, 3, H, W) in [0, 1] for img2img with `denoise`.
        inpaint_mask: (H, W) or (B or 1, H, W) in [0, 1] over init_image's pixels, 1 = repaint (inpaint.py).
        step_cache: off by default; "delta-dit", "t-gate" or "both" (or StepCacheOptions) for faster multi-step
        sampling at a small, measured change of the image (README "Step caching")."""
        from .text_encoder import encode_prompts

        cfg = self.transformer.config
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        size = cfg.bin_size
        width, height = int(width or size), int(height or size)
        sampler = sampler or self.default_sampler
        spec = samplers.get_sampler(sampler)
        scale = spec.default_guidance if guidance_scale is None else float(guidance_scale)
        n = int(num_images_per_prompt)
        neg = neg_mask = None
        if scale > 1:
            y_embedding = getattr(self.transformer.y_embedder, "y_embedding", None)
            enc = encode_prompts(self.text_encoder, prompts, negative_prompt, max_length=cfg.text_len,
                                 clean_caption=clean_caption, unconditional=unconditional, y_embedding=y_embedding)
            embeds, mask = enc.embeds, enc.mask
            # Prompt p's images are k = p*n .. p*n+n-1 (diffusers' order).
            neg, neg_mask = enc.negative_embeds.repeat_interleave(n, 0), enc.negative_mask.repeat_interleave(n, 0)
        else:  # no guidance (LCM): the unconditional branch is never evaluated, so T5 does not encode it
            embeds, mask = self.text_encoder.encode(prompts, cfg.text_len, clean_caption)
        embeds, mask = embeds.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
        plan = plan_size(width, height, cfg.bin_size, binning)
        init_latent = noise_mask = None
        if init_image is not None:
            init_latent = self.vae.encode(resize_and_crop(init_image.float(), plan.gen_width, plan.gen_height))
        if inpaint_mask is not None:
            noise_mask = pixel_mask(inpaint_mask, init_image, plan.gen_width, plan.gen_height)
        result = generate_latents(
            self.transformer, embeds, mask, width=width, height=height,
            negative_embeds=neg, negative_mask=neg_mask,
            sampler=sampler, steps=steps, guidance_scale=scale, seed=seed, batch_size=len(prompts) * n,
            binning=binning, lcm_table=lcm_table, init_latent=init_latent, denoise=denoise, noise_mask=noise_mask,
            callback=callback, interrupt=interrupt, step_cache=step_cache,
        )
        if output_type == "latent":
            return result
        images = latents_to_images(self.vae, result.latents, result.plan)
        return images if output_type == "pt" else to_pil(images)


def _load_vae(path, latent_scale: float, dtype: torch.dtype, device):
    from .loading.vae_files import load_vae

    return load_vae(path, kind="auto", dtype=dtype, device=device, latent_scale=latent_scale)
