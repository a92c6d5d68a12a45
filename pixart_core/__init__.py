"""PixArt-α / Σ / δ in plain PyTorch: transformer, ControlNet, checkpoints, samplers, T5, tiled VAE, pipeline.

Nothing in this package imports ComfyUI; the ComfyUI nodes in ../nodes are thin adapters over it.
"""

from .errors import PixArtError

__all__ = ["PixArtError"]
