"""The bridge from a PixArt transformer to the samplers: an `eps_fn(x, t) -> eps` with guidance built in.

The samplers (samplers.py) know nothing about PixArt; this wrapper holds everything PixArt-specific about one model
evaluation: the text conditioning (projected once per generation, cross-attention K/V cached), classifier-free guidance,
the micro-conditions of α-1024/δ checkpoints, optional ControlNet signals, optional step caching (step_cache.py) and
the interrupt check.

Classifier-free guidance as diffusers' PixArt pipelines do it:
- on when guidance_scale > 1 (PixArt-δ LCM runs with guidance 0: the guidance is distilled into the weights);
- both halves in ONE batch, [uncond, cond], each half with its own text mask (the empty prompt's mask is 1 token);
- `uncond + s * (cond - uncond)` applied to all output channels, then the first 4 (epsilon) are kept. The original
  IDDPM code guided only 3 channels; that quirk is not copied (α repo `PixArt.forward_with_cfg`, a DiT legacy).
A v-prediction model (config.prediction_type "v_prediction", PixArt-nano) is guided on v (ε is affine in v with
the same x_t for both halves, so this equals guiding ε) and its result converted to ε for the samplers.
The model runs in its own dtype; guidance and everything after it are computed in float32.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .config import V_PREDICTION
from .errors import Interrupted, PixArtError
from .schedule import ddpm_schedule, step_of_timestep
from .step_cache import StepCacheOptions, make_step_cache
from .transformer import TextConditioning


InterruptCheck = Callable[[], Optional[bool]]


def _pad_tokens(embeds: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad (B, L, C) embeddings and their mask with masked-out tokens to `length` (so halves of different L stack)."""
    extra = length - embeds.shape[1]
    if extra <= 0:
        return embeds, mask
    return F.pad(embeds, (0, 0, 0, extra)), F.pad(mask, (0, extra))


