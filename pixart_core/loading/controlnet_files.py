"""Reading a PixArt-δ ControlNet from a file: what it holds (from key names and shapes only) and its weights.

Key layouts accepted:
- original (`PixArt-XL-2-{512,1024}-ControlNet.pth`): `base_model.*` + `controlnet.{i}.copied_block.*`,
  `controlnet.0.before_proj.*`, `controlnet.{i}.after_proj.*`: the module names of PixArtControlNet, read as they are.
- diffusers research project (`PixArtControlNetAdapterModel`): `controlnet_blocks.{i}.before_proj / transformer_block
  (BasicTransformerBlock keys) / after_proj`, renamed with the same block plan as the diffusers transformer.
"""

from __future__ import annotations

import os
import re

import torch

from ..config import ALPHA, SIGMA
from ..controlnet import ControlNetInfo, PixArtControlNet
from ..errors import PixArtError
from ..transformer import PixArtTransformer
from .checkpoint import BASE_PREFIX, detect, guess_num_heads, load_transformer
from .checkpoint_formats import (
    StateDictSource,
    block_key_plan,
    materialise,
    open_checkpoint,
    planned_shape,
    verify_plan,
)

ORIGINAL_PREFIX = "controlnet."
DIFFUSERS_BLOCKS = "controlnet_blocks."


def _diffusers_prefix(keys: list[str]) -> str | None:
    """The text in front of `controlnet_blocks.` (e.g. 'controlnet.' in a saved PixArtControlNetTransformerModel)."""
    for k in keys:
        i = k.find(DIFFUSERS_BLOCKS)
        if i == 0 or (i > 0 and k[i - 1] == "."):
            return k[:i]
    return None


def _controlnet_plan(keys: list[str]) -> tuple[str, dict[str, list[str]]]:
    """(layout, model key -> file key(s)) for the ControlNet part of a file."""
    keyset = set(keys)
    prefix = _diffusers_prefix(keys)
    if prefix is not None:
        inner = prefix + DIFFUSERS_BLOCKS
        ids = sorted({int(m.group(1)) for k in keys if (m := re.match(re.escape(inner) + r"(\d+)\.", k))})
        plan: dict[str, list[str]] = {}
        for i in ids:
            src = f"{inner}{i}."
            plan.update(block_key_plan(f"{src}transformer_block.", f"controlnet.{i}.copied_block.", keyset))
            for k in keys:
                if k.startswith(src) and not k.startswith(f"{src}transformer_block."):
                    plan[f"controlnet.{i}.{k[len(src):]}"] = [k]
        return "diffusers", plan
    ctrl = [k for k in keys if k.startswith(ORIGINAL_PREFIX)]
    if not ctrl:
        base_keys = ("blocks.", "x_embedder.", "transformer_blocks.", BASE_PREFIX)
        looks_like_base = any(k.startswith(base_keys) for k in keys)
        raise PixArtError(
            "This file contains no ControlNet weights"
            + (" (it is a plain PixArt transformer: load it with the model loader)" if looks_like_base else "")
            + ". Expected the PixArt-δ ControlNet layout (controlnet.{i}.copied_block.*, as in "
            "PixArt-XL-2-1024-ControlNet.pth) or the diffusers research layout (controlnet_blocks.{i}.*)."
        )
    layout = "controlnet-combined" if any(k.startswith(BASE_PREFIX) for k in keys) else "original"
    return layout, {k: [k] for k in ctrl}


