"""Seam-free tiled VAE decode and encode: every tile is normalised with the same GroupNorm statistics.

Why tiles show seams elsewhere: a VAE has ~30 GroupNorms, and tiled decoders (diffusers' enable_tiling, ComfyUI's
VAEDecodeTiled) let each tile normalise with its own mean and variance, so neighbouring tiles get different tones;
blending only smears the step. Here the network is unrolled into a list of *steps*, each "GroupNorm + SiLU (optional),
nearest x2 upsample (optional), one convolution, residual (optional)" or a global attention. Between two GroupNorms a
step only needs a one-pixel halo, so a step can be run tile by tile over a whole feature map and give exactly what the
untiled network gives, provided the GroupNorm statistics are those of the whole map.

- exact: steps run one after another over whole feature maps (kept on the GPU when they fit, else parked in CPU RAM);
  each step is computed tile by tile and the statistics its output needs for the next GroupNorm are pooled over all
  tiles (Chan's parallel mean/variance, per channel, float64). Attention runs over the whole map in query strips. No
  overlap, no blending, no recomputation; equals the untiled network up to float rounding. Memory grows with the image.
- fast: the steps at latent resolution (conv_in, mid block with its attention, the first up block) still run exactly
  on the whole latent, except that the mid-block attention takes its keys and values from an evenly spaced subset of
  the latent's pixels once the latent has more than `Plan.attention_keys` of them (full attention over a 512x512
  latent is ~140 TFLOP; measured at 1024 px, fast mode's mean abs difference from the exact decode is 0.0103 with all
  keys, 0.0103 with 1/16 of them and 0.0104 with 1/64). The high-resolution steps get their GroupNorm statistics once,
  from an exact run on a reduced copy of their input, and then every output tile is computed independently through all
  of them from a slice of the input that covers its receptive field (each step crops the halo the remaining steps no
  longer need), and is cropped, not blended. Every tile uses the same statistics, so there are no seams; memory is set
  by the tile.

fp16 safety: every computed piece is checked; on NaN/Inf it is computed again in the fallback dtype (bf16 where
supported, else fp32) and the rest of the run continues in that dtype.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import PixArtError

log = logging.getLogger(__name__)

Region = tuple[int, int, int, int]  # y0, y1, x0, x1: half-open pixel ranges of one feature map
Size = tuple[int, int]
ProgressCallback = Callable[[int, int], None]  # (tiles done, tiles in total)


# ---------------------------------------------------------------------------------------------------------------------
# The network as a list of steps
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class ConvStep:
    """[GroupNorm + SiLU] -> [nearest x2] -> zero pad -> conv -> [+ shortcut(skip)] / out_scale.

    residual="keep": this step's input is kept as the skip of the next step (first half of a resnet);
    residual="add": the kept skip (through `shortcut` if given) is added to this step's output.
    """

    conv: nn.Conv2d
    norm: Optional[nn.GroupNorm] = None
    upsample: bool = False
    pad: tuple[int, int] = (1, 1)  # zeros before / after, on both axes (Downsample2D pads (0, 1))
    residual: str = ""
    shortcut: Optional[nn.Conv2d] = None
    out_scale: float = 1.0

    @property
    def kernel(self) -> int:
        return self.conv.kernel_size[0]

    @property
    def stride(self) -> int:
        return self.conv.stride[0]

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels

    def out_size(self, size: Size) -> Size:
        u = 2 if self.upsample else 1
        h, w = ((n * u + sum(self.pad) - self.kernel) // self.stride + 1 for n in size)
        return h, w

    def input_span(self, lo: int, hi: int, n_in: int) -> tuple[int, int, int, int]:
        """Pixels [lo, hi) of one output axis need input pixels [s0, s1) (pre-upsample), and the upsampled/padded
        span [e0, e1) of which [c0, c1) lies inside the map: returns (s0, s1, e0, e1) with c = clip(e)."""
        u = 2 if self.upsample else 1
        e0 = lo * self.stride - self.pad[0]
        e1 = (hi - 1) * self.stride - self.pad[0] + self.kernel
        c0, c1 = max(e0, 0), min(e1, n_in * u)
        return c0 // u, -(-c1 // u), e0, e1

    def input_region(self, out: Region, in_size: Size) -> Region:
        y0, y1, _, _ = self.input_span(out[0], out[1], in_size[0])
        x0, x1, _, _ = self.input_span(out[2], out[3], in_size[1])
        return (y0, y1, x0, x1)


@dataclass(eq=False)
class AttentionStep:
    """The VAE mid-block self-attention (GroupNorm inside): global, so only run over a whole map."""

    attn: nn.Module

    @property
    def norm(self) -> nn.GroupNorm:
        return self.attn.group_norm

    @property
    def out_channels(self) -> int:
        return self.attn.to_out[0].out_features

    def out_size(self, size: Size) -> Size:
        return size


Step = ConvStep | AttentionStep


def _resnet_steps(block: nn.Module) -> list[ConvStep]:
    if getattr(block, "time_emb_proj", None) is not None or block.upsample is not None or block.downsample is not None:
        raise PixArtError("This VAE has a resnet block with time embedding or resampling; only SD/SDXL-style "
                          "AutoencoderKL VAEs are supported.")
    return [
        ConvStep(block.conv1, norm=block.norm1, residual="keep"),
        ConvStep(block.conv2, norm=block.norm2, residual="add", shortcut=block.conv_shortcut,
                 out_scale=float(block.output_scale_factor)),
    ]


def _mid_steps(mid: nn.Module) -> list[Step]:
    steps: list[Step] = list(_resnet_steps(mid.resnets[0]))
    for attn, resnet in zip(mid.attentions, mid.resnets[1:]):
        if attn is not None:
            steps.append(AttentionStep(attn))
        steps += _resnet_steps(resnet)
    return steps


def decoder_steps(vae: nn.Module) -> list[Step]:
    """diffusers AutoencoderKL's post_quant_conv -> conv_in -> mid block -> up blocks -> norm_out/SiLU/conv_out."""
    dec = vae.decoder
    steps: list[Step] = []
    if vae.post_quant_conv is not None:
        steps.append(ConvStep(vae.post_quant_conv, pad=(0, 0)))
    steps.append(ConvStep(dec.conv_in))
    steps += _mid_steps(dec.mid_block)
    for block in dec.up_blocks:
        for resnet in block.resnets:
            steps += _resnet_steps(resnet)
        for up in block.upsamplers or []:
            steps.append(ConvStep(up.conv, upsample=True))
    steps.append(ConvStep(dec.conv_out, norm=dec.conv_norm_out))
    return steps


