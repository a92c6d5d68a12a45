"""Score nano models with the caption checker, through the project's own inference path (loaders, GuidedEpsilon,
samplers, VAE decode), exactly as a user's generation runs."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from pixart_core.pipeline import generate_latents
from . import caption_checker, data
from .data import IMAGE_SIZE


@torch.no_grad()
def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> (B, 3, H, W) in [0, 1] with the untiled diffusers network inside the PixArtVAE (64 px images
    need no tiling; this keeps the scores independent of the tiling code)."""
    images = vae.model.decode(latents.to(vae.dtype) / vae.scaling_factor).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def encode(vae, signed: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> scaled posterior-mean latents."""
    return vae.model.encode(signed.to(vae.dtype)).latent_dist.mean.float() * vae.scaling_factor


@torch.no_grad()
def generate(transformer, text_encoder, vae, captions: Sequence[str], *, sampler: str, steps: int,
             guidance: float = 0.0, seed: int = 0, controls_for=None, batch: int = 25,
             unconditional: str = "null_embedding") -> np.ndarray:
    """(B, 64, 64, 3) images in [0, 1]. With guidance > 1 the unconditional branch is the learned null caption
    (the one the teacher was distilled with) or the empty prompt (unconditional="empty").
    controls_for(i0, i1) -> list of ControlHints for the captions [i0, i1)."""
    out = []
    for i in range(0, len(captions), batch):
        chunk = list(captions[i:i + batch])
        embeds, mask = text_encoder.encode(chunk, transformer.config.text_len)
        neg = neg_mask = None
        if guidance > 1:
            if unconditional == "null_embedding":
                neg, neg_mask = transformer.null_text(len(chunk), mask)
            else:
                neg, neg_mask = text_encoder.encode([""] * len(chunk), transformer.config.text_len)
        controls = controls_for(i, i + len(chunk)) if controls_for is not None else None
        res = generate_latents(transformer, embeds, mask, width=IMAGE_SIZE, height=IMAGE_SIZE, binning=False,
                               negative_embeds=neg, negative_mask=neg_mask, sampler=sampler, steps=steps,
                               guidance_scale=guidance, seed=seed + i, controls=controls)
        images = decode(vae, res.latents)
        out.append(images.permute(0, 2, 3, 1).float().numpy())
    return np.concatenate(out)


def score_model(transformer, text_encoder, vae, scenes, **kwargs) -> tuple[dict, np.ndarray]:
    captions = [s.caption for s in scenes]
    images = generate(transformer, text_encoder, vae, captions, **kwargs)
    return caption_checker.score(images, captions), images


# The CI guard (tests/test_nano_shipped.py): a fixed, small prompt set that the build scores and records in
# scores.json, and that the test scores again on the shipped files through the public loaders.
GUARD_SEED, GUARD_PROMPTS, GUARD_CONTROL_CASES = 4242, 24, 8


def guard_scores(lcm, controlnet, text_encoder, vae) -> dict:
    """The caption checker's scores of LCM 4 steps without CFG on GUARD_PROMPTS prompts, and the ControlNet's mask
    IoU with the LCM student (4 steps) on GUARD_CONTROL_CASES edge maps."""
    scenes = caption_checker.evaluation_scenes(GUARD_SEED, GUARD_PROMPTS)
    scores = score_model(lcm, text_encoder, vae, scenes, sampler="lcm", steps=4, guidance=0.0, seed=GUARD_SEED)[0]
    iou, _ = controlnet_iou(lcm, controlnet, text_encoder, vae, control_scenes(GUARD_SEED, GUARD_CONTROL_CASES),
                            sampler="lcm", steps=4, guidance=0.0, seed=GUARD_SEED)
    return {"lcm_4_steps_no_cfg": scores, "controlnet_mask_iou_lcm4": iou}


def control_scenes(seed: int, count: int) -> list[data.Scene]:
    """Single objects anywhere (no position in the caption): only the edge map says where and how big."""
    rng = np.random.default_rng(seed)
    return [data.random_single(rng, free_placement=True, size_word_prob=0.0) for _ in range(count)]


@torch.no_grad()
def controlnet_iou(base, controlnet, text_encoder, vae, scenes, *, sampler: str, steps: int, guidance: float,
                   seed: int = 0, strength: float = 1.0) -> tuple[float, np.ndarray]:
    edges, _ = data.batch(scenes, edges=True)
    hints = encode(vae, edges)

    def controls_for(i0, i1):
        return [controlnet.bind(base, hints[i0:i1], strength=strength)]

    images = generate(base, text_encoder, vae, [s.caption for s in scenes], sampler=sampler, steps=steps,
                      guidance=guidance, seed=seed, controls_for=controls_for)
    ious = [caption_checker.mask_iou(img, s.objects[0]) for img, s in zip(images, scenes)]
    return float(np.mean(ious)), images


def save_grid(images: np.ndarray, path, columns: int = 8, scale: int = 2) -> None:
    from PIL import Image

    n = len(images) - len(images) % columns or len(images)
    rows = [np.concatenate(list(images[r:r + columns]), axis=1) for r in range(0, n, columns)]
    rows = [r for r in rows if r.shape[1] == rows[0].shape[1]]
    grid = (np.clip(np.concatenate(rows, axis=0), 0, 1) * 255).round().astype(np.uint8)
    img = Image.fromarray(grid)
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)
