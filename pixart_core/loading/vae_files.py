"""Reading a VAE file or folder into a PixArtVAE: a diffusers folder (config.json + diffusion_pytorch_model
[.fp16].safetensors, or a pipeline folder with vae/) or one file in the original ldm layout (encoder.down.0.block.0...,
optionally inside a full SD checkpoint under first_stage_model.) or the diffusers layout. Files that are another kind
of model are refused with what they are."""

from __future__ import annotations

import inspect
import json
import logging
import os
from typing import TYPE_CHECKING, Optional, Union

import torch

from ..errors import PixArtError
from ..vae import KIND_CONFIG, SD, SDXL, PixArtVAE

if TYPE_CHECKING:  # imported where a VAE is built: importing diffusers' models also imports bitsandbytes
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

log = logging.getLogger(__name__)

_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                 "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")
_SINGLE_FILE_EXT = (".safetensors", ".sft", ".pt", ".pth", ".ckpt", ".bin")
_LDM_PREFIXES = ("first_stage_model.", "vae.")


def load_vae(path: str, kind: str = "auto", dtype: torch.dtype = torch.float32,
             device: Union[str, torch.device] = "cpu", latent_scale: Optional[float] = None,
             config_overrides: Optional[dict] = None) -> PixArtVAE:
    """Load an SD or SDXL VAE from a diffusers folder (config.json + diffusion_pytorch_model[.fp16].safetensors, or a
    pipeline folder with a vae/ subfolder) or from one file (.safetensors / .pt / .pth / .ckpt) in the original ldm
    layout (encoder.down.0.block.0..., optionally inside a full SD checkpoint under first_stage_model.) or the diffusers
    layout.

    kind: "sd" (PixArt-α/δ, scale 0.18215), "sdxl" (PixArt-Σ, 0.13025) or "auto": from `latent_scale` (pass the
    serving model's PixArtConfig.latent_scale), else the folder's config.json, else "sdxl" in the file name, else "sd".
    The scale used: latent_scale if given, else that of an explicit kind, else the folder's config, else the kind's.
    config_overrides: AutoencoderKL config values for unusual VAEs (e.g. norm_num_groups, shift_factor), applied last.
    dtype: the weights' and computation's dtype; fp16 pieces that overflow are redone in bf16/fp32 (see decode)."""
    if kind not in ("auto", SD, SDXL):
        raise PixArtError(f"kind must be 'auto', 'sd' or 'sdxl', not {kind!r}.")
    path = os.fspath(path)
    if os.path.isdir(path):
        state, folder_config = _read_folder(path)
    elif os.path.isfile(path):
        if not path.lower().endswith(_SINGLE_FILE_EXT):
            raise PixArtError(f"{path} is not a weights file (expected one of {', '.join(_SINGLE_FILE_EXT)}).")
        state, folder_config = _read_file(path), None
    else:
        raise PixArtError(f"VAE path not found: {path}")
    state = _to_diffusers_layout(state, path)

    explicit = kind != "auto"
    kind = _resolve_kind(kind, latent_scale, folder_config, path)
    config = dict(KIND_CONFIG[kind])
    if folder_config is not None:
        config.update({k: v for k, v in folder_config.items() if not k.startswith("_")})
    config.update(_shape_config(state))
    # the scale: the served model's latent_scale, else an explicit kind, else the folder's config, else the kind's
    scaling = config["scaling_factor"] if not explicit else KIND_CONFIG[kind]["scaling_factor"]
    if latent_scale is not None:
        scaling = float(latent_scale)
    config["scaling_factor"] = scaling
    config.update(config_overrides or {})
    scaling = float(config["scaling_factor"])
    if config.get("act_fn", "silu") != "silu":
        raise PixArtError(f"{path}: activation {config['act_fn']!r} is not an SD/SDXL VAE (they use silu).")

    model = _build(config, state, path)
    vae = PixArtVAE(model, kind, scaling, config.get("shift_factor"))
    vae.to(device=torch.device(device), dtype=dtype)
    log.info("Loaded VAE %s as %s (scale %s, %s)", path, kind, scaling, dtype)
    return vae


