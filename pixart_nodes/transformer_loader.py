"""Node: load a PixArt α / Σ / δ transformer from models/diffusion_models or models/checkpoints."""

from __future__ import annotations

import logging

import torch

from pixart_core.loading.checkpoint import load_transformer
from pixart_core.errors import PixArtError

from . import comfy_bridge as bridge
from . import model_cache
from .sockets import MODEL, PixArtModel

log = logging.getLogger("pixart_delta")

FOLDERS = ("diffusion_models", "checkpoints")
PRECISIONS = ["auto", "fp32", "fp16", "bf16", "int8", "fp8", "int8-dynamic"]  # new entries at the end
EIGHT_BIT = ("int8", "fp8", "int8-dynamic")  # block weights in 8 bits, computed in the auto dtype (quantize.py)
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _overrides(family: str, train_resolution: str, text_len: str) -> dict:
    out: dict = {}
    if family != "auto":
        out["family"] = family
    if train_resolution != "auto":
        out["sample_size"] = int(train_resolution) // 8
    if text_len != "auto":
        out["text_len"] = int(text_len)
    return out


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise PixArtError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}.")


def describe_detection(name: str, summary: dict, precision: str, dtype: torch.dtype) -> str:
    """What the loader found, in words a user can check against the model card."""
    yes_no = {True: "yes", False: "no"}
    lines = [
        f"{summary['variant']}  ({name})",
        f"layout: {summary['layout']}; family: {summary['family']}; depth {summary['depth']}, width "
        f"{summary['hidden_size']}, {summary['num_heads']} heads",
        f"trained at {summary['resolution']} px (aspect-ratio bins of that size); text length {summary['text_len']} "
        f"tokens; position-embedding interpolation {summary['pe_interpolation']}",
        f"micro-conditions: {yes_no[summary['micro_conditions']]}; null embedding: "
        f"{yes_no[summary['null_embedding']]}; ControlNet in file: {yes_no[summary['has_controlnet']]}",
        f"VAE latent scale {summary['latent_scale']} ({'SDXL VAE' if summary['family'] == 'sigma' else 'SD VAE'}); "
        f"precision {precision} ({str(dtype).replace('torch.', '')})",
    ]
    if summary.get("assumed"):
        lines.append("assumed (not in the file; set an override if wrong): " + "; ".join(summary["assumed"]))
    return "\n".join(lines)


class PixArtDeltaTransformerLoader:
    DESCRIPTION = ("Loads a PixArt transformer: α (256/512/1024-MS), δ (LCM, ControlNet files) or Σ (256 to 2K), in "
                   "the original .pth/.safetensors layout or diffusers' layout. What it detected is on the 'info' "
                   "output and in the console.")
    CATEGORY = "PixArt/loaders"
    RETURN_TYPES = (MODEL, "STRING")
    RETURN_NAMES = ("model", "info")
    OUTPUT_TOOLTIPS = ("The transformer, for the PixArt samplers, resolution and text-encode nodes.",
                       "What was detected: family, size, text length, training resolution, and what was assumed.")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model_name": (bridge.list_models_in(FOLDERS), {
                    "tooltip": "The transformer file, from models/diffusion_models or models/checkpoints (e.g. "
                               "PixArt-XL-2-1024-MS.pth, PixArt-Sigma-XL-2-2K-MS.pth, the LCM "
                               "diffusion_pytorch_model.safetensors renamed to PixArt-LCM-XL-2-1024-MS.safetensors)."}),
                "precision": (PRECISIONS, {
                    "default": "auto",
                    "tooltip": "Weight precision. auto: bf16/fp16 on a GPU that supports it, fp32 on the CPU. int8: "
                               "bitsandbytes 8-bit weights (about half of fp16's memory; CPU and CUDA). fp8: float8 "
                               "e4m3 weight storage, upcast layer by layer for each matmul (about half of fp16's "
                               "memory on any device; saves memory, not time; needs torch with float8). "
                               "int8-dynamic: int8 weights and int8 activations on torch's int8 matmul (about half "
                               "of fp16's memory and faster than bf16 on CPUs with VNNI/AMX and on GPUs)."}),
                "family": (["auto", "alpha", "sigma"], {
                    "default": "auto",
                    "tooltip": "Override the detected family only if detection is wrong: alpha (also δ; SD VAE) or "
                               "sigma (SDXL VAE). A diffusers file without config.json cannot always tell."}),
                "train_resolution": (["auto", "256", "512", "1024", "2048"], {
                    "default": "auto",
                    "tooltip": "Override the training resolution (picks aspect-ratio bins and position embedding) "
                               "when the file does not say, e.g. a diffusers 512 or 2K file without config.json."}),
                "text_len": (["auto", "120", "300"], {
                    "default": "auto",
                    "tooltip": "Override the prompt length in tokens (120 for α/δ, 300 for Σ) for a file that does not "
                               "say it: diffusers-layout files carry no null embedding to read it from."}),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, model_name):
        return bridge.validate_model_name(FOLDERS, model_name, "Transformer file")

    def load(self, model_name: str, precision: str, family: str, train_resolution: str, text_len: str):
        _check_precision(precision)
        path = bridge.model_path(FOLDERS, model_name, "Transformer file")
        overrides = _overrides(family, train_resolution, text_len)
        load_device, offload_device = bridge.compute_device(), bridge.offload_device()
        dtype = bridge.auto_dtype(load_device) if precision in ("auto", *EIGHT_BIT) else _DTYPES[precision]

        def load_new() -> PixArtModel:
            # int8 (bitsandbytes) weights stay on the device they were quantised on; fp8 weights are plain buffers
            # that move between devices like any others.
            home = load_device if precision == "int8" else offload_device
            weights = precision if precision in EIGHT_BIT else "none"
            module = load_transformer(path, dtype=dtype, device=home, overrides=overrides, weights=weights)
            managed = bridge.ManagedModel(module, load_device, home)
            summary = module.detection.summary()
            return PixArtModel(managed=managed, config=module.config, name=model_name, summary=summary)

        settings = (precision, str(dtype), tuple(sorted(overrides.items())), str(load_device))
        model = model_cache.load_file(model_cache.TRANSFORMERS, path, settings, load_new, "Transformer file",
                                      model_name)
        info = describe_detection(model_name, model.summary, precision, dtype)
        log.info("PixArt transformer loaded:\n%s", info)
        return (model, info)
