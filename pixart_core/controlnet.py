"""PixArt-δ ControlNet-Transformer: the model, and applying it with a strength and a start/end range of the
schedule.

How it works (α repo `diffusion/model/nets/pixart_controlnet.py`, "ControlNet-Half"):
- The control image's VAE latent (x scale factor) is embedded by the FROZEN BASE patch embedder plus the base position
  embedding: there is no separate hint encoder.
- Copies 0..N-1 (N = 13 in the released files) of the first base blocks run beside the base: copy 0 takes
  `x + before_proj(hint)` where x is the base tokens after block 0, copy k takes copy k-1's output. The output of copy k
  goes through `after_proj` and is added to the INPUT of base block k+1.
- Because copy k depends only on x after base block 0 and on copy k-1, all residuals are computed right after base
  block 0; PixArtTransformer.forward(controls=[...]) calls a bound ControlHint there.

The module names below equal the keys of the original released files (`controlnet.{i}.copied_block.*`, ...), so a
PixArtControlNet's state_dict is the original layout. Reading both released layouts is loading/controlnet_files.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import ALPHA, LATENT_SCALE, SIGMA
from .errors import PixArtError
from .hed import HEDDetector, image_to_bchw
from .transformer import PixArtBlock, PixArtTransformer, TextConditioning

_FAMILY_NAMES = {ALPHA: "PixArt-α", SIGMA: "PixArt-Σ"}
_VAE_NAMES = {ALPHA: "SD VAE (sd-vae-ft-ema)", SIGMA: "SDXL VAE"}


@dataclass
class ControlNetInfo:
    """The shape of a ControlNet and what it was trained with. Facts the file does not carry are listed in `assumed`."""

    num_copies: int
    hidden_size: int
    num_heads: int
    mlp_ratio: float = 4.0
    qk_norm: bool = False
    family: str = ALPHA  # latent space of the hints: α = SD VAE latents, Σ = SDXL VAE latents
    text_len: int | None = None  # known only when the file also holds the base model
    caption_channels: int | None = None
    sample_size: int | None = None
    layout: str = "original"  # "original" | "controlnet-combined" | "diffusers"
    assumed: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "num_copies": self.num_copies,
            "hidden_size": self.hidden_size,
            "num_heads": self.num_heads,
            "family": self.family,
            "latent_scale": LATENT_SCALE[self.family],
            "text_len": self.text_len,
            "caption_channels": self.caption_channels,
            "resolution": self.sample_size * 8 if self.sample_size else None,
            "layout": self.layout,
            "assumed": list(self.assumed),
        }


class ControlCopy(nn.Module):
    """One trainable copy of a base block with its zero-initialised projections (ControlT2IDitBlockHalf)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, qk_norm: bool, first: bool):
        super().__init__()
        self.copied_block = PixArtBlock(dim, heads, mlp_ratio, qk_norm=qk_norm)
        self.before_proj = nn.Linear(dim, dim) if first else None  # only copy 0 sees the hint
        self.after_proj = nn.Linear(dim, dim)


class PixArtControlNet(nn.Module):
    """The ControlNet-Transformer weights. Apply it through `bind(base, hint_latent, ...)`, which returns the callable
    PixArtTransformer.forward takes in `controls`."""

    def __init__(self, info: ControlNetInfo):
        super().__init__()
        self.info = info
        self.controlnet = nn.ModuleList(
            ControlCopy(info.hidden_size, info.num_heads, info.mlp_ratio, info.qk_norm, first=i == 0)
            for i in range(info.num_copies)
        )

    @property
    def num_copies(self) -> int:
        return len(self.controlnet)

    @property
    def dtype(self) -> torch.dtype:
        return self.controlnet[0].after_proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.controlnet[0].after_proj.weight.device

    def forward(
        self, x: torch.Tensor, hint: torch.Tensor, t0: torch.Tensor, text: TextConditioning, grid_hw: tuple[int, int],
        strength: float = 1.0,
    ) -> list[torch.Tensor]:
        """x: (B, N, D) base tokens after block 0; hint: (1 or B, N, D) embedded hint -> residuals for base blocks
        1..num_copies, each (B, N, D) and scaled by strength."""
        c = x + self.controlnet[0].before_proj(hint)
        residuals = []
        for copy in self.controlnet:
            c = copy.copied_block(c, t0, text, grid_hw)  # the chain itself is never scaled, only what leaves it
            r = copy.after_proj(c)
            residuals.append(r if strength == 1.0 else r * strength)
        return residuals

    def bind(
        self, base: PixArtTransformer, hint_latent: torch.Tensor, strength: float = 1.0, start: float = 0.0,
        end: float = 1.0,
    ) -> "ControlHint":
        return ControlHint(self, base, hint_latent, strength, start, end)