def _resolve_kind(kind: str, latent_scale: Optional[float], folder_config: Optional[dict], path: str) -> str:
    if kind != "auto":
        return kind
    if latent_scale is not None:
        for name, cfg in KIND_CONFIG.items():
            if abs(latent_scale - cfg["scaling_factor"]) < 1e-4:
                return name
        raise PixArtError(f"latent_scale {latent_scale} is neither the SD VAE's 0.18215 nor the SDXL VAE's 0.13025.")
    if folder_config is not None and "scaling_factor" in folder_config:
        return SDXL if abs(folder_config["scaling_factor"] - 0.13025) < 1e-4 else SD
    if "sdxl" in os.path.basename(os.path.normpath(path)).lower():
        log.info("VAE %s: taken as the SDXL VAE from its name; pass kind= to override.", path)
        return SDXL
    log.warning("VAE %s: SD and SDXL VAEs cannot be told apart from their weights; assuming the SD VAE (PixArt-α/δ, "
                "scale 0.18215). Pass kind='sdxl' (or the model's latent_scale) for PixArt-Σ.", path)
    return SD


def _read_folder(path: str) -> tuple[dict, dict]:
    if not os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, "vae")):
        path = os.path.join(path, "vae")  # a whole diffusers pipeline folder
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise PixArtError(f"{path} is a folder without config.json; point to a diffusers VAE folder or a VAE file.")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise PixArtError(f"{config_path} is not readable JSON: {e}") from e
    cls = config.get("_class_name", "AutoencoderKL")
    if cls != "AutoencoderKL":
        raise PixArtError(f"{path} holds a {cls}, not an AutoencoderKL VAE (SD / SDXL VAE expected).")
    for name in _WEIGHT_NAMES:
        weights = os.path.join(path, name)
        if os.path.isfile(weights):
            return _read_file(weights), config
    raise PixArtError(f"{path} has no diffusion_pytorch_model[.fp16].safetensors (or .bin) next to config.json.")


def _read_file(path: str) -> dict:
    try:
        if path.lower().endswith((".safetensors", ".sft")):
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except Exception as e:  # safetensors / zip / unpickling errors all mean: not a usable weights file
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise PixArtError(f"{path} is a pickle holding more than weights; it is refused for safety. Use a "
                              ".safetensors VAE.") from e
        raise PixArtError(f"Could not read {path} ({type(e).__name__}: {str(e)[:200]}). The file is probably truncated "
                          "or not a checkpoint; download it again.") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PixArtError(f"{path} does not hold a dictionary of tensors.")
    return state


def _what_is(keys: list[str]) -> str:
    """Name what a non-VAE state dict is, for the error message."""
    def has(*parts: str) -> bool:
        return any(any(k.startswith(p) or f".{p}" in k for p in parts) for k in keys)

    if has("x_embedder.", "t_block.", "y_embedder.", "adaln_single.", "caption_projection."):
        return "a PixArt transformer (load it with the PixArt model loader)"
    if has("controlnet_", "before_proj", "after_proj"):
        return "a ControlNet"
    if has("model.diffusion_model.", "input_blocks.", "time_embedding.", "time_embed."):
        return "a UNet / diffusion model"
    if has("transformer_blocks.", "blocks.0.attn"):
        return "a transformer"
    if has("shared.weight", "encoder.block.0.layer.", "text_model.", "token_embedding"):
        return "a text encoder"
    if has("decoder.layers.", "encoder.layers."):
        return "a TAESD tiny autoencoder (not supported; use the full VAE)"
    return "not a VAE"


