"""The VAE PixArt decodes with: loading (diffusers folder or one ldm-layout file), latent scale, and decode/encode.

PixArt-α/δ use the SD VAE (sd-vae-ft-ema/-mse, latent scale 0.18215); PixArt-Σ uses the SDXL VAE (0.13025, the
fp16-fix variant included). Both are diffusers' AutoencoderKL; their config is embedded here, never fetched. The two
cannot be told apart from their weights, so `kind` is chosen by the caller (or inferred from the latent scale of the
model the VAE will serve, a diffusers config.json, or the file name, in that order).

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

import inspect
import json
import logging
import os
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

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
_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                 "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")
_SINGLE_FILE_EXT = (".safetensors", ".sft", ".pt", ".pth", ".ckpt", ".bin")
_LDM_PREFIXES = ("first_stage_model.", "vae.")


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
# Loading
# ---------------------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------------------
# Out of memory: smaller tiles
# ---------------------------------------------------------------------------------------------------------------------

FIRST_OOM_TILE = 512  # px: the first retry after an out-of-memory error with an automatic tile size
MIN_OOM_TILE = 64  # px: below this, tiles cost more in overlap than they save


def decode_fitting(vae: PixArtVAE, latents: torch.Tensor, mode: str = "auto", tile_size: Optional[int] = None,
                   free_memory: FreeMemory = free_memory, **kwargs) -> torch.Tensor:
    """vae.decode, retried in fast mode with ever smaller tiles when memory runs out (see with_smaller_tiles)."""
    return with_smaller_tiles("decoding", mode, tile_size, free_memory,
                              lambda m, t: vae.decode(latents, mode=m, tile_size=t, **kwargs))


def encode_fitting(vae: PixArtVAE, images: torch.Tensor, tile_size: Optional[int] = None,
                   free_memory: FreeMemory = free_memory, **kwargs) -> torch.Tensor:
    """vae.encode (mode auto), retried in fast mode with ever smaller tiles when memory runs out."""
    return with_smaller_tiles("encoding", "auto", tile_size, free_memory,
                              lambda m, t: vae.encode(images, mode=m, tile_size=t, **kwargs))


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


def load_vae(path: str, kind: str = "auto", dtype: torch.dtype = torch.float32,
             device: Union[str, torch.device] = "cpu", latent_scale: Optional[float] = None,
             config_overrides: Optional[dict] = None) -> PixArtVAE:
    """Load an SD or SDXL VAE from a diffusers folder (config.json + diffusion_pytorch_model[.fp16].safetensors, or a
    pipeline folder with a vae/ subfolder) or from one file (.safetensors / .pt / .pth / .ckpt) in the original ldm
    layout (encoder.down.0.block.0..., optionally inside a full SD checkpoint under first_stage_model.) or the diffusers
    layout.

    kind: "sd" (PixArt-α/δ, scale 0.18215), "sdxl" (PixArt-Σ, 0.13025) or "auto": from `latent_scale` (pass the
    serving model's PixArtConfig.latent_scale), else the folder's config.json, else "sdxl" in the file name, else "sd".
    The scale used: latent_scale if given, else that of an explicit kind, else the folder's config, else the kind's.
    config_overrides: AutoencoderKL config values for unusual VAEs (e.g. norm_num_groups, shift_factor), applied last.
    dtype: the weights' and computation's dtype; fp16 pieces that overflow are redone in bf16/fp32 (see decode)."""
    if kind not in ("auto", SD, SDXL):
        raise PixArtError(f"kind must be 'auto', 'sd' or 'sdxl', not {kind!r}.")
    path = os.fspath(path)
    if os.path.isdir(path):
        state, folder_config = _read_folder(path)
    elif os.path.isfile(path):
        if not path.lower().endswith(_SINGLE_FILE_EXT):
            raise PixArtError(f"{path} is not a weights file (expected one of {', '.join(_SINGLE_FILE_EXT)}).")
        state, folder_config = _read_file(path), None
    else:
        raise PixArtError(f"VAE path not found: {path}")
    state = _to_diffusers_layout(state, path)

    explicit = kind != "auto"
    kind = _resolve_kind(kind, latent_scale, folder_config, path)
    config = dict(KIND_CONFIG[kind])
    if folder_config is not None:
        config.update({k: v for k, v in folder_config.items() if not k.startswith("_")})
    config.update(_shape_config(state))
    # the scale: the served model's latent_scale, else an explicit kind, else the folder's config, else the kind's
    scaling = config["scaling_factor"] if not explicit else KIND_CONFIG[kind]["scaling_factor"]
    if latent_scale is not None:
        scaling = float(latent_scale)
    config["scaling_factor"] = scaling
    config.update(config_overrides or {})
    scaling = float(config["scaling_factor"])
    if config.get("act_fn", "silu") != "silu":
        raise PixArtError(f"{path}: activation {config['act_fn']!r} is not an SD/SDXL VAE (they use silu).")

    model = _build(config, state, path)
    vae = PixArtVAE(model, kind, scaling, config.get("shift_factor"))
    vae.to(device=torch.device(device), dtype=dtype)
    log.info("Loaded VAE %s as %s (scale %s, %s)", path, kind, scaling, dtype)
    return vae


def _resolve_kind(kind: str, latent_scale: Optional[float], folder_config: Optional[dict], path: str) -> str:
    if kind != "auto":
        return kind
    if latent_scale is not None:
        for name, cfg in KIND_CONFIG.items():
            if abs(latent_scale - cfg["scaling_factor"]) < 1e-4:
                return name
        raise PixArtError(f"latent_scale {latent_scale} is neither the SD VAE's 0.18215 nor the SDXL VAE's 0.13025.")
    if folder_config is not None and "scaling_factor" in folder_config:
        return SDXL if abs(folder_config["scaling_factor"] - 0.13025) < 1e-4 else SD
    if "sdxl" in os.path.basename(os.path.normpath(path)).lower():
        log.info("VAE %s: taken as the SDXL VAE from its name; pass kind= to override.", path)
        return SDXL
    log.warning("VAE %s: SD and SDXL VAEs cannot be told apart from their weights; assuming the SD VAE (PixArt-α/δ, "
                "scale 0.18215). Pass kind='sdxl' (or the model's latent_scale) for PixArt-Σ.", path)
    return SD


def _read_folder(path: str) -> tuple[dict, dict]:
    if not os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, "vae")):
        path = os.path.join(path, "vae")  # a whole diffusers pipeline folder
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise PixArtError(f"{path} is a folder without config.json; point to a diffusers VAE folder or a VAE file.")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise PixArtError(f"{config_path} is not readable JSON: {e}") from e
    cls = config.get("_class_name", "AutoencoderKL")
    if cls != "AutoencoderKL":
        raise PixArtError(f"{path} holds a {cls}, not an AutoencoderKL VAE (SD / SDXL VAE expected).")
    for name in _WEIGHT_NAMES:
        weights = os.path.join(path, name)
        if os.path.isfile(weights):
            return _read_file(weights), config
    raise PixArtError(f"{path} has no diffusion_pytorch_model[.fp16].safetensors (or .bin) next to config.json.")


def _read_file(path: str) -> dict:
    try:
        if path.lower().endswith((".safetensors", ".sft")):
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except Exception as e:  # safetensors / zip / unpickling errors all mean: not a usable weights file
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise PixArtError(f"{path} is a pickle holding more than weights; it is refused for safety. Use a "
                              ".safetensors VAE.") from e
        raise PixArtError(f"Could not read {path} ({type(e).__name__}: {str(e)[:200]}). The file is probably truncated "
                          "or not a checkpoint; download it again.") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PixArtError(f"{path} does not hold a dictionary of tensors.")
    return state


def _what_is(keys: list[str]) -> str:
    """Name what a non-VAE state dict is, for the error message."""
    def has(*parts: str) -> bool:
        return any(any(k.startswith(p) or f".{p}" in k for p in parts) for k in keys)

    if has("x_embedder.", "t_block.", "y_embedder.", "adaln_single.", "caption_projection."):
        return "a PixArt transformer (load it with the PixArt model loader)"
    if has("controlnet_", "before_proj", "after_proj"):
        return "a ControlNet"
    if has("model.diffusion_model.", "input_blocks.", "time_embedding.", "time_embed."):
        return "a UNet / diffusion model"
    if has("transformer_blocks.", "blocks.0.attn"):
        return "a transformer"
    if has("shared.weight", "encoder.block.0.layer.", "text_model.", "token_embedding"):
        return "a text encoder"
    if has("decoder.layers.", "encoder.layers."):
        return "a TAESD tiny autoencoder (not supported; use the full VAE)"
    return "not a VAE"


def _to_diffusers_layout(state: dict, path: str) -> dict:
    """Any supported VAE layout -> diffusers AutoencoderKL keys; refuses other models with what they are."""
    keys = list(state)
    for prefix in _LDM_PREFIXES:  # a full SD checkpoint or a prefixed VAE
        if any(k.startswith(prefix + "decoder.") for k in keys):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            keys = list(state)
            break
    if "decoder.conv_in.weight" not in state:
        sample = ", ".join(keys[:3]) or "no tensors"
        raise PixArtError(f"{path} is {_what_is(keys)}, not a VAE (first keys: {sample}). PixArt needs the SD VAE "
                          "(α/δ) or the SDXL VAE (Σ).")
    if any(k.startswith("decoder.up_blocks.") for k in keys):
        return state
    if not any(k.startswith("decoder.up.") for k in keys):
        raise PixArtError(f"{path}: the decoder layout is neither ldm (decoder.up.N) nor diffusers "
                          "(decoder.up_blocks.N); this is not an SD/SDXL VAE.")
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    ups = {int(k.split(".")[2]) for k in keys if k.startswith("decoder.up.")}
    downs = {int(k.split(".")[2]) for k in keys if k.startswith("encoder.down.")}
    config = {"down_block_types": ["DownEncoderBlock2D"] * len(downs),
              "up_block_types": ["UpDecoderBlock2D"] * len(ups)}
    return convert_ldm_vae_checkpoint(state, config)


def _shape_config(state: dict) -> dict:
    """What the weights themselves say about the architecture (checked against nothing: sizes only)."""
    conv_in = state["decoder.conv_in.weight"]
    latent_channels = conv_in.shape[1]
    if latent_channels != 4:
        raise PixArtError(f"This VAE has {latent_channels} latent channels (SD3/Flux-style); PixArt needs the "
                          "4-channel SD VAE (α/δ) or SDXL VAE (Σ).")
    ups = sorted({int(k.split(".")[2]) for k in state if k.startswith("decoder.up_blocks.")})
    reversed_channels = [state[f"decoder.up_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in ups]
    resnets = {int(k.split(".")[4]) for k in state if k.startswith("decoder.up_blocks.0.resnets.")}
    return dict(
        latent_channels=latent_channels,
        out_channels=state["decoder.conv_out.weight"].shape[0],
        in_channels=state["encoder.conv_in.weight"].shape[1] if "encoder.conv_in.weight" in state else 3,
        block_out_channels=list(reversed(reversed_channels)),
        layers_per_block=len(resnets) - 1,
        down_block_types=["DownEncoderBlock2D"] * len(ups),
        up_block_types=["UpDecoderBlock2D"] * len(ups),
        use_quant_conv="quant_conv.weight" in state or not any(k.startswith("encoder.") for k in state),
        use_post_quant_conv="post_quant_conv.weight" in state,
        mid_block_add_attention=any(k.startswith("decoder.mid_block.attentions.") for k in state),
    )


def _build(config: dict, state: dict, path: str) -> AutoencoderKL:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

    known = set(inspect.signature(AutoencoderKL.__init__).parameters) - {"self"}
    try:
        with torch.device("meta"):
            model = AutoencoderKL(**{k: v for k, v in config.items() if k in known})
    except (ValueError, TypeError) as e:  # e.g. GroupNorm: channels not divisible by norm_num_groups
        raise PixArtError(f"{path}: its tensor shapes do not fit the SD/SDXL VAE settings ({e}). A non-standard VAE "
                          "needs its config.json: load it as a diffusers folder, or pass config_overrides (e.g. "
                          "norm_num_groups).") from e
    decoder_only = not any(k.startswith("encoder.") for k in state)
    expected = set(model.state_dict())
    if decoder_only:
        expected = {k for k in expected if not k.startswith(("encoder.", "quant_conv."))}
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - set(model.state_dict()))
    if missing or unexpected:
        detail = (f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})" if missing else "") + \
                 ("; " if missing and unexpected else "") + \
                 (f"{len(unexpected)} unknown tensors (e.g. {', '.join(unexpected[:3])})" if unexpected else "")
        raise PixArtError(f"{path} does not match an SD/SDXL AutoencoderKL: {detail}. The file is incomplete or a "
                          "different kind of VAE.")
    try:
        model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        raise PixArtError(f"{path}: tensor shapes do not match an SD/SDXL VAE ({str(e)[:300]}).") from e
    if decoder_only:
        model.encoder = None
        model.quant_conv = None
        log.info("VAE %s has no encoder: decode only.", path)
    return model
