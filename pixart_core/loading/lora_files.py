"""Reading LoRA files for the PixArt transformer into low-rank terms named after our transformer's layers.

Files: `.safetensors`, and `.bin/.pt/.pth` only through torch.load(weights_only=True).
Key formats (module names on diffusers' PixArt names, or on the original ones):
- `transformer.<diffusers name>` (diffusers' save_lora_weights), `base_model.model.<name>` (diffusers' PixArt
  training script, PEFT's save_pretrained), `unet.base_model.model.<name>` (the old PEFT script), no prefix, and
  `diffusion_model.<original name>`;
- PEFT `lora_A` / `lora_B` (an adapter name between, `lora_A.default.weight`, is allowed) and kohya `lora_down` /
  `lora_up` + `alpha`, the kohya module names with underscores (`lora_unet_`, `lora_transformer_`, `lycoris_`).
Scale = alpha / rank: kohya files carry alpha per layer; PEFT files carry none, so it is read from diffusers'
safetensors metadata (`lora_adapter_metadata`) or PEFT's adapter_config.json beside the file, else alpha = rank
(scale 1, as diffusers and ComfyUI assume). LoHa, LoKr, DoRA and LoCon mid weights are refused naming the type; a
LoRA for another model (SD/SDXL UNet, Flux, SD3) is refused naming what it is.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import PixArtError
from .checkpoint_formats import (PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, StateDictSource, diffusers_name_to_original,
                                 safe_torch_load)

log = logging.getLogger("pixart_delta")

_PREFIXES = ("unet.base_model.model.", "base_model.model.", "transformer.", "model.diffusion_model.",
             "diffusion_model.")
_KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_", "lycoris_")
# Names with underscores of their own, which kohya's '.' -> '_' flattening hides (longest restored first).
_UNDERSCORED = sorted((
    "transformer_blocks", "adaln_single", "timestep_embedder", "resolution_embedder", "aspect_ratio_embedder",
    "caption_projection", "linear_1", "linear_2", "to_q", "to_k", "to_v", "to_out", "proj_out", "pos_embed",
    "x_embedder", "t_embedder", "y_embedder", "y_proj", "t_block", "csize_embedder", "ar_embedder", "final_layer",
    "q_linear", "kv_linear", "cross_attn"), key=len, reverse=True)
_PAIR = re.compile(r"^(.*)\.(lora_A|lora_B|lora_down|lora_up)(?:\.[\w-]+)?\.weight$")
# Adapter types other than LoRA, by the name that follows the layer name in their keys.
_OTHER_TYPES = {"hada": "LoHa (LyCORIS)", "lokr": "LoKr (LyCORIS)", "lora_magnitude_vector": "DoRA",
                "dora_scale": "DoRA", "lora_mid": "LoCon with a Tucker mid weight", "diff": "full weight difference"}
_OTHER_TYPE_KEY = re.compile(r"\.(hada|lokr)_\w+$|\.(lora_magnitude_vector|dora_scale|lora_mid|diff)(_b)?(\.|$)")
# Key fragments that only other models have, and what the file then is.
_FOREIGN = (
    (("lora_unet_down_blocks", "lora_unet_up_blocks", "lora_unet_mid_block", "down_blocks.", "up_blocks.",
      "mid_block."), "a Stable Diffusion / SDXL UNet LoRA"),
    (("double_blocks", "single_blocks", "single_transformer_blocks", "add_q_proj", "context_embedder"),
     "a Flux LoRA"),
    (("joint_blocks", "context_block"), "an SD3 LoRA"),
)


@dataclass
class LoraTerm:
    """One low-rank update: the layer's output rows part*out/parts.. gain scale * up @ down @ x."""

    target: str  # our transformer's module name, e.g. blocks.0.attn.qkv
    down: torch.Tensor  # (rank, in)
    up: torch.Tensor  # (out / parts, rank)
    scale: float  # alpha / rank
    part: int = 0  # which of the fused projections (attn1.to_k is part 1 of 3 of attn.qkv)
    parts: int = 1
    source: str = ""  # the module name as the file spells it


@dataclass(eq=False)
class LoraFile:
    name: str
    terms: list[LoraTerm]
    ignored: list[str] = field(default_factory=list)  # keys the reader could not use (listed in one warning)


def load_lora(path: str | os.PathLike) -> LoraFile:
    """Read a LoRA file. Every problem is a PixArtError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise PixArtError(f"LoRA file {path} does not exist.")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        state, metadata = _read_safetensors(path)
    elif suffix in PICKLE_SUFFIXES:
        state, metadata = safe_torch_load(path), {}
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise PixArtError(f"{path.name} holds no dict of tensors; it is not a LoRA file.")
    else:
        raise PixArtError(f"{path.name}: unsupported LoRA file type '{suffix}'. Use .safetensors (or .bin/.pt).")
    return parse_lora(state, path.name, _alpha_config(path, metadata))


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and the header metadata, through the checkpoint reader (header and size checked first, so a
    damaged or truncated file is refused with the same message as a damaged model file)."""
    source = StateDictSource(path, files=[path])
    return dict(source.iter_tensors()), source.metadata