def detect_controlnet(
    shapes: dict[str, tuple], file_config: dict | None = None, num_heads: int | None = None, family: str | None = None,
) -> tuple[ControlNetInfo, dict[str, list[str]]]:
    """What ControlNet a file holds (from key names and shapes only) and the plan to read it in the original layout."""
    keys = list(shapes)
    layout, plan = _controlnet_plan(keys)
    ids = {int(m.group(1)) for k in plan if (m := re.match(r"controlnet\.(\d+)\.", k))}
    n = max(ids) + 1 if ids else 0
    if not ids or sorted(ids) != list(range(n)):
        raise PixArtError(f"The ControlNet is incomplete: found control blocks {sorted(ids)}, expected 0..{n - 1}. "
                          "Download the file again.")
    after = planned_shape(plan, shapes, "controlnet.0.after_proj.weight")
    fc1 = planned_shape(plan, shapes, "controlnet.0.copied_block.mlp.fc1.weight")
    if after is None or fc1 is None or planned_shape(plan, shapes, "controlnet.0.before_proj.weight") is None:
        raise PixArtError("The ControlNet is incomplete: control block 0 lacks after_proj, before_proj or its copied "
                          "block. Download the file again.")
    hidden = after[0]
    assumed: list[str] = []

    base = None
    if layout == "controlnet-combined":
        base = detect(shapes, file_config,
                      {k: v for k, v in {"num_heads": num_heads, "family": family}.items() if v is not None})
    heads = num_heads or (base.config.num_heads if base else None) or (file_config or {}).get("num_attention_heads")
    if heads is None:
        heads = guess_num_heads(hidden, "ControlNet")
        assumed.append(f"num_heads={heads} (head width {hidden // heads})")
    if family is None:
        if base is not None:
            family = base.config.family
        else:
            family = ALPHA
            assumed.append("family=alpha (every released PixArt ControlNet is α; set family for a Σ one)")
    if family not in (ALPHA, SIGMA):
        raise PixArtError(f"family must be 'alpha' or 'sigma', not {family!r}.")

    info = ControlNetInfo(
        num_copies=n, hidden_size=hidden, num_heads=int(heads), mlp_ratio=fc1[0] / hidden,
        qk_norm=planned_shape(plan, shapes, "controlnet.0.copied_block.attn.q_norm.weight") is not None, family=family,
        text_len=base.config.text_len if base else None,
        caption_channels=base.config.caption_channels if base else None,
        sample_size=base.config.sample_size if base else None, layout=layout,
        assumed=assumed + (base.assumed if base else []),
    )
    return info, plan


def _verify(model: PixArtControlNet, plan: dict[str, list[str]], shapes: dict[str, tuple]) -> None:
    verify_plan(
        {k: tuple(v.shape) for k, v in model.state_dict().items()}, plan, shapes,
        mismatch=f"The ControlNet does not match the PixArt-δ ControlNet layout ({model.num_copies} control blocks of "
                 f"width {model.info.hidden_size}). ",
        kind="a ControlNet type", tensor_label="ControlNet tensor", needed_by="ControlNet",
    )


def load_controlnet(
    path: str | os.PathLike | StateDictSource,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    num_heads: int | None = None,
    family: str | None = None,
) -> PixArtControlNet:
    """Load the ControlNet part of a released combined file (.pth / .safetensors) or of a diffusers research
    checkpoint (file or folder). `num_heads` and `family` override what the file cannot say (see `.info.assumed`)."""
    source = path if isinstance(path, StateDictSource) else open_checkpoint(path)
    shapes = source.shapes()
    info, plan = detect_controlnet(shapes, source.config, num_heads, family)
    with torch.device("meta"):
        model = PixArtControlNet(info)
    _verify(model, plan, shapes)
    model.load_state_dict(materialise(source, plan, dtype), strict=True, assign=True)
    model.eval().requires_grad_(False)
    model.to(device)
    model.source_path = str(source.path)
    return model


def load_combined(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
    overrides: dict | None = None,
) -> tuple[PixArtTransformer, PixArtControlNet | None]:
    """Base transformer and ControlNet from one file, read once (None when the file has no ControlNet)."""
    source = open_checkpoint(path)
    base = load_transformer(source, dtype=dtype, device=device, overrides=overrides)
    if not base.detection.has_controlnet:
        return base, None
    controlnet = load_controlnet(source, dtype=dtype, device=device, num_heads=base.config.num_heads,
                                 family=base.config.family)
    return base, controlnet