def encoder_steps(vae: nn.Module) -> list[Step]:
    """diffusers AutoencoderKL's conv_in -> down blocks -> mid block -> norm_out/SiLU/conv_out -> quant_conv."""
    enc = vae.encoder
    steps: list[Step] = [ConvStep(enc.conv_in)]
    for block in enc.down_blocks:
        for resnet in block.resnets:
            steps += _resnet_steps(resnet)
        for down in block.downsamplers or []:
            steps.append(ConvStep(down.conv, pad=(0, 1) if down.padding == 0 else (down.padding, down.padding)))
    steps += _mid_steps(enc.mid_block)
    steps.append(ConvStep(enc.conv_out, norm=enc.conv_norm_out))
    if vae.quant_conv is not None:
        steps.append(ConvStep(vae.quant_conv, pad=(0, 0)))
    return steps


def step_sizes(steps: list[Step], size: Size) -> list[Size]:
    """Map sizes: sizes[i] is step i's input, sizes[-1] the final output."""
    sizes = [size]
    for step in steps:
        sizes.append(step.out_size(sizes[-1]))
    return sizes


def split_at_latent(steps: list[Step], size: Size, latent: Size) -> int:
    """Index separating the steps whose output is at latent resolution from the high-resolution ones.

    Decoder: steps[:i] run at latent size (conv_in, mid, first up block), steps[i:] upsample.
    Encoder: steps[:i] take inputs above latent size (conv_in, down blocks), steps[i:] run at latent size.
    """
    sizes = step_sizes(steps, size)
    at_latent = [s == latent for s in sizes[1:]]
    if at_latent[0]:  # decoder: latent prefix
        return at_latent.index(False) if False in at_latent else len(steps)
    return at_latent.index(True) + 1  # encoder: up to and including the step that reaches latent size


# ---------------------------------------------------------------------------------------------------------------------
# GroupNorm statistics
# ---------------------------------------------------------------------------------------------------------------------


class Moments:
    """Per-sample, per-channel count / mean / sum of squared deviations, pooled over tiles with Chan's parallel
    algorithm in float64: the exact moments of the union of the tiles, between-tile term included (not an average of
    per-tile variances)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: Optional[torch.Tensor] = None  # (B, C) float64, CPU
        self.m2: Optional[torch.Tensor] = None

    def add(self, t: torch.Tensor) -> bool:
        """Pool a tile's moments; returns False (and pools nothing) if the tile holds NaN/Inf."""
        n = t.shape[2] * t.shape[3]
        if n == 0:
            return True
        t = t if t.dtype == torch.float32 else t.float()
        # two passes (mean, then squared deviations): accurate like var_mean, twice as fast on CPU (var_mean's
        # Welford reduction runs on one thread)
        mean = t.mean((2, 3), keepdim=True)
        m2 = torch.linalg.vector_norm(t - mean, dim=(2, 3)).square()
        mean, m2 = mean[:, :, 0, 0].cpu().double(), m2.cpu().double()
        if not (torch.isfinite(mean).all() and torch.isfinite(m2).all()):
            return False
        if self.count == 0:
            self.count, self.mean, self.m2 = n, mean, m2
            return True
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * n / total)
        self.count = total
        return True

    def group_stats(self, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, biased variance), each (B, groups), over channel groups as GroupNorm forms them."""
        b, c = self.mean.shape
        mean = self.mean.view(b, groups, c // groups)
        m2 = self.m2.view(b, groups, c // groups)
        group_mean = mean.mean(-1)
        group_m2 = m2.sum(-1) + self.count * (mean - group_mean[..., None]).square().sum(-1)
        return group_mean, group_m2 / (self.count * (c // groups))


StatsTable = dict  # GroupNorm module -> (mean, var), each (B, groups) float64


def norm_affine(norm: nn.GroupNorm, stats: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Per-channel (mean, scale, bias), (B, C, 1, 1) float64: GroupNorm(x) = (x - mean) * scale + bias."""
    mean, var = stats
    per_group = norm.num_channels // norm.num_groups
    mean_c = mean.repeat_interleave(per_group, dim=1)[..., None, None]
    scale = (var + norm.eps).rsqrt().repeat_interleave(per_group, dim=1)[..., None, None]
    bias = torch.zeros_like(mean_c)
    if norm.affine:
        scale = scale * norm.weight.detach().double().cpu()[None, :, None, None]
        bias = bias + norm.bias.detach().double().cpu()[None, :, None, None]
    return mean_c, scale, bias


