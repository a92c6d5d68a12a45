"""The VAE PixArt decodes with: latent scale, decode/encode, and the out-of-memory fallback to smaller tiles.
Reading VAE files (diffusers folder or one ldm-layout file) is loading/vae_files.py's job.

PixArt-α/δ use the SD VAE (sd-vae-ft-ema/-mse, latent scale 0.18215); PixArt-Σ uses the SDXL VAE (0.13025, the
fp16-fix variant included). Both are diffusers' AutoencoderKL; their config is embedded here, never fetched. The two
cannot be told apart from their weights, so `kind` is chosen by the loader's caller (or inferred from the latent scale
of the model the VAE will serve, a diffusers config.json, or the file name, in that order).

Latents in and out are *scaled* latents, the convention of PixArt's samplers (diffusers: vae.decode(x / scale)): decode
divides by the scaling factor (z = latents / scale + shift), encode multiplies. ComfyUI's LATENT holds the raw
VAE latent instead (ComfyUI scales inside its model wrapper): raw_to_scaled / scaled_to_raw (and the VAE's from_raw /
to_raw) convert. Images are (B, 3, H, W) float32 on the CPU, in
[0, 1] (output="image") or the network's own [-1, 1] range (output="signed", not clamped).

Decoding modes (see vae_tiling.py for how they work):
  "whole"  the untiled diffusers network (memory grows fast: tens of GB at 4K);
  "exact"  tiled, equal to "whole" up to float rounding; parks whole feature maps (memory grows with the image);
  "fast"   tiled with GroupNorm statistics estimated once; memory set by the tile size; no seams either;
  "auto"   on the CPU whole while its estimated memory fits the budget (it is the fastest: the network runs once, in
           channels-last memory format, which oneDNN's convolutions prefer: 2.3x faster in bf16 here); then exact
           while that fits; else fast.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
import torch.nn as nn

if TYPE_CHECKING:  # imported where a VAE is built: importing diffusers' models also imports bitsandbytes, which
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL  # would slow down and clutter start-up

from .errors import PixArtError
from .memory import FreeMemory, free_memory, is_out_of_memory
from .vae_tiling import (
    Plan,
    ProgressCallback,
    Step,
    TileRunner,
    count_units,
    decoder_steps,
    encoder_steps,
    exact_peak_bytes,
    fallback_dtype_for,
    fast_peak_bytes,
    pixel_bytes,
    run_fast,
    step_sizes,
    tile_grid,
    whole_peak_bytes,
)

log = logging.getLogger(__name__)

SD, SDXL = "sd", "sdxl"

_BLOCKS = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
)
# stabilityai/sd-vae-ft-ema and -mse (PixArt-α/δ): diffusers defaults for scale and upcast.
SD_VAE_CONFIG: dict[str, Any] = dict(_BLOCKS, sample_size=256, scaling_factor=0.18215, force_upcast=True)
# stabilityai/sdxl-vae (PixArt-Σ); madebyollin/sdxl-vae-fp16-fix differs only in force_upcast=False.
SDXL_VAE_CONFIG: dict[str, Any] = dict(_BLOCKS, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
KIND_CONFIG = {SD: SD_VAE_CONFIG, SDXL: SDXL_VAE_CONFIG}

MODES = ("auto", "exact", "fast", "whole")
# fast mode's mid-block attention reads at most this many key pixels (a 1024 px image's whole latent): exact up to
# 1024 px, every 2nd pixel at 2048, every 4th at 4096 (where all keys would cost ~140 TFLOP)
FAST_ATTENTION_KEYS = 128 * 128


# ---------------------------------------------------------------------------------------------------------------------
# Raw VAE latents <-> scaled latents
# ---------------------------------------------------------------------------------------------------------------------


def raw_to_scaled(raw: torch.Tensor, scaling_factor: float, shift_factor: Optional[float] = None) -> torch.Tensor:
    """Raw VAE latents (what the encoder's mean is, and what ComfyUI's LATENT holds) -> scaled latents, the
    convention of the transformer and the samplers: (raw - shift) * scale, in float32."""
    raw = raw.float()
    if shift_factor is not None:
        raw = raw - shift_factor
    return raw * scaling_factor


def scaled_to_raw(latents: torch.Tensor, scaling_factor: float, shift_factor: Optional[float] = None) -> torch.Tensor:
    """Scaled latents -> raw VAE latents: latents / scale + shift, in float32 (the inverse of raw_to_scaled)."""
    raw = latents.float() / scaling_factor
    return raw if shift_factor is None else raw + shift_factor


# ---------------------------------------------------------------------------------------------------------------------
# Memory budget
# ---------------------------------------------------------------------------------------------------------------------


def available_host_memory() -> int:
    """Bytes of RAM the system says it can give us now (MemAvailable), or half the physical RAM if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def default_memory_budget(device: torch.device) -> tuple[int, int]:
    """(host budget for parked maps and, on CPU, the tiles; compute-device budget for one tile's work)."""
    host = int(available_host_memory() * 0.5)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return host, int(free * 0.7)
    return host, host