def _match_batch(t: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    if t.shape[0] == batch:
        return t
    if t.shape[0] == 1:
        return t.expand(batch, *t.shape[1:])
    raise PixArtError(f"The {what} has batch {t.shape[0]} but {batch} images are being generated; give one entry "
                      "for all images or one per image.")


class GuidedEpsilon:
    """`eps_fn(x, t)` for the samplers: PixArt transformer + text + CFG + micro-conditions + controls.

    embeds/mask: (B or 1, L, C) T5 embeddings and their 0/1 mask; negative_*: the unconditional branch (needed only
    when guidance_scale > 1). size: the generated [height, width] in pixels, for the micro-conditions (resolution and
    aspect ratio = height / width, as diffusers). controls: ControlSignal callables passed through to the transformer;
    those with a step schedule (`active(step, total)`, ControlNet start/end) are passed only at their steps, which
    needs `timesteps`, the sampler's table (every sampler here evaluates the model once per step, at its entry).
    interrupt(): called before every model evaluation; it may raise itself (ComfyUI's interrupt does) or return True,
    which raises `Interrupted`.
    step_cache: Δ-DiT / T-GATE options (None or all off: every step runs in full, as without it). Needs `timesteps`.
    After T-GATE's gate step guidance is dropped: the model runs the conditional batch alone and its output is eps.
    """

    def __init__(
        self,
        model,
        embeds: torch.Tensor,
        mask: Optional[torch.Tensor],
        *,
        batch_size: int,
        size: tuple[int, int],
        negative_embeds: Optional[torch.Tensor] = None,
        negative_mask: Optional[torch.Tensor] = None,
        guidance_scale: float = 1.0,
        controls: Optional[Sequence] = None,
        interrupt: Optional[InterruptCheck] = None,
        timesteps: Optional[Sequence[float]] = None,
        step_cache: Optional[StepCacheOptions] = None,
    ):
        self.model = model
        self.guidance_scale = float(guidance_scale)
        self.do_cfg = self.guidance_scale > 1.0
        self.controls = list(controls) if controls else None
        self.timesteps = [float(t) for t in timesteps] if timesteps is not None else None
        self.interrupt = interrupt
        self.batch_size = batch_size
        self.in_channels = model.config.in_channels
        # a v model's output becomes ε with the training schedule's noise level at t
        self.v_schedule = ddpm_schedule() if getattr(model.config, "prediction_type", None) == V_PREDICTION else None
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        if self.do_cfg:
            if negative_embeds is None:
                raise PixArtError(f"Guidance {self.guidance_scale:g} needs an unconditional branch (a negative "
                                  "prompt, even empty); or set guidance to 1 or less to run without it.")
            if negative_mask is None:
                negative_mask = torch.ones(negative_embeds.shape[:2], dtype=torch.long, device=negative_embeds.device)
            # One text batch [uncond x B, cond x B] lines up with the latent batch [x, x].
            length = max(embeds.shape[1], negative_embeds.shape[1])
            neg_e, neg_m = _pad_tokens(negative_embeds, negative_mask.to(embeds.device), length)
            pos_e, pos_m = _pad_tokens(embeds, mask, length)
            y = torch.cat([_match_batch(neg_e, batch_size, "negative prompt"),
                           _match_batch(pos_e.to(neg_e.dtype), batch_size, "prompt")])
            y_mask = torch.cat([_match_batch(neg_m, batch_size, "negative mask"),
                                _match_batch(pos_m, batch_size, "prompt mask")])
        else:
            _match_batch(embeds, batch_size, "prompt")  # only checks: a batch of 1 broadcasts in the transformer
            y, y_mask = embeds, mask
        self.text = model.prepare_text(y, y_mask)
        self.cache = None
        self.cond_text = self.text
        if step_cache is not None and step_cache.enabled:
            if self.timesteps is None:
                raise PixArtError("Step caching needs the sampler's timesteps; pass timesteps= to GuidedEpsilon.")
            self.cache = make_step_cache(step_cache, self.timesteps, model)  # one per generation: it holds state
            if self.do_cfg and step_cache.tgate:
                # The conditional half of the projected [uncond, cond] batch, for the steps after the gate: the same
                # tokens and mask that half had, without projecting the caption again.
                self.cond_text = TextConditioning(self.text.tokens[batch_size:], self.text.mask[batch_size:])
        height, width = size
        self.resolution = torch.tensor([[float(height), float(width)]], dtype=torch.float32)
        self.aspect_ratio = torch.tensor([[float(height / width)]], dtype=torch.float32)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.interrupt is not None and self.interrupt():
            raise Interrupted("Generation interrupted.")
        model_x, model_t = x.to(self.model.dtype), t
        # T-GATE drops guidance after its gate step: the conditional batch alone, its output used as eps
        cfg = self.do_cfg and (self.cache is None or self.cache.guidance_needed(t))
        if cfg:
            model_x = torch.cat([model_x, model_x])
            model_t = torch.cat([t, t])
        controls = self._controls_at(model_t)
        extra = {} if self.cache is None else self.cache.model_kwargs(model_t, cfg=cfg, controls=controls)
        out = self.model(model_x, model_t, self.text if cfg else self.cond_text,
                         resolution=self.resolution, aspect_ratio=self.aspect_ratio, controls=controls,
                         **extra).float()
        if cfg:
            uncond, cond = out.chunk(2)
            out = uncond + self.guidance_scale * (cond - uncond)
        out = out[:, : self.in_channels]
        if self.v_schedule is not None:
            out = self.v_schedule.eps_from_v(x, out, t)
        return out

    def _controls_at(self, t: torch.Tensor) -> Optional[list]:
        if not self.controls:
            return None
        scheduled = [c for c in self.controls if hasattr(c, "active")]
        if not scheduled:
            return self.controls
        if self.timesteps is None:
            raise PixArtError("A ControlNet with a start/end schedule needs the sampler's timesteps; pass timesteps= "
                              "to GuidedEpsilon.")
        step = step_of_timestep(float(t.reshape(-1)[0]), self.timesteps)
        active = [c for c in self.controls if not hasattr(c, "active") or c.active(step, len(self.timesteps))]
        return active or None
