"""Resolution binning: snap a requested size to the aspect-ratio bins the model was trained on, and back.

PixArt models were trained on a fixed set of sizes per aspect ratio ("bins"). The reference pipelines generate at the
bin closest in aspect ratio to the request, take the micro-conditions (resolution, aspect ratio) from that binned size,
then resize (bilinear) and center-crop the decoded image back to the requested size.

The tables are a copy of diffusers' `ASPECT_RATIO_{256,512,1024}_BIN` (pipeline_pixart_alpha.py) and
`ASPECT_RATIO_2048_BIN` (pipeline_pixart_sigma.py), values [height, width] in pixels, in the same key order (ties
resolve to the first key, as in diffusers). The core keeps its own copy so it never imports diffusers pipelines at
run time; tests check the copy equals diffusers'.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import PixArtError

ASPECT_RATIO_1024_BIN: dict[str, tuple[int, int]] = {
    "0.25": (512, 2048), "0.28": (512, 1856), "0.32": (576, 1792), "0.33": (576, 1728), "0.35": (576, 1664),
    "0.4": (640, 1600), "0.42": (640, 1536), "0.48": (704, 1472), "0.5": (704, 1408), "0.52": (704, 1344),
    "0.57": (768, 1344), "0.6": (768, 1280), "0.68": (832, 1216), "0.72": (832, 1152), "0.78": (896, 1152),
    "0.82": (896, 1088), "0.88": (960, 1088), "0.94": (960, 1024), "1.0": (1024, 1024), "1.07": (1024, 960),
    "1.13": (1088, 960), "1.21": (1088, 896), "1.29": (1152, 896), "1.38": (1152, 832), "1.46": (1216, 832),
    "1.67": (1280, 768), "1.75": (1344, 768), "2.0": (1408, 704), "2.09": (1472, 704), "2.4": (1536, 640),
    "2.5": (1600, 640), "3.0": (1728, 576), "4.0": (2048, 512),
}

# diffusers' 512 and 256 tables are the 1024 table halved and quartered, key for key (tests compare all three)
ASPECT_RATIO_512_BIN = {k: (h // 2, w // 2) for k, (h, w) in ASPECT_RATIO_1024_BIN.items()}
ASPECT_RATIO_256_BIN = {k: (h // 4, w // 4) for k, (h, w) in ASPECT_RATIO_1024_BIN.items()}

ASPECT_RATIO_2048_BIN: dict[str, tuple[int, int]] = {
    "0.25": (1024, 4096), "0.26": (1024, 3968), "0.27": (1024, 3840), "0.28": (1024, 3712), "0.32": (1152, 3584),
    "0.33": (1152, 3456), "0.35": (1152, 3328), "0.4": (1280, 3200), "0.42": (1280, 3072), "0.48": (1408, 2944),
    "0.5": (1408, 2816), "0.52": (1408, 2688), "0.57": (1536, 2688), "0.6": (1536, 2560), "0.68": (1664, 2432),
    "0.72": (1664, 2304), "0.78": (1792, 2304), "0.82": (1792, 2176), "0.88": (1920, 2176), "0.94": (1920, 2048),
    "1.0": (2048, 2048), "1.07": (2048, 1920), "1.13": (2176, 1920), "1.21": (2176, 1792), "1.29": (2304, 1792),
    "1.38": (2304, 1664), "1.46": (2432, 1664), "1.67": (2560, 1536), "1.75": (2688, 1536), "2.0": (2816, 1408),
    "2.09": (2944, 1408), "2.4": (3072, 1280), "2.5": (3200, 1280), "2.89": (3328, 1152), "3.0": (3456, 1152),
    "3.11": (3584, 1152), "3.62": (3712, 1024), "3.75": (3840, 1024), "3.88": (3968, 1024), "4.0": (4096, 1024),
}
BIN_TABLES: dict[int, dict[str, tuple[int, int]]] = {
    256: ASPECT_RATIO_256_BIN,
    512: ASPECT_RATIO_512_BIN,
    1024: ASPECT_RATIO_1024_BIN,
    2048: ASPECT_RATIO_2048_BIN,
}

# Generated sizes must be whole latent patches: VAE factor 8 x patch size 2.
SIZE_MULTIPLE = 16


def bin_table(bin_size: int) -> dict[str, tuple[int, int]]:
    """The table for a model's training size in pixels (PixArtConfig.bin_size: 256/512/1024/2048)."""
    if bin_size not in BIN_TABLES:
        raise PixArtError(f"No aspect-ratio bins for {bin_size} px models; known: {', '.join(map(str, BIN_TABLES))}. "
                          "Turn resolution binning off for this model.")
    return BIN_TABLES[bin_size]


def classify_height_width_bin(height: int, width: int, table: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """(height, width) of the bin whose aspect-ratio key is closest to height/width (diffusers' rule)."""
    ar = float(height / width)
    closest = min(table.keys(), key=lambda ratio: abs(float(ratio) - ar))
    h, w = table[closest]
    return int(h), int(w)


def bin_for_aspect(bin_size: int, height_over_width: float) -> tuple[int, int]:
    """(height, width) of a model's trained size whose shape is closest to height / width."""
    return classify_height_width_bin(height_over_width, 1.0, bin_table(bin_size))


def resize_and_crop(images: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Scale (B, C, H, W) images to cover width x height (bilinear, align_corners=False), then center-crop.

    Same arithmetic as diffusers' `PixArtImageProcessor.resize_and_crop_tensor`; a no-op when the size already fits.
    """
    h, w = images.shape[2], images.shape[3]
    if h == height and w == width:
        return images
    ratio = max(height / h, width / w)
    rh, rw = int(h * ratio), int(w * ratio)
    images = F.interpolate(images, size=(rh, rw), mode="bilinear", align_corners=False)
    top, left = (rh - height) // 2, (rw - width) // 2
    return images[:, :, top:top + height, left:left + width]


@dataclass(frozen=True)
class SizePlan:
    """Where a generation happens (gen_*) and what the user gets (out_*), in pixels."""

    gen_height: int
    gen_width: int
    out_height: int
    out_width: int

    @property
    def latent_shape(self) -> tuple[int, int]:
        return self.gen_height // 8, self.gen_width // 8


def plan_size(width: int, height: int, bin_size: int, binning: bool = True) -> SizePlan:
    """Decide the generation size for a request: the closest bin when binning, else the request itself. A model
    trained at a size with no bin table (PixArt-nano, 64 px) has nothing to snap to, so it is never binned."""
    if width <= 0 or height <= 0:
        raise PixArtError(f"width and height must be positive; got {width}x{height}.")
    if binning and bin_size in BIN_TABLES:
        gh, gw = classify_height_width_bin(height, width, bin_table(bin_size))
        return SizePlan(gh, gw, int(height), int(width))
    if width % SIZE_MULTIPLE or height % SIZE_MULTIPLE:
        raise PixArtError(f"Without resolution binning, width and height must be multiples of {SIZE_MULTIPLE} "
                          f"(VAE factor 8 x patch 2); got {width}x{height}. Turn binning on or pick e.g. "
                          f"{width // SIZE_MULTIPLE * SIZE_MULTIPLE}x{height // SIZE_MULTIPLE * SIZE_MULTIPLE}.")
    return SizePlan(int(height), int(width), int(height), int(width))
