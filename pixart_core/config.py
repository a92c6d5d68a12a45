"""The shape of a PixArt transformer: everything the constructor needs, and what a checkpoint tells us.

One dataclass serves PixArt-α (256, 512, 1024-MS), PixArt-δ (LCM and the ControlNet bases) and PixArt-Σ (256 to 2K).
The defaults are the released XL-2 model; tests shrink width, depth and heads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ALPHA = "alpha"
SIGMA = "sigma"

# VAE latent scale of each family: α/δ use sd-vae-ft-ema, Σ uses the SDXL VAE.
LATENT_SCALE = {ALPHA: 0.18215, SIGMA: 0.13025}

# What the network's first in_channels outputs are, in diffusers' scheduler names. Released PixArt models predict
# epsilon; a v_prediction model (PixArt-nano) is read as epsilon by the samplers (guidance.GuidedEpsilon).
EPSILON = "epsilon"
V_PREDICTION = "v_prediction"
PREDICTION_TYPES = (EPSILON, V_PREDICTION)

# Position-embedding interpolation by training size (latent px), from the official inference and convert scripts
# (α repo `PixArt.py` lewei_scale, Σ repo pe_interpolation). α-256 is 1.0: the diffusers script's 0.5 for α-256 is
# defined but never used.
PE_INTERPOLATION = {
    ALPHA: {32: 1.0, 64: 1.0, 128: 2.0},
    SIGMA: {32: 0.5, 64: 1.0, 128: 2.0, 256: 4.0},
}


@dataclass
class PixArtConfig:
    family: str = ALPHA
    depth: int = 28
    hidden_size: int = 1152
    num_heads: int = 16
    patch_size: int = 2
    in_channels: int = 4
    out_channels: int = 8
    caption_channels: int = 4096
    text_len: int = 120
    micro_conditions: bool = False
    sample_size: int = 128  # training latent size (latent px): 32 / 64 / 128 / 256
    pe_interpolation: float = 2.0
    qk_norm: bool = False
    kv_compress_layers: tuple[int, ...] = field(default_factory=tuple)
    kv_compress_scale: int = 2
    has_null_embedding: bool = True
    mlp_ratio: float = 4.0
    prediction_type: str = EPSILON

    def __post_init__(self) -> None:
        self.kv_compress_layers = tuple(int(i) for i in self.kv_compress_layers)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def latent_scale(self) -> float:
        return LATENT_SCALE[self.family]

    @property
    def bin_size(self) -> int:
        """The pixel size of the aspect-ratio bin table this model was trained on (256/512/1024/2048)."""
        return self.sample_size * 8

    @property
    def learned_sigma(self) -> bool:
        return self.out_channels == 2 * self.in_channels

    @classmethod
    def from_dict(cls, d: dict) -> "PixArtConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def default_pe_interpolation(family: str, sample_size: int) -> float:
    """The interpolation the official code uses for a model trained at this latent size."""
    table = PE_INTERPOLATION[family]
    if sample_size in table:
        return table[sample_size]
    return max(sample_size / 64.0, 0.5) if family == SIGMA else max(sample_size // 64, 1)
