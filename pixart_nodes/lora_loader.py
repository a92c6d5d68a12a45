"""Node: apply a LoRA from models/loras to a PixArt transformer, with a strength; stackable."""

from __future__ import annotations

import dataclasses

from pixart_core.loading.lora_files import load_lora
from pixart_core.lora import check_lora

from . import comfy_bridge as bridge
from . import model_cache
from .sockets import MODEL, PixArtModel

FOLDER = "loras"


class PixArtDeltaLoraLoader:
    DESCRIPTION = ("Applies a PixArt-α/Σ LoRA (diffusers, PEFT or kohya format, .safetensors) to the transformer "
                   "with a strength. Chain several to stack them. The weights are not changed: the samplers add the "
                   "LoRA while they run, so the model before this node stays the base model.")
    CATEGORY = "PixArt/loaders"
    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The transformer with this LoRA (and any before it), for the PixArt samplers.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL, {"tooltip": "The transformer from PixArt Load Transformer (or another Load LoRA)."}),
                "lora_name": (bridge.list_models(FOLDER), {
                    "tooltip": "The LoRA file in models/loras, trained for PixArt-α or Σ (the same base family "
                               "and size as the model)."}),
                "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.05,
                                       "tooltip": "How much of the LoRA is added: 1 as trained, 0 leaves the model "
                                                  "unchanged, negative values subtract it."}),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, lora_name):
        return bridge.validate_model_name(FOLDER, lora_name, "LoRA file")

    def apply(self, model: PixArtModel, lora_name: str, strength: float):
        path = bridge.model_path(FOLDER, lora_name, "LoRA file")
        with bridge.about_file("LoRA file", lora_name):
            lora = model_cache.LORAS.get_or_load(model_cache.file_identity(path), lambda: load_lora(path))
            check_lora(model.module, lora)  # a LoRA that does not fit fails here, not in the sampler
        # a new model value: the input (cached by ComfyUI for other branches) keeps its own LoRA list
        return (dataclasses.replace(model, loras=model.loras + ((lora, strength),)),)