def _alpha_config(path: Path, metadata: dict) -> dict:
    """PEFT's alpha settings: diffusers' safetensors metadata, else adapter_config.json beside the file."""
    text = metadata.get("lora_adapter_metadata")
    if text:
        try:
            packed = json.loads(text)
        except ValueError:
            packed = {}
        # diffusers prefixes every entry with the component ("transformer.lora_alpha")
        return {k.split(".", 1)[1]: v for k, v in packed.items() if k.startswith("transformer.")} or packed
    config = path.with_name("adapter_config.json")
    if config.is_file():
        try:
            return json.loads(config.read_text())
        except ValueError as e:
            raise PixArtError(f"{config} beside the LoRA is not valid JSON ({e}).") from e
    return {}


def parse_lora(state: dict[str, torch.Tensor], name: str, config: dict | None = None) -> LoraFile:
    """The terms of a LoRA state dict; config holds PEFT's lora_alpha / alpha_pattern / use_rslora when known."""
    config = config or {}
    keys = list(state)
    _refuse_foreign(keys, name)
    if config.get("use_dora"):
        raise PixArtError(f"{name} is a DoRA adapter; only plain LoRA is supported. Use a LoRA file.")
    pairs: dict[str, dict[str, str]] = {}
    ignored: list[str] = []
    for k in keys:
        m = _PAIR.match(k)
        if m:
            pairs.setdefault(m.group(1), {})[m.group(2)] = k
        elif not k.endswith(".alpha"):
            ignored.append(k)
    terms = []
    for module, found in pairs.items():
        down_key = found.get("lora_A") or found.get("lora_down")
        up_key = found.get("lora_B") or found.get("lora_up")
        if down_key is None or up_key is None:
            ignored += list(found.values())
            continue
        term = _term(module, state[down_key], state[up_key], state.get(f"{module}.alpha"), config, name)
        if term is None:
            ignored += [down_key, up_key]
        else:
            terms.append(term)
    if not terms:
        raise PixArtError(f"{name} holds no LoRA weights for a PixArt transformer (first keys: "
                          f"{', '.join(keys[:4]) or 'none'}). It is not a PixArt LoRA.")
    return LoraFile(name, terms, ignored)


def _refuse_foreign(keys: list[str], name: str) -> None:
    for k in keys:
        m = _OTHER_TYPE_KEY.search(k)
        if m:
            raise PixArtError(f"{name} is a {_OTHER_TYPES[m.group(1) or m.group(2)]} adapter, which this loader does "
                              "not support; use a plain LoRA (lora_A/lora_B or lora_down/lora_up weights).")
    for fragments, what in _FOREIGN:
        if any(f in k for k in keys for f in fragments):
            raise PixArtError(f"{name} is {what}, not a PixArt LoRA; load it with the nodes of that model.")


def _term(module: str, down: torch.Tensor, up: torch.Tensor, alpha: torch.Tensor | None, config: dict,
          name: str) -> LoraTerm | None:
    target, part, parts = diffusers_name_to_original(_dotted(module))
    if down.ndim != 2 or up.ndim != 2:
        if down.ndim == 4 and down.shape[2:] == (1, 1) and up.ndim == 4 and up.shape[2:] == (1, 1):
            down, up = down.flatten(1), up.flatten(1)  # kohya stores some Linear LoRAs as 1x1 convolutions
        else:
            return None  # a convolution LoRA (patch embedding): listed as ignored
    rank = down.shape[0]
    if up.shape[1] != rank:
        raise PixArtError(f"{name} is inconsistent: layer '{module}' has a down/A matrix of rank {rank} but an "
                          f"up/B matrix of rank {up.shape[1]}. The file is damaged or wrongly converted.")
    if alpha is not None:
        scale = float(alpha) / rank
    else:
        a = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", rank))
        scale = float(a) / (math.sqrt(rank) if config.get("use_rslora") else rank)
    return LoraTerm(target, down, up, scale, part, parts, module)  # kept in the file's dtype


def _dotted(module: str) -> str:
    """A file's module name without its wrapper prefix, in dotted form (kohya's underscored names restored)."""
    for prefix in _PREFIXES:
        if module.startswith(prefix):
            return module[len(prefix):]
    for prefix in _KOHYA_PREFIXES:
        if module.startswith(prefix):
            dotted = module[len(prefix):].replace("_", ".")
            for token in _UNDERSCORED:
                dotted = dotted.replace(token.replace("_", "."), token)
            return dotted
    return module


def _pattern_value(patterns: dict | None, module: str, default):
    """PEFT's per-layer override: a pattern matches the end of the module name (peft.tuners.tuners_utils)."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default
