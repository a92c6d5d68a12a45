"""Nodes: load the PixArt-δ ControlNet-Transformer (models/controlnet), set it up with a control image, strength and
start/end, and the HED soft-edge preprocessor it was trained with."""

from __future__ import annotations

import torch

from pixart_core.errors import PixArtError
from pixart_core.loading.controlnet_files import load_controlnet
from pixart_core.loading.hed_files import load_hed

from . import comfy_bridge as bridge
from . import model_cache
from .sockets import CONTROL, CONTROLNET, VAE, Control, ControlNet, image_from_core, image_to_core

FOLDER = "controlnet"


class PixArtDeltaControlNetLoader:
    DESCRIPTION = ("Loads a PixArt-δ ControlNet-Transformer from models/controlnet: the ControlNet part of "
                   "PixArt-XL-2-1024-ControlNet.pth / -512-ControlNet.pth (the base inside is not loaded here), or a "
                   "diffusers research ControlNet. Released ControlNets are PixArt-α: use them with α or δ models.")
    CATEGORY = "PixArt/loaders"
    RETURN_TYPES = (CONTROLNET,)
    RETURN_NAMES = ("controlnet",)
    OUTPUT_TOOLTIPS = ("The ControlNet, for PixArt-δ Apply ControlNet.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "controlnet_name": (bridge.list_models(FOLDER), {
                    "tooltip": "The ControlNet file in models/controlnet (PixArt-XL-2-1024-ControlNet.pth for 1024 px "
                               "α/δ models, PixArt-XL-2-512-ControlNet.pth for α-512)."}),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, controlnet_name):
        return bridge.validate_model_name(FOLDER, controlnet_name, "ControlNet file")

    def load(self, controlnet_name: str):
        path = bridge.model_path(FOLDER, controlnet_name, "ControlNet file")
        load_device, offload_device = bridge.compute_device(), bridge.offload_device()

        def load_new() -> ControlNet:
            module = load_controlnet(path, dtype=torch.float32, device=offload_device)
            return ControlNet(bridge.ManagedModel(module, load_device, offload_device), controlnet_name,
                              module.info.summary())

        return (model_cache.load_file(model_cache.CONTROLNETS, path, (str(load_device),), load_new, "ControlNet file",
                                      controlnet_name),)


class PixArtDeltaControlNetApply:
    DESCRIPTION = ("Sets up a ControlNet with its control image (e.g. HED edges), strength and the part of sampling it "
                   "acts in. Connect the result to a PixArt sampler's 'control' input; the image is fitted to the "
                   "generation size there.")
    CATEGORY = "PixArt/controlnet"
    RETURN_TYPES = (CONTROL,)
    RETURN_NAMES = ("control",)
    OUTPUT_TOOLTIPS = ("ControlNet guidance for the PixArt samplers (with any stacked before it).",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "controlnet": (CONTROLNET, {"tooltip": "The ControlNet from PixArt-δ Load ControlNet."}),
                "vae": (VAE, {"tooltip": "The model's VAE (SD VAE for α/δ): encodes the control image."}),
                "image": ("IMAGE", {"tooltip": "The control image: HED edges for the released ControlNets (from "
                                               "PixArt-δ HED Edges). Scaled and center-cropped to the generation "
                                               "size."}),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05,
                                       "tooltip": "How strongly the image steers the result (1 as trained; 0 "
                                                  "turns it off)."}),
                "start": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                    "tooltip": "Fraction of the sampling steps after which the control starts."}),
                "end": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                  "tooltip": "Fraction of the sampling steps after which the control stops (end "
                                             "early to let details depart from the edges)."}),
            },
            "optional": {
                "previous": (CONTROL, {"tooltip": "Optional: another Apply ControlNet's output, to stack "
                                                  "ControlNets (their effects add up)."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, start, end):
        # Checked before the run, so a bad range is refused at Queue with our message. Naming start/end here turns
        # off ComfyUI's own min/max checks for them, so the range is checked here too; linked values arrive as None.
        for name, value in (("start", start), ("end", end)):
            if value is not None and not 0.0 <= float(value) <= 1.0:
                return f"ControlNet {name} is a fraction of the sampling steps, from 0 to 1; got {value}."
        if start is not None and end is not None and float(start) > float(end):
            return f"ControlNet start ({start}) is after end ({end}); start must be at most end."
        return True

    def apply(self, controlnet: ControlNet, vae, image: torch.Tensor, strength: float, start: float, end: float,
              previous: tuple[Control, ...] = ()):
        if start > end:
            raise PixArtError(f"ControlNet start ({start}) is after end ({end}); start must be at most end.")
        return (tuple(previous) + (Control(controlnet, vae, image, float(strength), float(start), float(end)),),)


class PixArtDeltaHEDPreprocessor:
    DESCRIPTION = ("Turns a photo into HED soft edges, the control image the PixArt-δ ControlNet was trained on "
                   "(weights ControlNetHED.pth from lllyasviel's Annotators, in models/controlnet).")
    CATEGORY = "PixArt/controlnet"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("edges",)
    OUTPUT_TOOLTIPS = ("The edge map (white edges on black, same size as the input), for Apply ControlNet.",)
    FUNCTION = "detect"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The photo to take edges from."}),
                "hed_name": (bridge.list_models(FOLDER, with_bundled=False), {
                    "tooltip": "The HED weights, ControlNetHED.pth, in models/controlnet."}),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, hed_name):
        return bridge.validate_model_name(FOLDER, hed_name, "HED weights file")

    @torch.no_grad()
    def detect(self, image: torch.Tensor, hed_name: str):
        path = bridge.model_path(FOLDER, hed_name, "HED weights file")
        device = bridge.compute_device()
        detector = model_cache.load_file(model_cache.ANNOTATORS, path, (str(device),),
                                         lambda: load_hed(path, device=device), "HED weights file", hed_name)
        edges = detector(image_to_core(image))  # (B, 1, H, W) in [0, 1]
        return (image_from_core(edges).to(bridge.intermediate_device()),)
