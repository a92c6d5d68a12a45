"""The ComfyUI nodes of PixArt-δ: thin classic (V1) node classes over pixart_core.

Every class name starts with PixArtDelta, so no other pack's nodes clash (ComfyUI silently drops a node whose name is
already taken); class names, input names and widget order never change, so saved workflows keep loading. Display
names say "PixArt" for nodes that serve every family (α, Σ, δ) and "PixArt-δ" where δ is meant (LCM, ControlNet).
The package is `pixart_nodes`, not `nodes`: ComfyUI has a top-level nodes.py, and the pack folder is on sys.path.
"""

from .controlnet import PixArtDeltaControlNetApply, PixArtDeltaControlNetLoader, PixArtDeltaHEDPreprocessor
from .latent_size import PixArtDeltaEmptyLatent, PixArtDeltaResolutionSelect
from .lora_loader import PixArtDeltaLoraLoader
from .sampling import PixArtDeltaLCMSampler, PixArtDeltaSampler
from .text_encode import PixArtDeltaT5Loader, PixArtDeltaT5TextEncode
from .transformer_loader import PixArtDeltaTransformerLoader
from .vae import PixArtDeltaVAEDecodeTiled, PixArtDeltaVAEEncodeTiled, PixArtDeltaVAELoader

NODE_CLASS_MAPPINGS = {
    "PixArtDeltaTransformerLoader": PixArtDeltaTransformerLoader,
    "PixArtDeltaLoraLoader": PixArtDeltaLoraLoader,
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
    "PixArtDeltaTransformerLoader": "PixArt Load Transformer",
    "PixArtDeltaLoraLoader": "PixArt Load LoRA",
    "PixArtDeltaT5Loader": "PixArt Load T5 Encoder",
    "PixArtDeltaT5TextEncode": "PixArt T5 Text Encode",
    "PixArtDeltaResolutionSelect": "PixArt Resolution",
    "PixArtDeltaEmptyLatent": "PixArt Empty Latent",
    "PixArtDeltaLCMSampler": "PixArt-δ LCM Sampler",
    "PixArtDeltaSampler": "PixArt Sampler",
    "PixArtDeltaControlNetLoader": "PixArt-δ Load ControlNet",
    "PixArtDeltaControlNetApply": "PixArt-δ Apply ControlNet",
    "PixArtDeltaHEDPreprocessor": "PixArt-δ HED Edges",
    "PixArtDeltaVAELoader": "PixArt Load VAE",
    "PixArtDeltaVAEDecodeTiled": "PixArt VAE Decode (Tiled)",
    "PixArtDeltaVAEEncodeTiled": "PixArt VAE Encode (Tiled)",
}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
