"""Reading lllyasviel's `ControlNetHED.pth` (the HED edge detector the PixArt-δ ControlNet was trained with)."""

from __future__ import annotations

import os

import torch

from ..errors import PixArtError
from ..hed import HEDDetector
from .checkpoint_formats import open_checkpoint


def load_hed(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> HEDDetector:
    """Load `ControlNetHED.pth` (pickle opened with weights_only=True, or a .safetensors of the same keys). The fp16
    weights are cast to `dtype` (fp32 by default: CPU convolutions in fp16 are slow)."""
    source = open_checkpoint(path)
    detector = HEDDetector()
    expected = {k: tuple(v.shape) for k, v in detector.net.state_dict().items()}
    shapes = source.shapes()
    keys = set(shapes)
    for prefix in ("module.", "model.", "net."):  # wrappers some tools add
        if keys and all(k.startswith(prefix) for k in keys):
            keys = {k[len(prefix):] for k in keys}
            shapes = {k[len(prefix):]: v for k, v in shapes.items()}
            break
    else:
        prefix = ""
    if keys != set(expected):
        missing, unexpected = sorted(set(expected) - keys), sorted(keys - set(expected))
        raise PixArtError(
            f"{source.path.name} is not the HED edge detector this node uses (lllyasviel's ControlNetHED.pth, "
            f"Annotators repository): " + (f"missing {missing[:4]}" if missing else "")
            + (f"{'; ' if missing else ''}unexpected keys such as {unexpected[:4]}" if unexpected else "") + "."
        )
    for k, s in expected.items():
        if tuple(shapes[k]) != s:
            raise PixArtError(f"HED tensor '{k}' has shape {tuple(shapes[k])}, expected {s}; the file is not "
                              "ControlNetHED.pth.")
    state = {k[len(prefix):]: v.to(dtype) for k, v in source.iter_tensors()}
    detector.net.load_state_dict(state, strict=True)
    return detector.eval().requires_grad_(False).to(device)
