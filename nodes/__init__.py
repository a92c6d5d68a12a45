"""The ComfyUI nodes of PixArt-δ: thin classic (V1) node classes over pixart_core.

Every class name starts with PixArtDelta and every display name with "PixArt-δ", so no other pack's nodes clash
(ComfyUI silently drops a node whose name is already taken).
"""

from .controlnet import PixArtDeltaControlNetApply, PixArtDeltaControlNetLoader, PixArtDeltaHEDPreprocessor
from .latent_size import PixArtDeltaEmptyLatent, PixArtDeltaResolutionSelect
from .sampling import PixArtDeltaLCMSampler, PixArtDeltaSampler
from .text_encode import PixArtDeltaT5Loader, PixArtDeltaT5TextEncode
from .transformer_loader import PixArtDeltaTransformerLoader
from .vae import PixArtDeltaVAEDecodeTiled, PixArtDeltaVAEEncodeTiled, PixArtDeltaVAELoader

NODE_CLASS_MAPPINGS = {
    "PixArtDeltaTransformerLoader": PixArtDeltaTransformerLoader,
    "PixArtDeltaT5Loader": PixArtDeltaT5Loader,
    "PixArtDeltaT5TextEncode": PixArtDeltaT5TextEncode,
    "PixArtDeltaResolutionSelect": PixArtDeltaResolutionSelect,
    "PixArtDeltaEmptyLatent": PixArtDeltaEmptyLatent,
    "PixArtDeltaLCMSampler": PixArtDeltaLCMSampler,
    "PixArtDeltaSampler": PixArtDeltaSampler,
    "PixArtDeltaControlNetLoader": PixArtDeltaControlNetLoader,
    "PixArtDeltaControlNetApply": PixArtDeltaControlNetApply,
    "PixArtDeltaHEDPreprocessor": PixArtDeltaHEDPreprocessor,
    "PixArtDeltaVAELoader": PixArtDeltaVAELoader,
    "PixArtDeltaVAEDecodeTiled": PixArtDeltaVAEDecodeTiled,
    "PixArtDeltaVAEEncodeTiled": PixArtDeltaVAEEncodeTiled,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "PixArtDeltaTransformerLoader": "PixArt-δ Load Transformer",
    "PixArtDeltaT5Loader": "PixArt-δ Load T5 Encoder",
    "PixArtDeltaT5TextEncode": "PixArt-δ T5 Text Encode",
    "PixArtDeltaResolutionSelect": "PixArt-δ Resolution",
    "PixArtDeltaEmptyLatent": "PixArt-δ Empty Latent",
    "PixArtDeltaLCMSampler": "PixArt-δ LCM Sampler",
    "PixArtDeltaSampler": "PixArt-δ Sampler",
    "PixArtDeltaControlNetLoader": "PixArt-δ Load ControlNet",
    "PixArtDeltaControlNetApply": "PixArt-δ Apply ControlNet",
    "PixArtDeltaHEDPreprocessor": "PixArt-δ HED Edges",
    "PixArtDeltaVAELoader": "PixArt-δ Load VAE",
    "PixArtDeltaVAEDecodeTiled": "PixArt-δ VAE Decode (Tiled)",
    "PixArtDeltaVAEEncodeTiled": "PixArt-δ VAE Encode (Tiled)",
}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