# ---------------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------------


class PixArtVAE(nn.Module):
    """diffusers' AutoencoderKL plus its latent scale/shift, with seam-free tiled decode and encode."""

    def __init__(self, model: AutoencoderKL, kind: str, scaling_factor: float,
                 shift_factor: Optional[float] = None) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.kind = kind
        self.scaling_factor = float(scaling_factor)
        self.shift_factor = float(shift_factor) if shift_factor is not None else None
        self.latent_channels = int(model.config.latent_channels)
        self.stride = 2 ** (len(model.config.block_out_channels) - 1)

    def __repr__(self) -> str:
        return (f"PixArtVAE(kind={self.kind!r}, scaling_factor={self.scaling_factor}, dtype={self.dtype}, "
                f"device={self.device}, can_encode={self.can_encode})")

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.decoder.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.decoder.parameters()).device

    @property
    def can_encode(self) -> bool:
        return self.model.encoder is not None

    def check_latent_scale(self, latent_scale: float) -> None:
        """Raise if the model whose latents we decode was trained with another VAE scale (α vs Σ)."""
        if abs(latent_scale - self.scaling_factor) > 1e-4:
            raise PixArtError(
                f"This VAE is loaded as '{self.kind}' (scale {self.scaling_factor}) but the model uses latent scale "
                f"{latent_scale}: PixArt-α/δ need the SD VAE (0.18215), PixArt-Σ the SDXL VAE (0.13025). "
                "Load the matching VAE or pass the right kind.")

    # -- raw VAE latents <-> our scaled latents -----------------------------------------------------------------------

    def from_raw(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents (ComfyUI's LATENT holds these) -> scaled latents as the samplers and decode() use them."""
        return raw_to_scaled(raw, self.scaling_factor, self.shift_factor)

    def to_raw(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> raw VAE latents."""
        return scaled_to_raw(latents, self.scaling_factor, self.shift_factor)

    # -- decode --------------------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, mode: str = "auto", tile_size: Optional[int] = None,
               memory_budget: Optional[int] = None, callback: Optional[ProgressCallback] = None,
               interrupt: Optional[Callable[[], None]] = None, output: str = "image") -> torch.Tensor:
        """Scaled latents (B, 4, h, w) -> images (B, 3, 8h, 8w) float32 on the CPU (raw latents: decode(from_raw(raw))).

        mode: "auto" | "exact" | "fast" | "whole" (module docstring). tile_size: tile side in image pixels (multiple
        of 8); default picked from memory_budget (bytes; default half of the free RAM). callback(done, total) after
        every tile; interrupt() is called before every tile and may raise to cancel. output: "image" gives [0, 1],
        "signed" the raw network output (about [-1, 1], not clamped)."""
        z = self.to_raw(self._check_latents(latents))
        latent = (z.shape[2], z.shape[3])
        images = self._run(decoder_steps(self.model), z, latent, mode, tile_size, memory_budget, callback, interrupt,
                           whole=lambda t: self.model.decoder(self.model.post_quant_conv(t)
                                                              if self.model.post_quant_conv is not None else t))
        return _finish_image(images, output)

    # -- encode --------------------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def encode(self, images: torch.Tensor, mode: str = "auto", tile_size: Optional[int] = None,
               memory_budget: Optional[int] = None, callback: Optional[ProgressCallback] = None,
               interrupt: Optional[Callable[[], None]] = None, input: str = "image", sample: bool = False,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] (input="image") or [-1, 1] (input="signed") -> scaled latents
        (B, 4, H/8, W/8) float32 on the CPU (raw latents: to_raw(encode(...))).

        The latent is the posterior mean by default (deterministic, as ComfyUI's VAEEncode); sample=True draws from
        the posterior with `generator`, as PixArt's ControlNet pipeline does (latent_dist.sample()). Modes and tiling
        as in decode."""
        if not self.can_encode:
            raise PixArtError("This VAE file has only a decoder; load a full VAE to encode images.")
        x = self._check_images(images, input)
        latent = (x.shape[2] // self.stride, x.shape[3] // self.stride)

        def whole(t: torch.Tensor) -> torch.Tensor:
            h = self.model.encoder(t)
            return self.model.quant_conv(h) if self.model.quant_conv is not None else h

        moments = self._run(encoder_steps(self.model), x, latent, mode, tile_size, memory_budget, callback, interrupt,
                            whole=whole)
        mean, logvar = moments.chunk(2, dim=1)
        z = mean
        if sample:
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            z = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return self.from_raw(z)

    # -- shared machinery ----------------------------------------------------------------------------------------------

    def _check_latents(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            extra = ""
            if z.ndim == 4 and z.shape[1] == 16:
                extra = " These look like SD3/Flux latents (16 channels); PixArt latents have 4."
            raise PixArtError(f"Expected latents of shape (B, {self.latent_channels}, h, w), got {tuple(z.shape)}."
                              + extra)
        if z.shape[2] < 1 or z.shape[3] < 1:
            raise PixArtError(f"Empty latents {tuple(z.shape)}.")
        if not torch.isfinite(z).all():
            raise PixArtError("The latents contain NaN or Inf: the sampler diverged (try fewer/other steps, a lower "
                              "CFG, or fp32/bf16 for the transformer).")
        return z

    def _check_images(self, images: torch.Tensor, input: str) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise PixArtError(f"Expected images of shape (B, 3, H, W), got {tuple(images.shape)} (ComfyUI IMAGEs are "
                              "(B, H, W, 3): move the channels first).")
        h, w = images.shape[2:]
        if h % self.stride or w % self.stride or h == 0 or w == 0:
            raise PixArtError(f"Image size {w}x{h} is not a multiple of {self.stride}; crop or resize it first.")
        if not torch.isfinite(images).all():
            raise PixArtError("The image contains NaN or Inf values.")
        if input == "image":
            return images.float() * 2.0 - 1.0
        if input == "signed":
            return images.float()
        raise PixArtError(f"input must be 'image' or 'signed', not {input!r}.")

    def _budgets(self, memory_budget: Optional[int]) -> tuple[int, int]:
        host, device = default_memory_budget(self.device)
        if memory_budget is not None:
            if memory_budget <= 0:
                raise PixArtError(f"memory_budget must be a positive number of bytes, got {memory_budget}.")
            host, device = int(memory_budget), min(int(memory_budget), device)
        return host, device

    def plan(self, steps: list[Step], shape: tuple[int, ...], latent: tuple[int, int], mode: str = "auto",
             tile_size: Optional[int] = None, memory_budget: Optional[int] = None) -> Plan:
        """The mode and tile sizes a run of `steps` over an input of `shape` will use.

        exact: each step is tiled so one tile's work stays under an eighth of the compute budget (at most 512 MiB;
        with tile_size, the work of a tile_size x tile_size tile at image resolution); auto takes exact if its
        estimated peak fits the budget. fast: the largest independent tile (latent pixels) whose estimated peak fits
        the budget, or tile_size / 8. Fast mode's floor is the latent-resolution part (conv_in, mid block and first
        up block over whole latent-sized maps: estimated 2.4 GB at 4096x4096 in fp32, 1.6 GB in bf16)."""
        if mode not in MODES:
            raise PixArtError(f"mode must be one of {MODES}, not {mode!r}.")
        if tile_size is not None and (tile_size < 16 or tile_size % 8):
            raise PixArtError(f"tile_size must be a multiple of 8 of at least 16 pixels, got {tile_size}.")
        if mode == "whole":
            return Plan("whole", 0)
        host, device = self._budgets(memory_budget)
        elem = torch.finfo(self.dtype).bits // 8
        size, channels = (shape[2], shape[3]), shape[1]
        final = step_sizes(steps, size)[-1]
        out_bytes = 4 * final[0] * final[1] * steps[-1].out_channels  # the float32 result
        if tile_size is not None:
            sizes = step_sizes(steps, size)
            top = max(s[0] for s in sizes[1:])
            ins = [channels] + [s.out_channels for s in steps[:-1]]
            work = int(max(pixel_bytes(s, c, elem) for s, c, o in zip(steps, ins, sizes[1:]) if o[0] == top)
                       * tile_size ** 2)
        else:
            work = min(device // 8, 512 << 20)
        if mode == "auto" and self.device.type == "cpu" and tile_size is None:
            if whole_peak_bytes(steps, size, channels, elem) + out_bytes <= host:
                return Plan("whole", 0)
        exact = Plan("exact", work)
        fits = exact_peak_bytes(steps, size, channels, elem, work) + out_bytes <= host
        if mode == "exact" or (mode == "auto" and fits):
            return exact
        budget = min(host, device)
        floor = fast_peak_bytes(steps, size, channels, latent, Plan("fast", work, 16, 32 * 32), elem) + out_bytes
        if floor > budget:
            log.warning("VAE: even fast mode needs about %.1f GB for %s latents (the latent-resolution maps and the "
                        "mid-block attention); the budget is %.1f GB.", floor / 1e9, tuple(shape), budget / 1e9)
        tiles = (tile_size // 8,) if tile_size is not None else (128, 96, 80, 64, 48, 32, 24, 16)
        for t in tiles:  # the largest tile (speed), then the largest statistics pass (accuracy) that fit
            for area in (0, 128 * 128, 96 * 96, 64 * 64, 48 * 48, 32 * 32):
                plan = Plan("fast", work, t, area, FAST_ATTENTION_KEYS)
                if fast_peak_bytes(steps, size, channels, latent, plan, elem, floor=False) + out_bytes <= budget:
                    return plan
        return Plan("fast", work, tiles[-1], 32 * 32, FAST_ATTENTION_KEYS)

    def _run(self, steps: list[Step], x: torch.Tensor, latent: tuple[int, int], mode: str,
             tile_size: Optional[int], memory_budget: Optional[int], callback, interrupt,
             whole: Callable) -> torch.Tensor:
        plan = self.plan(steps, tuple(x.shape), latent, mode, tile_size, memory_budget)
        device, park = self.device, torch.device("cpu")
        if device.type != "cpu" and plan.mode == "exact":
            elem = torch.finfo(self.dtype).bits // 8
            peak = exact_peak_bytes(steps, (x.shape[2], x.shape[3]), x.shape[1], elem, plan.work_bytes)
            if peak <= self._budgets(memory_budget)[1]:
                park = device  # the whole run fits on the GPU: no round trips to host memory
        channels_last = device.type == "cpu" and plan.mode != "whole"
        if channels_last:
            self._to_channels_last()
        runner = TileRunner(device, park, self.dtype, fallback_dtype_for(device), callback, interrupt,
                            channels_last=channels_last)
        if plan.mode == "fast" and len(tile_grid(latent, plan.tile)) == 1:
            plan = Plan("exact", plan.work_bytes)  # a single tile: exact costs the same and needs no estimate
        log.debug("VAE run over %s: %s", tuple(x.shape), plan)
        size = (x.shape[2], x.shape[3])
        per_sample = 1 if plan.mode == "whole" else count_units(steps, size, x.shape[1], latent, plan, runner.elem)
        runner.total = x.shape[0] * per_sample
        outputs = []
        for b in range(x.shape[0]):
            sample = x[b:b + 1]
            if plan.mode == "whole":
                outputs.append(self._whole(steps, sample, whole, runner))
            elif plan.mode == "exact":
                outputs.append(runner.run_exact(steps, sample, plan.work_bytes).float().contiguous())
            else:
                outputs.append(run_fast(runner, steps, sample, latent, plan).float().contiguous())
        cpu = torch.device("cpu")
        return outputs[0].to(cpu) if len(outputs) == 1 else torch.cat(outputs).to(cpu)

    def _whole(self, steps: list[Step], x: torch.Tensor, whole: Callable, runner: TileRunner) -> torch.Tensor:
        """The untiled diffusers network; on NaN/Inf, the same network untiled in the fallback dtype."""
        runner.check_interrupt()
        x = x.to(self.device, self.dtype)
        if self.device.type == "cpu":
            self._to_channels_last()
            x = x.contiguous(memory_format=torch.channels_last)
        y = whole(x).contiguous()
        if not torch.isfinite(y).all():
            runner.escalate("the untiled VAE")
            y = runner.run_exact(steps, x.contiguous(), 1 << 62)
        runner.tick()
        return y.float()

    def _to_channels_last(self) -> None:
        """oneDNN's CPU convolutions are much faster on channels-last maps and weights (full SD VAE, untiled: 2.3x in
        bf16, 1.2x in fp32); on the CPU every mode runs that way. The weights are converted once, in place."""
        if not self.model.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last):
            self.model.to(memory_format=torch.channels_last)


def _finish_image(images: torch.Tensor, output: str) -> torch.Tensor:
    if output == "image":
        return images.mul_(0.5).add_(0.5).clamp_(0.0, 1.0)  # in place: a 4K image is 200 MB
    if output == "signed":
        return images
    raise PixArtError(f"output must be 'image' or 'signed', not {output!r}.")


# ---------------------------------------------------------------------------------------------------------------------
# Out of memory: smaller tiles
# ---------------------------------------------------------------------------------------------------------------------

FIRST_OOM_TILE = 512  # px: the first retry after an out-of-memory error with an automatic tile size
MIN_OOM_TILE = 64  # px: below this, tiles cost more in overlap than they save


def decode_fitting(vae: PixArtVAE, latents: torch.Tensor, mode: str = "auto", tile_size: Optional[int] = None,
                   free_memory: FreeMemory = free_memory, raw_latents: bool = False, **kwargs) -> torch.Tensor:
    """vae.decode, retried in fast mode with ever smaller tiles when memory runs out (see with_smaller_tiles).
    raw_latents: the latents are raw VAE latents (ComfyUI's LATENT), not scaled ones."""
    if raw_latents:
        latents = vae.from_raw(latents)
    return with_smaller_tiles("decoding", mode, tile_size, free_memory,
                              lambda m, t: vae.decode(latents, mode=m, tile_size=t, **kwargs))


def encode_fitting(vae: PixArtVAE, images: torch.Tensor, tile_size: Optional[int] = None,
                   free_memory: FreeMemory = free_memory, raw_latents: bool = False, **kwargs) -> torch.Tensor:
    """vae.encode (mode auto), retried in fast mode with ever smaller tiles when memory runs out.
    raw_latents: return raw VAE latents (ComfyUI's LATENT) instead of scaled ones."""
    latents = with_smaller_tiles("encoding", "auto", tile_size, free_memory,
                                 lambda m, t: vae.encode(images, mode=m, tile_size=t, **kwargs))
    return vae.to_raw(latents) if raw_latents else latents


def with_smaller_tiles(what: str, mode: str, tile_size: Optional[int], free_memory: FreeMemory,
                       run: Callable[[str, Optional[int]], torch.Tensor]) -> torch.Tensor:
    """run(mode, tile_size); out of memory, again in fast mode with ever smaller tiles (the result differs from exact
    only by the fast mode's shared statistics), then a PixArtError saying what to do."""
    tile = tile_size or None
    while True:
        try:
            return run(mode, tile)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            if mode == "fast" and tile and tile <= MIN_OOM_TILE:
                raise PixArtError(f"Out of memory while {what} even with {tile} px tiles. Free memory (close other "
                                  "models or programs), use a smaller image, or precision fp16/bf16 for the VAE."
                                  ) from exc
            free_memory(tile == (tile_size or None))  # collect garbage once, on the first retry
            # halve (in steps of 64 px), never below the smallest useful tile nor above the user's own
            smaller = min(tile, max(MIN_OOM_TILE, (tile // 2) // 64 * 64)) if tile else FIRST_OOM_TILE
            log.warning("PixArt VAE: out of memory while %s (mode %s, tile %s); retrying in fast mode with %d px "
                        "tiles.", what, mode, tile or "auto", smaller)
            mode, tile = "fast", smaller
