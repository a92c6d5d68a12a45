"""Detect what a checkpoint is from its keys and shapes, and load it into a PixArtTransformer.

Detection never trusts the file name. What the weights cannot say (the head count of an unusual width, the training
size of a diffusers file without config.json) comes from config.json, else the official defaults, else an override;
`describe()` reports which values were read and which assumed.

Loading builds the model on the meta device (no random fp32 init) and assigns each tensor from the file, cast to the
requested dtype as it is read, so peak memory stays near one copy of the weights.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint_formats import (
    StateDictSource,
    diffusers_to_original_plan,
    is_diffusers_layout,
    materialise,
    open_checkpoint,
    original_plan,
    planned_shape,
    strip_prefix,
    verify_plan,
)
from ..config import ALPHA, EPSILON, PREDICTION_TYPES, SIGMA, PixArtConfig, default_pe_interpolation
from ..errors import PixArtError
from ..memory import return_freed_memory
from ..quantize import check_mode as check_weight_mode, quantize_transformer
from ..transformer import PixArtTransformer

CONTROLNET_PREFIX = "controlnet."
BASE_PREFIX = "base_model."

_FOREIGN_SIGNATURES = [
    (("input_blocks.", "model.diffusion_model.input_blocks.", "down_blocks.0.resnets."),
     "a Stable Diffusion UNet", "Load it with ComfyUI's own checkpoint loader; this loader takes PixArt transformers."),
    (("encoder.down.", "decoder.up.", "first_stage_model.", "encoder.down_blocks.", "decoder.up_blocks."),
     "a VAE", "Load it with the PixArt Load VAE node (models/vae)."),
    (("encoder.block.", "shared.weight"), "a T5 text encoder",
     "Load it with the PixArt Load T5 Encoder node (models/text_encoders)."),
    (("double_blocks.", "joint_blocks."), "a Flux/SD3 model", "This loader takes PixArt α/Σ/δ transformers only."),
]


@dataclass
class Detection:
    """What a checkpoint is, plus where each fact came from."""

    config: PixArtConfig
    layout: str  # "original" | "diffusers" | "controlnet-combined"
    plan: dict[str, list[str]]  # model key -> file key(s)
    assumed: list[str] = field(default_factory=list)  # facts not in the file
    controlnet_keys: list[str] = field(default_factory=list)
    controlnet_layout: str | None = None

    @property
    def has_controlnet(self) -> bool:
        return bool(self.controlnet_keys)

    def summary(self) -> dict:
        c = self.config
        info = {
            "family": c.family,
            "variant": variant_name(c),
            "layout": self.layout,
            "depth": c.depth,
            "hidden_size": c.hidden_size,
            "num_heads": c.num_heads,
            "text_len": c.text_len,
            "micro_conditions": c.micro_conditions,
            "sample_size": c.sample_size,
            "resolution": c.bin_size,
            "pe_interpolation": c.pe_interpolation,
            "qk_norm": c.qk_norm,
            "kv_compress_layers": list(c.kv_compress_layers),
            "learned_sigma": c.learned_sigma,
            "prediction_type": c.prediction_type,
            "null_embedding": c.has_null_embedding,
            "latent_scale": c.latent_scale,
            "has_controlnet": self.has_controlnet,
            "assumed": list(self.assumed),
        }
        return info


def variant_name(c: PixArtConfig) -> str:
    size = {32: "256", 64: "512", 128: "1024", 256: "2K"}.get(c.sample_size, f"{c.bin_size}px")
    name = "PixArt-α" if c.family == ALPHA else "PixArt-Σ"
    ms = "-MS" if (c.micro_conditions or c.family == SIGMA) and c.sample_size >= 64 else ""
    depth = "XL-2" if (c.depth, c.hidden_size) == (28, 1152) else f"depth {c.depth}, width {c.hidden_size}"
    return f"{name} {depth} {size}{ms}"


def guess_num_heads(hidden: int, what: str) -> int:
    """The head count of a width the weights cannot explain: the XL-2 head width (72) if it divides, else 64."""
    for head_width in (72, 64):
        if hidden % head_width == 0:
            return hidden // head_width
    raise PixArtError(f"Cannot tell the attention head count of a width-{hidden} {what}; pass num_heads.")


def _check_foreign(keys: list[str]) -> None:
    for prefixes, what, fix in _FOREIGN_SIGNATURES:
        hits = sum(1 for k in keys if k.startswith(prefixes))
        if hits and hits >= len(keys) // 4:
            raise PixArtError(f"This file looks like {what}, not a PixArt transformer "
                              f"(found keys such as '{next(k for k in keys if k.startswith(prefixes))}'). {fix}")


def _split_controlnet(keys: list[str]) -> tuple[str, list[str]]:
    """For a combined ControlNet file (base_model.* + controlnet.*): the base prefix and the ControlNet keys."""
    if any(k.startswith(BASE_PREFIX) for k in keys) and any(k.startswith(CONTROLNET_PREFIX) for k in keys):
        return BASE_PREFIX, [k for k in keys if k.startswith(CONTROLNET_PREFIX)]
    return "", []


def _count_blocks(shapes: dict[str, tuple]) -> int:
    ids = {int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not ids:
        return 0
    depth = max(ids) + 1
    missing = sorted(set(range(depth)) - ids)
    if missing:
        raise PixArtError(f"The checkpoint is incomplete: transformer blocks {missing} are missing (found "
                          f"{len(ids)} of {depth}). Download the file again.")
    return depth


def detect(shapes: dict[str, tuple], file_config: dict | None = None, overrides: dict | None = None,
           prediction_type: str | None = None) -> Detection:
    """Work out the model from key names and shapes (no tensor data needed, so it also runs on the meta device).
    prediction_type: what the files record (StateDictSource.prediction_type); epsilon when they record nothing."""
    keys = list(shapes)
    overrides = dict(overrides or {})
    file_config = file_config or {}
    if not keys:
        raise PixArtError("The checkpoint is empty: it contains no tensors.")
    _check_foreign(keys)

    base_prefix, controlnet_keys = _split_controlnet(keys)
    controlnet_layout = "original" if controlnet_keys else None
    if not controlnet_keys and any(k.startswith("controlnet_blocks.") for k in keys):
        controlnet_keys = [k for k in keys if k.startswith("controlnet_blocks.")]
        controlnet_layout = "diffusers"
    base_keys = [k for k in keys if k not in set(controlnet_keys)]
    if base_prefix:
        base_keys = [k for k in base_keys if k.startswith(base_prefix)]
        plan = original_plan(base_keys, base_prefix)
        layout = "controlnet-combined"
    elif is_diffusers_layout(base_keys):
        plan = diffusers_to_original_plan(base_keys)
        layout = "diffusers"
    else:
        prefix = strip_prefix(base_keys)
        plan = original_plan(base_keys, prefix)
        layout = "original"
    if not controlnet_keys and not any(k.startswith(("blocks.", "x_embedder.")) for k in plan):
        raise PixArtError(
            "This file is not a PixArt transformer: none of its keys look like one "
            f"(first keys: {', '.join(keys[:4])}). Expected keys such as 'x_embedder.proj.weight' and 'blocks.0.attn.qkv.weight'."
        )

    def shape_of(model_key: str) -> tuple | None:
        return planned_shape(plan, shapes, model_key)

    assumed: list[str] = []
    required = ["x_embedder.proj.weight", "t_block.1.weight", "y_embedder.y_proj.fc1.weight", "final_layer.linear.weight"]
    missing = [k for k in required if shape_of(k) is None]
    if missing:
        raise PixArtError(f"The checkpoint is incomplete or not a PixArt transformer: missing {missing}. "
                          f"It has {len(keys)} tensors; expected the PixArt key layout.")

    w = shape_of("x_embedder.proj.weight")
    hidden, in_ch, patch = w[0], w[1], w[2]
    depth = _count_blocks({k: v for k, v in ((k, shape_of(k)) for k in plan)})
    caption_channels = shape_of("y_embedder.y_proj.fc1.weight")[1]
    out_channels = shape_of("final_layer.linear.weight")[0] // (patch * patch)
    micro = shape_of("csize_embedder.mlp.0.weight") is not None
    y_emb = shape_of("y_embedder.y_embedding")
    qk_norm = shape_of("blocks.0.attn.q_norm.weight") is not None
    kv_layers = tuple(i for i in range(depth) if shape_of(f"blocks.{i}.attn.sr.weight") is not None)
    kv_scale = shape_of(f"blocks.{kv_layers[0]}.attn.sr.weight")[-1] if kv_layers else 2
    mlp_hidden = shape_of("blocks.0.mlp.fc1.weight")
    mlp_ratio = mlp_hidden[0] / hidden if mlp_hidden else 4.0

    # Heads: not in the weights. config.json says it; else the XL-2 head width (72), else an override.
    heads = overrides.pop("num_heads", None) or file_config.get("num_attention_heads")
    if heads is None and hidden == 1152:
        heads = 16  # every released PixArt (XL-2, the 900M community models, ControlNet bases)
    if heads is None:
        heads = guess_num_heads(hidden, "model")
        assumed.append(f"num_heads={heads} (head width {hidden // heads})")

    # Family: micro-conditions only exist in α; 300 null tokens mean Σ; config.json of Σ has interpolation_scale.
    family = overrides.pop("family", None)
    if family is None:
        if micro:
            family = ALPHA
        elif y_emb is not None:
            family = SIGMA if y_emb[0] >= 300 else ALPHA
        elif file_config.get("interpolation_scale") is not None:
            family = SIGMA  # only Σ configs set it; α configs leave it to diffusers' default
        elif file_config:
            family = ALPHA
        else:
            family = SIGMA
            assumed.append("family=sigma (a diffusers file without config.json does not say; set family if α)")
    if family not in (ALPHA, SIGMA):
        raise PixArtError(f"family must be 'alpha' or 'sigma', not {family!r}.")

    text_len = overrides.pop("text_len", None)  # the user's own value is never reported as assumed
    if text_len is None:
        text_len = y_emb[0] if y_emb is not None else (120 if family == ALPHA else 300)
        if y_emb is None:
            assumed.append(f"text_len={text_len} (from the family)")

    # Training size: the stored pos_embed buffer says it; else config.json; else the family's usual size.
    sample_size = overrides.pop("sample_size", None)
    if sample_size is None:
        pe = shape_of("pos_embed")
        if pe is not None and len(pe) == 3:
            sample_size = int(round(math.sqrt(pe[1]))) * patch
        elif "sample_size" in file_config:
            sample_size = int(file_config["sample_size"])
        else:
            sample_size = 128
            assumed.append("sample_size=128 (1024 px; nothing in the file says — set sample_size for 256/512/2K models)")

    pe_interp = overrides.pop("pe_interpolation", None)
    if pe_interp is None:
        if file_config.get("interpolation_scale") is not None:
            pe_interp = float(file_config["interpolation_scale"])
        else:
            # The official inference scripts' value for this training size (α-256 is 1.0, Σ-256 0.5).
            pe_interp = float(default_pe_interpolation(family, sample_size))

    micro_override = overrides.pop("micro_conditions", None)
    if micro_override is not None and bool(micro_override) != micro:
        raise PixArtError("micro_conditions cannot be overridden: the file "
                          f"{'has' if micro else 'has no'} size/aspect-ratio embedders.")
    prediction = overrides.pop("prediction_type", None) or prediction_type or EPSILON
    if prediction not in PREDICTION_TYPES:
        raise PixArtError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, not {prediction!r}.")
    if overrides:
        raise PixArtError(f"Unknown override(s): {sorted(overrides)}. Known: num_heads, family, text_len, "
                          "sample_size, pe_interpolation, prediction_type.")

    config = PixArtConfig(
        family=family, depth=depth, hidden_size=hidden, num_heads=int(heads), patch_size=patch,
        in_channels=in_ch, out_channels=out_channels, caption_channels=caption_channels, text_len=int(text_len),
        micro_conditions=micro, sample_size=int(sample_size), pe_interpolation=float(pe_interp), qk_norm=qk_norm,
        kv_compress_layers=kv_layers, kv_compress_scale=int(kv_scale), has_null_embedding=y_emb is not None,
        mlp_ratio=mlp_ratio, prediction_type=prediction,
    )
    plan.pop("pos_embed", None)  # recomputed for every size
    return Detection(config, layout, plan, assumed, controlnet_keys, controlnet_layout)


def _verify_keys(model: PixArtTransformer, plan: dict[str, list[str]], shapes: dict[str, tuple]) -> None:
    verify_plan(
        {k: tuple(v.shape) for k, v in model.state_dict().items()}, plan, shapes,
        mismatch="The checkpoint does not match a PixArt transformer of the detected shape "
                 f"(depth {model.config.depth}, width {model.config.hidden_size}). ",
        kind="a model type", tensor_label="Tensor", needed_by="model",
    )


def build_empty(config: PixArtConfig) -> PixArtTransformer:
    """A model with no storage (meta device): shapes only, for detection checks and for loading."""
    with torch.device("meta"):
        return PixArtTransformer(config)


def load_transformer(
    path: str | os.PathLike | StateDictSource,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    overrides: dict | None = None,
    weights: str = "none",
) -> PixArtTransformer:
    """Load any supported PixArt checkpoint. The model's `.detection` says what was found.

    weights: "none" keeps the block weights in `dtype`; "int8" / "fp8" / "int8-dynamic" store them in 8 bits after the
    load (see quantize.py), layer by layer, so the extra memory is one Linear. int8 weights stay on `device`."""
    check_weight_mode(weights, torch.device(device).type, "weight storage")  # before the read, not after it
    source = path if isinstance(path, StateDictSource) else open_checkpoint(path)
    detection = detect(source.shapes(), source.config, overrides, source.prediction_type)
    model = build_empty(detection.config)
    _verify_keys(model, detection.plan, source.shapes())
    state = materialise(source, detection.plan, dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.eval().requires_grad_(False)
    model.to(device)
    model.detection = detection
    model.source_path = str(source.path)
    return_freed_memory()  # the file's tensors converted while reading were freed; glibc would keep them mapped
    return quantize_transformer(model, weights)


def describe(path: str | os.PathLike, overrides: dict | None = None) -> dict:
    """What a checkpoint is, without loading its weights."""
    source = open_checkpoint(path)
    detection = detect(source.shapes(), source.config, overrides, source.prediction_type)
    _verify_keys(build_empty(detection.config), detection.plan, source.shapes())
    info = detection.summary()
    info["path"] = str(Path(path))
    dtypes = {str(d).replace("torch.", "") for d in source.dtypes().values()}
    info["stored_dtypes"] = sorted(dtypes)
    return info


def read_state_dict(path: str | os.PathLike, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The transformer's weights in the original key layout, whatever layout the file uses."""
    source = open_checkpoint(path)
    detection = detect(source.shapes(), source.config)
    return materialise(source, detection.plan, dtype)