class ControlHint:
    """A ControlNet bound to one control image: the callable PixArtTransformer.forward(controls=[...]) expects.

    hint_latent: (1 or B, 4, H/8, W/8) VAE latent of the prepared control image, already multiplied by the VAE scale
    factor (what vae.encode returns). A batch of 1 serves every image and both CFG halves; a batch equal to the
    conditional batch is repeated over the [uncond, cond] halves.
    strength scales every after_proj output. start/end are fractions of the sampling schedule; `active(step, total)`
    tells the sampling loop whether to pass this control at a step.
    """

    def __init__(
        self, controlnet: PixArtControlNet, base: PixArtTransformer, hint_latent: torch.Tensor, strength: float = 1.0,
        start: float = 0.0, end: float = 1.0,
    ):
        check_compatible(controlnet, base)
        strength, start, end = float(strength), float(start), float(end)
        if not math.isfinite(strength) or strength < 0:
            raise PixArtError(f"ControlNet strength must be a finite number >= 0, not {strength}.")
        if not (0.0 <= start <= end <= 1.0):
            raise PixArtError(f"ControlNet start/end percent must satisfy 0 <= start <= end <= 1 (got start={start}, "
                              f"end={end}).")
        if not isinstance(hint_latent, torch.Tensor) or hint_latent.ndim != 4 \
                or hint_latent.shape[1] != base.config.in_channels:
            shape = tuple(hint_latent.shape) if isinstance(hint_latent, torch.Tensor) else type(hint_latent).__name__
            raise PixArtError(
                f"The control hint has shape {shape}; expected a VAE latent (batch, {base.config.in_channels}, "
                "height/8, width/8). Encode the prepared control image with the VAE (prepare_control_image, then "
                "vae.encode)."
            )
        if controlnet.dtype != base.dtype or controlnet.device != base.device:
            # The copies share the base's text conditioning and adaLN input, so they must run in its dtype/device.
            controlnet.to(device=base.device, dtype=base.dtype)
        self.controlnet = controlnet
        self.base = base
        self.hint_latent = hint_latent
        self.strength = strength
        self.start = start
        self.end = end
        self._tokens: dict[tuple, torch.Tensor] = {}

    # ----- schedule -----
    def active(self, step_index: int, total_steps: int) -> bool:
        """Whether the control applies at sampling step `step_index` (0-based) of `total_steps`. diffusers' rule
        (control_guidance_start/end): the step's span [i/n, (i+1)/n] must lie within [start, end]."""
        if total_steps <= 0:
            raise PixArtError(f"total_steps must be positive, not {total_steps}.")
        if self.strength == 0.0:
            return False
        eps = 1e-9  # 3/10 and 0.3 must compare equal
        return step_index / total_steps >= self.start - eps and (step_index + 1) / total_steps <= self.end + eps

    def active_at_timestep(self, timestep: float, num_train_timesteps: int = 1000) -> bool:
        """The same question for a caller that only knows the model timestep (ComfyUI's rule: percent p of the
        schedule is timestep (1 - p) * 999; the control is on while start <= p <= end)."""
        if self.strength == 0.0:
            return False
        progress = 1.0 - float(timestep) / (num_train_timesteps - 1)
        eps = 1e-6
        return self.start - eps <= progress <= self.end + eps

    # ----- the call PixArtTransformer makes after block 0 -----
    def hint_tokens(self, grid_hw: tuple[int, int], batch: int) -> torch.Tensor:
        """(1 or batch, N, D): the hint through the base patch embedder plus the base position embedding."""
        base = self.base
        p = base.config.patch_size
        gh, gw = grid_hw
        lh, lw = self.hint_latent.shape[-2:]
        if (lh // p, lw // p) != (gh, gw) or lh % p or lw % p:
            raise PixArtError(
                f"The control hint latent is {lh}x{lw} ({lh * 8}x{lw * 8} px) but the image being generated is "
                f"{gh * p}x{gw * p} ({gh * p * 8}x{gw * p * 8} px). Prepare the control image at the generation size "
                "(prepare_control_image(image, height, width)) and encode it again."
            )
        key = (gh, gw, base.dtype, base.device)
        tokens = self._tokens.get(key)
        if tokens is None:
            with torch.no_grad():
                latent = self.hint_latent.to(device=base.device, dtype=base.dtype)
                tokens = base.x_embedder(latent) + base.position_embedding(gh, gw)
            self._tokens = {key: tokens}
        hb = tokens.shape[0]
        if hb == 1 or hb == batch:
            return tokens
        if batch % hb:
            raise PixArtError(
                f"The control hint has a batch of {hb} but the model runs a batch of {batch}. Give one control image, "
                "or one per image in the batch."
            )
        return tokens.repeat(batch // hb, 1, 1)  # CFG runs [uncond; cond]: each half gets the same hints

    def __call__(
        self, x: torch.Tensor, t0: torch.Tensor, text: TextConditioning, grid_hw: tuple[int, int]
    ) -> list[torch.Tensor]:
        hint = self.hint_tokens(grid_hw, x.shape[0])
        return self.controlnet(x, hint, t0, text, grid_hw, self.strength)


def check_compatible(controlnet: PixArtControlNet, base: PixArtTransformer) -> None:
    """Refuse, with the reason, a ControlNet whose copies or hints cannot work with this base model."""
    c, b = controlnet.info, base.config
    if c.family != b.family:
        base_assumed = getattr(getattr(base, "detection", None), "assumed", None) or []
        fix = ""
        if any(a.startswith("family=") for a in base_assumed):
            fix += (f" If the base model really is {_FAMILY_NAMES[c.family]} (a diffusers file without config.json "
                    f"does not say), load it with family='{c.family}'.")
        if any(a.startswith("family=") for a in c.assumed):
            fix += (f" If this ControlNet was trained on {_FAMILY_NAMES[b.family]} (its file does not say), load it "
                    f"with family='{b.family}'.")
        raise PixArtError(
            f"This ControlNet was trained with {_FAMILY_NAMES[c.family]} ({_VAE_NAMES[c.family]} latents, scale "
            f"{LATENT_SCALE[c.family]}), but the base model is {_FAMILY_NAMES[b.family]} ({_VAE_NAMES[b.family]} "
            f"latents, scale {LATENT_SCALE[b.family]}). The two latent spaces differ, so its control signals would "
            f"mean nothing to this base. Use a {_FAMILY_NAMES[c.family]} base model (for the released ControlNets: "
            "PixArt-XL-2-512x512 / PixArt-XL-2-1024-MS, or the base stored in the ControlNet file)." + fix
        )
    problems = []
    if c.hidden_size != b.hidden_size:
        problems.append(f"width {c.hidden_size} vs the base's {b.hidden_size}")
    if c.num_heads != b.num_heads and c.hidden_size == b.hidden_size:
        problems.append(f"{c.num_heads} attention heads vs the base's {b.num_heads}")
    if b.depth < c.num_copies + 1:
        problems.append(f"{c.num_copies} control blocks feed base blocks 1..{c.num_copies}, but the base has only "
                        f"{b.depth} blocks")
    if abs(c.mlp_ratio - b.mlp_ratio) > 1e-6 and c.hidden_size == b.hidden_size:
        problems.append(f"MLP width {int(c.hidden_size * c.mlp_ratio)} vs the base's "
                        f"{int(b.hidden_size * b.mlp_ratio)}")
    if c.qk_norm != b.qk_norm:
        problems.append("the blocks differ in q/k normalisation")
    if c.text_len is not None and c.text_len != b.text_len:
        problems.append(f"text length {c.text_len} tokens vs the base's {b.text_len}")
    if c.caption_channels is not None and c.caption_channels != b.caption_channels:
        problems.append(f"caption channels {c.caption_channels} vs the base's {b.caption_channels}")
    if problems:
        raise PixArtError(
            "This ControlNet does not fit the base model: " + "; ".join(problems) + ". A ControlNet only works with "
            "the base model it was trained on (for the released ones, PixArt-α XL-2 512 or 1024; the ControlNet file "
            "itself contains that base)."
        )


# -------------------------------------------------------------------------------------------------------------------
# Control image
# -------------------------------------------------------------------------------------------------------------------


def resize_cover_crop(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, height, width): scale (bilinear, antialiased) until the image covers the target, then
    crop the center. For an image of the target's aspect this is the app's Resize(min side) + CenterCrop."""
    h, w = images.shape[-2:]
    if (h, w) == (height, width):
        return images
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    if (nh, nw) != (h, w):
        images = F.interpolate(images, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    top, left = int(round((nh - height) / 2.0)), int(round((nw - width) / 2.0))  # torchvision CenterCrop
    return images[..., top:top + height, left:left + width]


def prepare_control_image(
    image, height: int, width: int, hed: HEDDetector | None = None
) -> torch.Tensor:
    """A control image of any size -> (B, 3, height, width) in [-1, 1], ready for vae.encode.

    image: (B, H, W, C) as ComfyUI's IMAGE, (B, C, H, W), a single (H, W, C)/(C, H, W), a PIL image or a uint8 array;
    values in [0, 1] (uint8 0..255). With `hed`, the image is a photo turned into its HED edge map first (as the
    PixArt-δ app); without, it is used as it is (a ready-made edge map).
    """
    height, width = int(height), int(width)
    if height <= 0 or width <= 0 or height % 8 or width % 8:
        raise PixArtError(f"The generation size must be positive multiples of 8 px, not {height}x{width}.")
    images = image_to_bchw(image)
    images = resize_cover_crop(images, height, width).clamp(0, 1)
    if hed is not None:
        images = hed(images)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return (images * 2 - 1).contiguous()


@dataclass
class ControlInput:
    """A ControlNet with its control image and schedule, before the image is encoded: what a caller hands to
    pipeline.sample_batch. image: (1 or B, 3, H, W) in [0, 1] at any size (fitted to the generation size); vae: the
    PixArtVAE that encodes it into the base model's latent space."""

    controlnet: PixArtControlNet
    vae: object
    image: torch.Tensor
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0


def bind_controls(inputs: Sequence[ControlInput], base: PixArtTransformer, width: int, height: int,
                  interrupt=None) -> list[ControlHint]:
    """The control hints for one generation: each image fitted to the generation size, VAE-encoded into the model's
    latent space (scaled, as the ControlNet was trained), bound to its ControlNet with its strength and start/end."""
    hints = []
    for c in inputs:
        c.vae.check_latent_scale(base.config.latent_scale)
        hint = c.vae.encode(prepare_control_image(c.image, height, width), input="signed", interrupt=interrupt)
        hints.append(c.controlnet.bind(base, hint, c.strength, c.start, c.end))
    return hints


def controls_at_step(controls: Sequence[ControlHint] | None, step_index: int, total_steps: int) -> list[ControlHint]:
    """The controls to pass to the transformer at one sampling step."""
    return [c for c in (controls or []) if c.active(step_index, total_steps)]
