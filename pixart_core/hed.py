"""HED soft-edge detector, as the PixArt-δ ControlNet was trained with: lllyasviel's Apache-2.0 re-implementation
(`ControlNetHED_Apache2`, weights `ControlNetHED.pth`, fp16, 29.4 MB), used by the α repo's `diffusion/model/hed.py`.

Network (lllyasviel's ControlNet `annotator/hed`): RGB x 255 minus a learned per-channel offset `norm`; five VGG-like
stages of 3x3 convs + ReLU (64/128/256/512/512 channels; 2/2/3/3/3 convs; 2x2 max-pool before stages 2-5); a 1x1
projection to one channel after each stage; the five maps are resized (bilinear) to the input size, averaged, and
squashed by a sigmoid.
The module names equal the checkpoint keys (`norm`, `block{1..5}.convs.{j}`, `block{1..5}.projection`);
loading/hed_files.py reads the file.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import PixArtError


class DoubleConvBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int):
        super().__init__()
        self.convs = nn.Sequential(
            *(nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, 3, padding=1) for i in range(layers))
        )
        self.projection = nn.Conv2d(out_channels, 1, 1)

    def forward(self, x: torch.Tensor, down_sampling: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if down_sampling:
            x = F.max_pool2d(x, kernel_size=2, stride=2)
        for conv in self.convs:
            x = F.relu(conv(x))
        return x, self.projection(x)


class ControlNetHED(nn.Module):
    """ControlNetHED_Apache2: input RGB in 0..255, output the five one-channel side maps (full, 1/2, ..., 1/16 size)."""

    def __init__(self):
        super().__init__()
        self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))
        self.block1 = DoubleConvBlock(3, 64, 2)
        self.block2 = DoubleConvBlock(64, 128, 2)
        self.block3 = DoubleConvBlock(128, 256, 3)
        self.block4 = DoubleConvBlock(256, 512, 3)
        self.block5 = DoubleConvBlock(512, 512, 3)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = x - self.norm
        h, p1 = self.block1(h)
        h, p2 = self.block2(h, down_sampling=True)
        h, p3 = self.block3(h, down_sampling=True)
        h, p4 = self.block4(h, down_sampling=True)
        _, p5 = self.block5(h, down_sampling=True)
        return [p1, p2, p3, p4, p5]


def image_to_bchw(image) -> torch.Tensor:
    """An image in any usual form -> float (B, C, H, W) in [0, 1] with 3 RGB channels (1 kept as is, alpha dropped).

    Accepts (B, H, W, C) (ComfyUI IMAGE), (B, C, H, W), (H, W, C), (C, H, W), (H, W), a PIL image or a numpy array;
    uint8 values are divided by 255. The channel axis is the one of size 1, 3 or 4 (the last axis when both qualify,
    as ComfyUI's images are channels-last).
    """
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image))
    if not isinstance(image, torch.Tensor):
        raise PixArtError(f"Expected an image (tensor, numpy array or PIL image), not {type(image).__name__}.")
    x = image
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    elif not x.is_floating_point():
        raise PixArtError(f"Image values must be floats in [0, 1] or uint8, not {x.dtype}.")
    if x.ndim == 2:
        x = x[None, None]
    elif x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise PixArtError(f"An image must have 2 to 4 dimensions, not shape {tuple(image.shape)}.")
    if x.shape[-1] in (1, 3, 4):
        x = x.permute(0, 3, 1, 2)
    elif x.shape[1] not in (1, 3, 4):
        raise PixArtError(f"Cannot find the colour channels of an image shaped {tuple(image.shape)}; expected 1, 3 or "
                          "4 channels (channels-last like ComfyUI's IMAGE, or channels-first).")
    if x.shape[1] == 4:
        x = x[:, :3]
    if min(x.shape[-2:]) < 1:
        raise PixArtError(f"The image is empty (shape {tuple(image.shape)}).")
    return x.float()


class HEDDetector(nn.Module):
    """Edge maps for the PixArt-δ HED ControlNet: image in [0, 1] -> (B, 1, H, W) edges in [0, 1], same H and W."""

    def __init__(self, net: ControlNetHED | None = None):
        super().__init__()
        self.net = net if net is not None else ControlNetHED()

    @torch.no_grad()
    def forward(self, image) -> torch.Tensor:
        x = image_to_bchw(image)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        weight = self.net.norm
        h, w = x.shape[-2:]
        out = []
        for one in x.to(device=weight.device, dtype=weight.dtype).split(1):  # one image at a time bounds the memory
            maps = [
                m if m.shape[-2:] == (h, w) else F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
                for m in self.net(one * 255.0)
            ]
            out.append(torch.sigmoid(torch.cat(maps, dim=1).float().mean(dim=1, keepdim=True)).clamp_(0, 1))
        return torch.cat(out)
