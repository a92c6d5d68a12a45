"""Training-free step caching for the multi-step samplers: Δ-DiT block caching and T-GATE. Off by default.

Both reuse work from an earlier sampling step instead of recomputing it, trading a small, measured change of the image
for speed (bench/bench_step_cache.py reports both numbers; tests/test_step_cache.py bounds the change).

- Δ-DiT (Chen et al. 2024, arXiv 2406.01125): the front blocks of a DiT shape the outline, the rear blocks the detail.
  Every `delta_interval`-th step runs all blocks and remembers, for a range of blocks, the change they made to the
  tokens (Δ = output - input: the "Δ-Cache"). The steps in between skip that range and add the remembered Δ to their
  own input. In the first part of the schedule (`delta_boundary`) the REAR blocks are skipped, later the FRONT blocks.
  With 21 of 28 blocks skipped on every second step, 20 steps cost about 12.5 full steps (the paper's 1.6x).
- T-GATE (Zhang et al. 2024, arXiv 2404.02747; the `tgate` package's PixArt loader): cross-attention settles early.
  At the gate step every block's cross-attention output is stored (the mean of the unconditional and conditional halves)
  and reused afterwards; from then on classifier-free guidance is dropped, so each later step runs one batch, not two.

How a guidance wrapper uses it (it needs no PixArt internals):

    cache = make_step_cache(options, timesteps, model)          # once per generation; None when options are off
    cfg = do_cfg and cache.guidance_needed(t)                   # False after T-GATE's gate step
    out = model(x, t, text_for(cfg), ..., **cache.model_kwargs(t, cfg=cfg, controls=controls))

After the gate step the model must get the conditional batch only (latent x once, the prompt's own text conditioning)
and its output is used as epsilon directly. With ControlNet signals, blocks fed by the ControlNet are never skipped.
guidance.GuidedEpsilon does exactly this; generate_latents, PixArtPipeline, the CLI (`--cache`) and the sampler nodes
take the options or one of the mode names of `step_cache_options`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .errors import PixArtError
from .schedule import step_of_timestep


@dataclass(frozen=True)
class StepCacheOptions:
    """What to cache. Fractions are of the number of sampling steps / transformer blocks, so one setting fits
    any step count and depth (20 steps, 28 blocks: Δ-DiT skips 21 blocks on steps 1, 3, 5, ...; rear until step 10)."""

    delta_dit: bool = False
    delta_interval: int = 2  # run all blocks every this many steps; skip blocks on the steps in between
    delta_blocks: float = 0.75  # fraction of the blocks skipped on a cached step
    delta_boundary: float = 0.5  # steps before this fraction skip the rear blocks, later steps the front blocks
    tgate: bool = False
    tgate_gate: float = 0.5  # fraction of steps after which cross-attention is reused and guidance dropped

    @property
    def enabled(self) -> bool:
        return self.delta_dit or self.tgate

    def check(self) -> None:
        if self.delta_interval < 2:
            raise PixArtError(f"delta_interval must be 2 or more (1 reuses nothing), not {self.delta_interval}.")
        if not 0.0 < self.delta_blocks < 1.0:
            raise PixArtError(f"delta_blocks is the fraction of blocks to skip, above 0 and below 1 "
                              f"(not {self.delta_blocks}).")
        if not 0.0 <= self.delta_boundary <= 1.0:
            raise PixArtError(f"delta_boundary must be between 0 and 1, not {self.delta_boundary}.")
        if not 0.0 < self.tgate_gate <= 1.0:
            raise PixArtError(f"tgate_gate must be above 0 and at most 1, not {self.tgate_gate}.")


# The named settings users pick (CLI --cache, the sampler nodes' step_cache input): name -> options (None = off).
MODES: dict[str, StepCacheOptions | None] = {
    "off": None,
    "delta-dit": StepCacheOptions(delta_dit=True),
    "t-gate": StepCacheOptions(tgate=True),
    "both": StepCacheOptions(delta_dit=True, tgate=True),
}


def step_cache_options(mode: str | StepCacheOptions | None) -> StepCacheOptions | None:
    """Options for a mode name (a key of MODES: off, delta-dit, t-gate, both); options given as StepCacheOptions are
    checked and returned as they are (None too)."""
    if mode is None:
        return None
    if isinstance(mode, StepCacheOptions):
        mode.check()  # a bad setting is reported where it enters, before any work
        return mode
    if mode not in MODES:
        raise PixArtError(f"Unknown step cache {mode!r}; choose one of: {', '.join(MODES)}.")
    return MODES[mode]


def make_step_cache(
    options: StepCacheOptions | None, timesteps: Sequence[float], model: torch.nn.Module
) -> "StepCache | None":
    """A StepCache for one generation of `model`, or None when nothing is switched on (the model runs as usual)."""
    if options is None or not options.enabled or len(timesteps) == 0:
        return None
    return StepCache(options, timesteps, depth=len(model.blocks))


class StepCache:
    """The state of step caching during one generation. Build a new one for every generation."""

    def __init__(self, options: StepCacheOptions, timesteps: Sequence[float], depth: int):
        options.check()
        self.options = options
        self.depth = depth
        self.timesteps = [float(t) for t in timesteps]
        self.total = len(self.timesteps)
        # T-GATE: steps < gate run normally; the last of them stores the cross-attention; later steps reuse it.
        self.gate_step = max(1, round(options.tgate_gate * self.total)) if options.tgate else self.total
        self._cross: dict[int, torch.Tensor] = {}
        self._marks: dict[int, torch.Tensor] = {}  # Δ-DiT: tokens at range boundaries on the last full step
        self._last_full = -1
        self.full_steps = 0  # counters for reports and tests
        self.cached_steps = 0

    # ----- schedule -----
    def step_index(self, t: float | torch.Tensor) -> int:
        """The sampling step a model timestep belongs to (the nearest listed timestep)."""
        return step_of_timestep(float(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) else t, self.timesteps)

    def guidance_needed(self, t: float | torch.Tensor) -> bool:
        """False once T-GATE has frozen cross-attention: run the conditional batch only, without guidance."""
        return self.step_index(t) < self.gate_step

    def _ranges(self, depth: int, protected: int) -> dict[str, tuple[int, int]]:
        k = max(1, min(depth - 1, round(self.options.delta_blocks * depth)))
        ranges = {"front": (0, k), "rear": (depth - k, depth)}
        if protected:  # ControlNet residuals enter blocks 1..protected-1: never skip those, nor block 0
            ranges = {name: (max(a, protected), b) for name, (a, b) in ranges.items()}
            ranges = {name: (a, b) for name, (a, b) in ranges.items() if b - a >= 1}
        return ranges

    # ----- what the model gets -----
    def model_kwargs(self, t: float | torch.Tensor, *, cfg: bool, controls: Sequence | None = None) -> dict:
        """Keyword arguments for PixArtTransformer.forward at timestep t. cfg: whether this call's batch is the
        [unconditional, conditional] pair. controls: the ControlNet signals passed to the model at this step."""
        step = self.step_index(t)
        kwargs: dict[str, Callable] = {}
        if self.options.delta_dit:
            kwargs["block_hook"] = self._delta_hook(step, controls)
        if self.options.tgate:
            kwargs["cross_attn_hook"] = self._tgate_hook(step, cfg)
        return kwargs

    def _delta_hook(self, step: int, controls: Sequence | None) -> Callable[[int, torch.Tensor], torch.Tensor | None]:
        o = self.options
        protected = 0
        if controls:
            protected = 1 + max(getattr(getattr(c, "controlnet", None), "num_copies", 10**6) for c in controls)
        state: dict = {}

        def hook(i: int, h: torch.Tensor) -> torch.Tensor | None:
            if not state:  # first call of this step: choose full or cached
                ranges = self._ranges(self.depth, protected)
                name = "rear" if step < o.delta_boundary * self.total else "front"
                usable = (
                    name in ranges and 0 < step - self._last_full < o.delta_interval
                    and all(self._marks.get(j) is not None and self._marks[j].shape == h.shape for j in ranges[name])
                )
                state["range"] = ranges[name] if usable else None
                state["marks"] = {j for r in ranges.values() for j in r}
                if usable:
                    self.cached_steps += 1
                else:
                    self.full_steps += 1
                    self._last_full = step
                    # only this step's marks may be reused: when a ControlNet's start/end changes the ranges, an
                    # older step's mark at another boundary would otherwise pair with a new one
                    self._marks = {}
            span = state["range"]
            if span is None:  # full step: remember the tokens at every range boundary
                if i in state["marks"]:
                    self._marks[i] = h
                return None
            a, b = span
            if i == a:
                return h + (self._marks[b] - self._marks[a])
            if a < i < b:
                return h  # skipped: its change is in the Δ added at block a
            return None

        return hook

    def _tgate_hook(self, step: int, cfg: bool) -> Callable[[int, Callable[[], torch.Tensor]], torch.Tensor]:
        gate = self.gate_step

        def hook(i: int, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
            if step >= gate and i in self._cross:
                return self._cross[i]
            out = compute()
            if step >= gate - 1:  # the gate step (or a later one that missed it) stores what the rest reuse
                if cfg:
                    uncond, cond = out.chunk(2)
                    self._cross[i] = (uncond + cond) / 2
                else:
                    self._cross[i] = out
            return out

        return hook