def _to_diffusers_layout(state: dict, path: str) -> dict:
    """Any supported VAE layout -> diffusers AutoencoderKL keys; refuses other models with what they are."""
    keys = list(state)
    for prefix in _LDM_PREFIXES:  # a full SD checkpoint or a prefixed VAE
        if any(k.startswith(prefix + "decoder.") for k in keys):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            keys = list(state)
            break
    if "decoder.conv_in.weight" not in state:
        sample = ", ".join(keys[:3]) or "no tensors"
        raise PixArtError(f"{path} is {_what_is(keys)}, not a VAE (first keys: {sample}). PixArt needs the SD VAE "
                          "(α/δ) or the SDXL VAE (Σ).")
    if any(k.startswith("decoder.up_blocks.") for k in keys):
        return state
    if not any(k.startswith("decoder.up.") for k in keys):
        raise PixArtError(f"{path}: the decoder layout is neither ldm (decoder.up.N) nor diffusers "
                          "(decoder.up_blocks.N); this is not an SD/SDXL VAE.")
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    ups = {int(k.split(".")[2]) for k in keys if k.startswith("decoder.up.")}
    downs = {int(k.split(".")[2]) for k in keys if k.startswith("encoder.down.")}
    config = {"down_block_types": ["DownEncoderBlock2D"] * len(downs),
              "up_block_types": ["UpDecoderBlock2D"] * len(ups)}
    return convert_ldm_vae_checkpoint(state, config)


def _shape_config(state: dict) -> dict:
    """What the weights themselves say about the architecture (checked against nothing: sizes only)."""
    conv_in = state["decoder.conv_in.weight"]
    latent_channels = conv_in.shape[1]
    if latent_channels != 4:
        raise PixArtError(f"This VAE has {latent_channels} latent channels (SD3/Flux-style); PixArt needs the "
                          "4-channel SD VAE (α/δ) or SDXL VAE (Σ).")
    ups = sorted({int(k.split(".")[2]) for k in state if k.startswith("decoder.up_blocks.")})
    reversed_channels = [state[f"decoder.up_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in ups]
    resnets = {int(k.split(".")[4]) for k in state if k.startswith("decoder.up_blocks.0.resnets.")}
    return dict(
        latent_channels=latent_channels,
        out_channels=state["decoder.conv_out.weight"].shape[0],
        in_channels=state["encoder.conv_in.weight"].shape[1] if "encoder.conv_in.weight" in state else 3,
        block_out_channels=list(reversed(reversed_channels)),
        layers_per_block=len(resnets) - 1,
        down_block_types=["DownEncoderBlock2D"] * len(ups),
        up_block_types=["UpDecoderBlock2D"] * len(ups),
        use_quant_conv="quant_conv.weight" in state or not any(k.startswith("encoder.") for k in state),
        use_post_quant_conv="post_quant_conv.weight" in state,
        mid_block_add_attention=any(k.startswith("decoder.mid_block.attentions.") for k in state),
    )


def _build(config: dict, state: dict, path: str) -> AutoencoderKL:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

    known = set(inspect.signature(AutoencoderKL.__init__).parameters) - {"self"}
    try:
        with torch.device("meta"):
            model = AutoencoderKL(**{k: v for k, v in config.items() if k in known})
    except (ValueError, TypeError) as e:  # e.g. GroupNorm: channels not divisible by norm_num_groups
        raise PixArtError(f"{path}: its tensor shapes do not fit the SD/SDXL VAE settings ({e}). A non-standard VAE "
                          "needs its config.json: load it as a diffusers folder, or pass config_overrides (e.g. "
                          "norm_num_groups).") from e
    decoder_only = not any(k.startswith("encoder.") for k in state)
    expected = set(model.state_dict())
    if decoder_only:
        expected = {k for k in expected if not k.startswith(("encoder.", "quant_conv."))}
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - set(model.state_dict()))
    if missing or unexpected:
        detail = (f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})" if missing else "") + \
                 ("; " if missing and unexpected else "") + \
                 (f"{len(unexpected)} unknown tensors (e.g. {', '.join(unexpected[:3])})" if unexpected else "")
        raise PixArtError(f"{path} does not match an SD/SDXL AutoencoderKL: {detail}. The file is incomplete or a "
                          "different kind of VAE.")
    try:
        model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        raise PixArtError(f"{path}: tensor shapes do not match an SD/SDXL VAE ({str(e)[:300]}).") from e
    if decoder_only:
        model.encoder = None
        model.quant_conv = None
        log.info("VAE %s has no encoder: decode only.", path)
    return model