# ---------------------------------------------------------------------------------------------------------------------
# Geometry and memory arithmetic
# ---------------------------------------------------------------------------------------------------------------------


def key_stride(size: Size, max_keys: int) -> int:
    """Subsampling stride of the attention keys so that at most max_keys pixels remain (0: no limit). The keys
    start at offset stride // 2, so a map thinner than that keeps a larger stride from leaving no key at all."""
    if max_keys <= 0 or size[0] * size[1] <= max_keys:
        return 1
    widest = 2 * min(size) - 1
    stride = min(math.ceil(math.sqrt(size[0] * size[1] / max_keys)), widest)
    while stride < widest and math.prod(len(range(stride // 2, n, stride)) for n in size) > max_keys:
        stride += 1  # the square-root guess can keep a row or column too many
    return stride


def tile_grid(size: Size, side: int) -> list[Region]:
    side = max(1, side)
    return [(y, min(y + side, size[0]), x, min(x + side, size[1]))
            for y in range(0, size[0], side) for x in range(0, size[1], side)]


def stage_side(tile: int, size: Size, latent: Size) -> int:
    """A tile of `tile` latent pixels in pixels of a map of `size` (its scale relative to the latent)."""
    return max(1, round(tile * size[0] / latent[0]))


def pixel_bytes(step: Step, in_channels: int, elem: int) -> float:
    """Working bytes per output pixel while one tile of this step is computed (input slice, normalised, upsampled and
    padded copies, output, shortcut)."""
    if isinstance(step, AttentionStep):
        return elem * step.out_channels * 6.0  # normalised strip, q, attention output, projection, residual, copy
    s2 = step.stride ** 2
    per_in = in_channels * s2 / (4 if step.upsample else 1)
    temps = per_in * (2 if step.norm is not None else 1) + in_channels * s2 * (3 if step.upsample else 1)
    return elem * (temps + step.out_channels * (3 if step.shortcut is not None else 2))


def exact_tiles(step: Step, in_channels: int, out_size: Size, work_bytes: int, elem: int) -> list[Region]:
    """Tiles of one exact step: as large as `work_bytes` allows; full-width row strips when a strip of at least 8
    rows fits (contiguous memory, halo only above and below), else squares."""
    area = max(64, int(work_bytes / pixel_bytes(step, in_channels, elem)))
    h, w = out_size
    if isinstance(step, AttentionStep) or area >= 8 * w:
        rows = max(1, min(h, area // w))
        return [(r, min(r + rows, h), 0, w) for r in range(0, h, rows)]
    return tile_grid(out_size, int(math.sqrt(area)))


def _writes_over_input(step: Step, tiles: list[Region], in_shape: tuple, out_shape: tuple) -> bool:
    """A resnet's second convolution may overwrite its own input strip by strip (top to bottom, keeping the rows
    the next strip still needs): that saves a whole map. Needs full-width strips and an output shaped as the input."""
    return (isinstance(step, ConvStep) and step.residual == "add" and step.stride == 1 and not step.upsample
            and in_shape == out_shape and all(r[2] == 0 and r[3] == out_shape[3] for r in tiles))


def exact_units(steps: list[Step], size: Size, in_channels: int, work_bytes: int, elem: int) -> int:
    """Progress ticks of an exact run: one per tile of every step (attention: K/V strips and query strips)."""
    n, channels = 0, in_channels
    for step, (_, out) in zip(steps, zip(step_sizes(steps, size), step_sizes(steps, size)[1:])):
        tiles = len(exact_tiles(step, channels, out, work_bytes, elem))
        n += 2 * tiles if isinstance(step, AttentionStep) else tiles
        channels = step.out_channels
    return n


def exact_peak_bytes(steps: list[Step], size: Size, in_channels: int, elem: int, work_bytes: int) -> int:
    """Upper estimate of what an exact run keeps alive: the parked maps (input, skip, output; K and V for attention)
    plus one tile's work (x1.5 for convolution workspace)."""
    sizes = step_sizes(steps, size)
    channels, skip, peak = in_channels, 0, 0
    for i, step in enumerate(steps):
        (h, w), (ho, wo) = sizes[i], sizes[i + 1]
        cur = channels * h * w
        out = step.out_channels * ho * wo
        if isinstance(step, AttentionStep):
            live = cur * 3
        else:
            tiles = exact_tiles(step, channels, (ho, wo), work_bytes, elem)
            in_place = _writes_over_input(step, tiles, (1, channels, h, w), (1, step.out_channels, ho, wo)) or (
                step.residual == "add" and skip == out)
            live = cur + skip + (0 if in_place else out)
        peak = max(peak, live)
        if isinstance(step, ConvStep) and step.residual:
            skip = cur if step.residual == "keep" else 0
        channels = step.out_channels
    return peak * elem + work_bytes * 3 // 2


def whole_peak_bytes(steps: list[Step], size: Size, in_channels: int, elem: int) -> int:
    """Upper estimate for the untiled network: four maps of the largest step (its input, the normalised input, its
    output and the skip; measured on the full SD VAE decoder at 512 px: 3.3 such maps in bf16, 2.9 in fp32)."""
    sizes = step_sizes(steps, size)
    channels, largest = in_channels, 0
    for i, step in enumerate(steps):
        (h, w), (ho, wo) = sizes[i], sizes[i + 1]
        largest = max(largest, channels * h * w, step.out_channels * ho * wo)
        channels = step.out_channels
    return 4 * largest * elem


def tile_regions(steps: list[Step], sizes: list[Size], out: Region) -> list[Region]:
    """Backward plan for one independent output tile: regions[i] is the part of step i's input map the tile needs (its
    receptive field through the remaining steps, clipped to the map); regions[-1] is the tile itself."""
    regions: list[Optional[Region]] = [None] * len(steps) + [out]
    pending: Optional[Region] = None  # an "add" step's output region, which its skip must cover
    for i in range(len(steps) - 1, -1, -1):
        step = steps[i]
        if isinstance(step, AttentionStep):
            raise PixArtError("internal: attention cannot run on an independent tile")
        region = step.input_region(regions[i + 1], sizes[i])
        if step.residual == "keep" and pending is not None:
            region = (min(region[0], pending[0]), max(region[1], pending[1]),
                      min(region[2], pending[2]), max(region[3], pending[3]))
            pending = None
        if step.residual == "add":
            pending = regions[i + 1]
        regions[i] = region
    return regions  # type: ignore[return-value]


def fast_tile_bytes(steps: list[Step], sizes: list[Size], in_channels: int, out_side: int, elem: int) -> int:
    """Working set of one independent tile (an interior one, the largest) at its worst step."""
    final = sizes[-1]
    side = min(out_side, final[0]), min(out_side, final[1])
    y0, x0 = (final[0] - side[0]) // 2, (final[1] - side[1]) // 2
    regions = tile_regions(steps, sizes, (y0, y0 + side[0], x0, x0 + side[1]))
    channels, skip, peak = in_channels, 0, 0
    for i, step in enumerate(steps):
        r, ro = regions[i], regions[i + 1]
        cur = channels * (r[1] - r[0]) * (r[3] - r[2])
        out_px = (ro[1] - ro[0]) * (ro[3] - ro[2])
        peak = max(peak, cur + skip + out_px * pixel_bytes(step, channels, 1))
        skip = cur if step.residual == "keep" else (0 if step.residual == "add" else skip)
        channels = step.out_channels
    return int(peak * elem)


def reduced_size(size: Size, area: int, multiple: int = 1) -> Size:
    """A size with the aspect of `size`, about `area` pixels, a multiple of `multiple`, never larger than size."""
    factor = math.sqrt(size[0] * size[1] / max(1, area))
    if factor <= 1:
        return size
    return tuple(max(multiple, round(n / factor / multiple) * multiple) for n in size)  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------------------------
# The runner
# ---------------------------------------------------------------------------------------------------------------------


class TileRunner:
    """Runs steps over feature maps: owns the compute and parking devices, the working dtype (and its escalation on
    NaN/Inf), progress reporting and cancellation."""

    def __init__(self, device: torch.device, park_device: torch.device, dtype: torch.dtype,
                 fallback_dtype: torch.dtype, callback: Optional[ProgressCallback] = None,
                 interrupt: Optional[Callable[[], None]] = None, total: int = 0,
                 channels_last: bool = False) -> None:
        self.device, self.park = device, park_device
        self.dtype, self.fallback_dtype = dtype, fallback_dtype
        # channels-last maps (and weights) throughout: oneDNN's CPU convolutions are ~2x faster on them in bf16
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.callback, self.interrupt = callback, interrupt
        self.done, self.total = 0, total
        self._cast: dict[tuple[int, torch.dtype], torch.Tensor] = {}

    @property
    def elem(self) -> int:
        return torch.finfo(self.dtype).bits // 8

    # -- bookkeeping ---------------------------------------------------------------------------------------------------

    def check_interrupt(self) -> None:
        if self.interrupt is not None:
            self.interrupt()

    def tick(self) -> None:
        self.done += 1
        if self.callback is not None:
            self.callback(min(self.done, self.total), self.total)

    def param(self, p: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """A weight in the working dtype (copies for the fallback dtype are cached for this run; the layout is the
        module's own, which the caller chose to match the maps)."""
        if p is None or p.dtype == self.dtype:
            return p
        key = (id(p), self.dtype)
        if key not in self._cast:
            self._cast[key] = p.detach().to(self.dtype)
        return self._cast[key]

    def new_map(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.empty(shape, device=self.park, dtype=self.dtype, memory_format=self.memory_format)

    def escalate(self, where: str) -> None:
        """A piece came out NaN/Inf: continue in the fallback dtype, or fail if there is nothing wider to go to."""
        if self.dtype in (self.fallback_dtype, torch.float32, torch.float64):
            raise PixArtError(f"The VAE produced NaN/Inf in {where} even in {self.dtype}. The VAE file is probably "
                              "damaged, or the latents are far outside the range this VAE was trained on.")
        log.warning("VAE: %s overflowed in %s; redoing it in %s and continuing in %s.", where, self.dtype,
                    self.fallback_dtype, self.fallback_dtype)
        self.dtype = self.fallback_dtype

    def _affine(self, step: Step, stats) -> Optional[tuple[torch.Tensor, ...]]:
        return norm_affine(step.norm, stats) if step.norm is not None else None

    def _normalise(self, t: torch.Tensor, affine, act: bool = True) -> torch.Tensor:
        """GroupNorm with fixed statistics (a new tensor), then SiLU unless act=False (the attention's norm)."""
        mean, scale, bias = affine
        if self.dtype == torch.float32:  # one fused pass: x * scale + (bias - mean * scale)
            t = torch.addcmul((bias - mean * scale).to(self.device, self.dtype), t, scale.to(self.device, self.dtype))
        else:  # subtract first: half precision loses x * scale against a large mean * scale
            t = (t - mean.to(self.device, self.dtype)).mul_(scale.to(self.device, self.dtype))
            t = t.add_(bias.to(self.device, self.dtype))
        return F.silu(t, inplace=True) if act else t

    # -- one step over one region ------------------------------------------------------------------------------------

    def conv(self, step: ConvStep, x: torch.Tensor, origin: tuple[int, int], in_size: Size, out: Region,
             affine, skip: Optional[tuple[torch.Tensor, tuple[int, int]]]) -> torch.Tensor:
        """step's output over region `out`, from x which holds the input map's pixels starting at `origin`; zero
        padding only where the map itself ends."""
        sy0, sy1, ey0, ey1 = step.input_span(out[0], out[1], in_size[0])
        sx0, sx1, ex0, ex1 = step.input_span(out[2], out[3], in_size[1])
        ty0, tx0 = sy0 - origin[0], sx0 - origin[1]
        if ty0 < 0 or tx0 < 0 or sy1 - origin[0] > x.shape[2] or sx1 - origin[1] > x.shape[3]:
            raise PixArtError("internal: tile input outside the held region")
        t = x[:, :, ty0:ty0 + sy1 - sy0, tx0:tx0 + sx1 - sx0].to(self.device, self.dtype)
        if affine is not None:
            t = self._normalise(t, affine)
        u = 2 if step.upsample else 1
        cy0, cy1 = max(ey0, 0), min(ey1, in_size[0] * u)
        cx0, cx1 = max(ex0, 0), min(ex1, in_size[1] * u)
        if u > 1:
            t = F.interpolate(t, scale_factor=2.0, mode="nearest")
            t = t[:, :, cy0 - sy0 * 2:cy1 - sy0 * 2, cx0 - sx0 * 2:cx1 - sx0 * 2]
        pads = (cx0 - ex0, ex1 - cx1, cy0 - ey0, ey1 - cy1)  # left, right, top, bottom
        padding = max(pads)
        if step.stride != 1 and len(set(pads)) > 1:
            t, padding = F.pad(t, pads), 0
        y = F.conv2d(t, self.param(step.conv.weight), self.param(step.conv.bias), stride=step.stride,
                     padding=padding)
        del t
        if padding and len(set(pads)) > 1:
            # the convolution padded every side evenly (cheaper than copying the input into a padded tensor); drop
            # the output rows/columns that saw padding where the held input has real pixels
            crop = [padding - p for p in pads]
            y = y[:, :, crop[2]:y.shape[2] - crop[3], crop[0]:y.shape[3] - crop[1]]
        if step.residual == "add":
            s, s_origin = skip
            s = s[:, :, out[0] - s_origin[0]:out[1] - s_origin[0], out[2] - s_origin[1]:out[3] - s_origin[1]]
            s = s.to(self.device, self.dtype)
            if step.shortcut is not None:
                s = F.conv2d(s, self.param(step.shortcut.weight), self.param(step.shortcut.bias))
            y = y.add_(s)
            if step.out_scale != 1.0:
                y = y.div_(step.out_scale)
        return y

    # -- exact: whole maps, step by step -----------------------------------------------------------------------------

    def run_exact(self, steps: list[Step], x: torch.Tensor, work_bytes: int,
                  record: Optional[StatsTable] = None, attention_keys: int = 0) -> torch.Tensor:
        """Run steps over the whole map x (which may be overwritten). Each step is computed tile by tile (tiles as
        large as `work_bytes` allows), pooling its output's statistics over all tiles, before the next step starts.
        `record` receives the statistics each GroupNorm used. attention_keys: at most this many key pixels in
        the global attention (0: all; fast mode's bound, see _attention_exact)."""
        x = x.to(self.park, self.dtype).contiguous(memory_format=self.memory_format)
        moments = Moments()
        if steps and steps[0].norm is not None and not moments.add(x):
            raise PixArtError("The VAE input contains NaN or Inf.")
        skip: Optional[torch.Tensor] = None
        for step in steps:
            stats = moments.group_stats(step.norm.num_groups) if step.norm is not None else None
            if record is not None and step.norm is not None:
                record[step.norm] = stats
            if isinstance(step, AttentionStep):
                x, moments = self._attention_exact(step, x, stats, work_bytes, attention_keys)
                continue
            affine = self._affine(step, stats)
            in_size = (x.shape[2], x.shape[3])
            out_size = step.out_size(in_size)
            out_shape = (x.shape[0], step.out_channels, *out_size)
            tiles = exact_tiles(step, x.shape[1], out_size, work_bytes, self.elem)
            over_input = _writes_over_input(step, tiles, tuple(x.shape), out_shape)
            over_skip = not over_input and step.residual == "add" and tuple(skip.shape) == out_shape
            out = x if over_input else skip if over_skip else self.new_map(out_shape)
            moments = Moments()
            saved: Optional[torch.Tensor] = None  # input rows above the current strip, already overwritten
            for region in tiles:
                self.check_interrupt()
                for attempt in range(2):
                    held, origin = x, (0, 0)
                    if over_input and saved is not None:
                        held = torch.cat([saved, x[:, :, region[0]:region[1] + step.pad[1]]], dim=2)
                        origin = (region[0] - saved.shape[2], 0)
                    y = self.conv(step, held, origin, in_size, region, affine, (skip, (0, 0)))
                    if moments.add(y):
                        break
                    if attempt:
                        self.escalate("a VAE tile")  # raises: already in the widest dtype
                    self.escalate("a VAE tile")  # redo this tile; the parked maps move to the wider dtype
                    x = x.to(self.dtype)
                    skip = skip.to(self.dtype) if skip is not None else None
                    saved = saved.to(self.dtype) if saved is not None else None
                    out = x if over_input else skip if over_skip else out.to(self.dtype)
                if over_input:
                    saved = x[:, :, region[1] - step.pad[0]:region[1]].clone()
                out[:, :, region[0]:region[1], region[2]:region[3]] = y.to(self.park)
                del y
                self.tick()
            if step.residual == "keep":
                skip = x
            elif step.residual == "add":
                skip = None
            x = out
        return x

    def _attention_exact(self, step: AttentionStep, x: torch.Tensor, stats, work_bytes: int,
                         attention_keys: int = 0) -> tuple[torch.Tensor, Moments]:
        """Global self-attention over the whole map: K and V first, then the queries strip by strip. Each output
        strip overwrites its own rows of x, which is safe once K and V exist (the residual is pointwise).

        K and V come from every pixel, or with attention_keys > 0 and a larger map, from every s-th pixel of every
        s-th row (s = key_stride): the softmax-weighted mean over a uniform subsample of the keys estimates the one
        over all of them, at 1/s^2 of the cost. A 4096 px image has a 512x512 latent, whose full attention alone is
        ~140 TFLOP (tens of minutes on a CPU)."""
        attn, p = step.attn, self.param
        b, c, h, w = x.shape
        affine = self._affine(step, stats)
        strips = exact_tiles(step, c, (h, w), work_bytes, self.elem)
        heads, inner = attn.heads, attn.to_k.out_features
        s = key_stride((h, w), attention_keys)
        first = s // 2  # centred in each s x s cell
        key_rows, key_cols = len(range(first, h, s)), len(range(first, w, s))

        def project(source: torch.Tensor, r0: int, r1: int, linear: nn.Linear) -> torch.Tensor:
            t = self._normalise(source[:, :, r0:r1].to(self.device, self.dtype), affine, act=False)
            return F.linear(t.flatten(2).transpose(1, 2), p(linear.weight), p(linear.bias))

        while True:
            sampled = x[:, :, first::s, first::s] if s > 1 else x
            keys = torch.empty(b, key_rows * key_cols, inner, device=self.device, dtype=self.dtype)
            values = torch.empty_like(keys)
            for r0, r1, _, _ in strips:
                k0, k1 = -(-(r0 - first) // s), -(-(r1 - first) // s)  # the key rows inside this strip
                if k1 > k0:
                    keys[:, k0 * key_cols:k1 * key_cols] = project(sampled, k0, k1, attn.to_k)
                    values[:, k0 * key_cols:k1 * key_cols] = project(sampled, k0, k1, attn.to_v)
                self.tick()
            if torch.isfinite(keys).all() and torch.isfinite(values).all():
                break
            self.escalate("the mid-block attention")
            x = x.to(self.dtype)

        moments = Moments()
        for r0, r1, _, _ in strips:
            self.check_interrupt()
            while True:
                k = keys.to(self.dtype).view(b, -1, heads, inner // heads).transpose(1, 2)
                v = values.to(self.dtype).view(b, -1, heads, inner // heads).transpose(1, 2)
                q = project(x, r0, r1, attn.to_q).view(b, -1, heads, inner // heads).transpose(1, 2)
                o = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
                o = F.linear(o.transpose(1, 2).reshape(b, -1, inner), p(attn.to_out[0].weight),
                             p(attn.to_out[0].bias))
                o = o.transpose(1, 2).reshape(b, c, r1 - r0, w)
                if attn.residual_connection:
                    o = o + x[:, :, r0:r1].to(self.device, self.dtype)
                if attn.rescale_output_factor != 1.0:
                    o = o / attn.rescale_output_factor
                if moments.add(o):
                    break
                self.escalate("the mid-block attention")
                x = x.to(self.dtype)
            x[:, :, r0:r1] = o.to(self.park)
            del o, q, k, v
            self.tick()
        return x, moments

    # -- fast: independent tiles with fixed statistics ---------------------------------------------------------------

    def run_tile(self, steps: list[ConvStep], src: torch.Tensor, sizes: list[Size], out: Region,
                 table: StatsTable) -> torch.Tensor:
        """One output tile through all steps from the slice of src (the whole input map) that it needs; each step
        computes only what the remaining steps need. GroupNorm statistics come from `table`."""
        regions = tile_regions(steps, sizes, out)
        affines = [self._affine(s, table[s.norm]) if s.norm is not None else None for s in steps]
        while True:
            r = regions[0]
            x = src[:, :, r[0]:r[1], r[2]:r[3]]
            skip = None
            for i, step in enumerate(steps):
                origin = (regions[i][0], regions[i][2])
                y = self.conv(step, x, origin, sizes[i], regions[i + 1], affines[i], skip)
                if step.residual == "keep":
                    skip = (x, origin)
                elif step.residual == "add":
                    skip = None
                x = y
            # NaN/Inf anywhere in the chain reaches the output (convolutions spread it), so one check suffices
            if torch.isfinite(x.sum(dtype=torch.float32)):
                return x
            self.escalate("a VAE tile")


def fallback_dtype_for(device: torch.device) -> torch.dtype:
    """bf16 keeps fp32's range; use it where it is fast (CUDA with bf16 support), else fp32."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


# ---------------------------------------------------------------------------------------------------------------------
# Whole networks: exact and fast
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """How to run a network: mode "exact" (tiles of every step sized by work_bytes) or "fast" (independent tiles of
    `tile` latent pixels; the exact parts and the statistics pass also use work_bytes)."""

    mode: str
    work_bytes: int
    tile: int = 0
    stats_area: int = 0  # fast: latent pixels seen by the statistics pass (0: a quarter of the latent, <= 4 tiles)
    attention_keys: int = 0  # fast: key pixels of the mid-block attention, at most (0: all)


@dataclass
class FastParts:
    pre: list[Step]  # exact, at latent resolution, before the tiled steps (decoder: conv_in, mid, first up block)
    tiled: list[ConvStep]  # the high-resolution steps, run as independent tiles
    post: list[Step]  # exact, at latent resolution, after the tiled steps (encoder: last down block, mid, conv_out)
    tiled_in: Size  # input size of the tiled steps
    sizes: list[Size]  # map sizes through the tiled steps
    grid: list[Region]  # output tiles of the tiled steps
    stride: int  # decoder: the statistics pass sees every stride-th pixel of the tiled steps' input
    reduced: Size  # its input size


def fast_parts(steps: list[Step], size: Size, latent: Size, tile: int, stats_area: int = 0) -> FastParts:
    """Split a network for fast mode and size its statistics pass: `stats_area` latent pixels, by default about a
    quarter of the latent area and at most four tiles' worth (so it costs at most ~25% more, usually much less)."""
    split = split_at_latent(steps, size, latent)
    sizes_all = step_sizes(steps, size)
    area = min(latent[0] * latent[1] / 4, stats_area or 4 * tile * tile)
    if sizes_all[1] == latent:  # decoder
        pre, tiled, post, tiled_in = steps[:split], steps[split:], [], sizes_all[split]
        stride = max(2, math.ceil(math.sqrt(latent[0] * latent[1] / area)))
        reduced = (len(range(stride // 2, tiled_in[0], stride)), len(range(stride // 2, tiled_in[1], stride)))
    else:  # encoder: the input is an image, downsampled by area averaging
        pre, tiled, post, tiled_in, stride = [], steps[:split], steps[split:], size, 1
        multiple = size[0] // latent[0]
        reduced = reduced_size(size, int(area) * multiple * multiple, multiple)
    sizes = step_sizes(tiled, tiled_in)
    grid = tile_grid(sizes[-1], stage_side(tile, sizes[-1], latent))
    return FastParts(pre, tiled, post, tiled_in, sizes, grid, stride, reduced)


def fast_peak_bytes(steps: list[Step], size: Size, channels: int, latent: Size, plan: Plan, elem: int,
                    floor: bool = True) -> int:
    """Estimated peak of a fast run: the exact latent-resolution part (its floor: no tile size changes it; left out
    with floor=False), or the parked input of the tiled steps plus one tile's work (x1.5 for convolution workspace)
    or plus the statistics pass."""
    parts = fast_parts(steps, size, latent, plan.tile, plan.stats_area)
    tiled_channels = parts.pre[-1].out_channels if parts.pre else channels
    pre = exact_peak_bytes(parts.pre, size, channels, elem, plan.work_bytes) if parts.pre and floor else 0
    src = tiled_channels * parts.tiled_in[0] * parts.tiled_in[1] * elem
    side = stage_side(plan.tile, parts.sizes[-1], latent)
    work = fast_tile_bytes(parts.tiled, parts.sizes, tiled_channels, side, elem) * 3 // 2
    stats_pass = exact_peak_bytes(parts.tiled, parts.reduced, tiled_channels, elem, plan.work_bytes)
    post = 0
    if parts.post:
        post = exact_peak_bytes(parts.post, parts.sizes[-1], parts.tiled[-1].out_channels, elem, plan.work_bytes)
    return max(pre, src + work, src + stats_pass, post)


def count_units(steps: list[Step], size: Size, channels: int, latent: Size, plan: Plan, elem: int) -> int:
    """Progress ticks of one sample."""
    if plan.mode == "exact":
        return exact_units(steps, size, channels, plan.work_bytes, elem)
    parts = fast_parts(steps, size, latent, plan.tile, plan.stats_area)
    tiled_channels = parts.pre[-1].out_channels if parts.pre else channels
    n = exact_units(parts.pre, size, channels, plan.work_bytes, elem) if parts.pre else 0
    n += exact_units(parts.tiled, parts.reduced, tiled_channels, plan.work_bytes, elem) + len(parts.grid)
    if parts.post:
        n += exact_units(parts.post, parts.sizes[-1], parts.tiled[-1].out_channels, plan.work_bytes, elem)
    return n


def run_fast(runner: TileRunner, steps: list[Step], x: torch.Tensor, latent: Size, plan: Plan) -> torch.Tensor:
    """Fast mode for one sample (see the module docstring)."""
    parts = fast_parts(steps, (x.shape[2], x.shape[3]), latent, plan.tile, plan.stats_area)
    if parts.pre:
        src = runner.run_exact(parts.pre, x, plan.work_bytes, attention_keys=plan.attention_keys)
    else:
        src = x.to(runner.park, runner.dtype).contiguous(memory_format=runner.memory_format)
    # GroupNorm statistics of the tiled steps from an exact run over a reduced copy of their input. Feature maps are
    # subsampled (every stride-th pixel keeps the per-pixel distribution; averaging would shrink the variance and
    # measured worse); images are area-downsampled (a smaller picture is still a picture).
    if parts.stride > 1:
        s0 = parts.stride // 2
        small = src[:, :, s0::parts.stride, s0::parts.stride].clone()
    elif parts.reduced != parts.tiled_in:
        small = F.interpolate(src.float(), size=parts.reduced, mode="area")
    else:
        small = src.clone()
    table: StatsTable = {}
    runner.run_exact(parts.tiled, small, plan.work_bytes, record=table)
    del small
    out = torch.empty(x.shape[0], parts.tiled[-1].out_channels, *parts.sizes[-1], device=runner.park,
                      dtype=torch.float32)
    for region in parts.grid:
        runner.check_interrupt()
        y = runner.run_tile(parts.tiled, src, parts.sizes, region, table)
        out[:, :, region[0]:region[1], region[2]:region[3]] = y.to(runner.park, torch.float32)
        del y
        runner.tick()
    del src
    if parts.post:
        out = runner.run_exact(parts.post, out, plan.work_bytes, attention_keys=plan.attention_keys)
    return out
