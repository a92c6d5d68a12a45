"""Tiny PixArt models for tests, built with diffusers (the reference) and written in every official layout.

The original-layout writer below is the test's own statement of the released key layout (the α repo's
`diffusion/utils/checkpoint.py` save format and model key names), independent of the loader under test, so a
renaming bug in the loader cannot hide behind the same bug here.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_WIDTH = 144  # 2 heads of the XL-2 head width (72), so head-count detection works as on real files
TINY_HEADS = 2


def tiny_diffusers_transformer(
    *,
    family: str = "alpha",
    depth: int = 2,
    sample_size: int = 16,
    micro_conditions: bool | None = None,
    interpolation_scale: float | None = None,
    width: int = TINY_WIDTH,
    heads: int = TINY_HEADS,
    caption_channels: int = 64,
    seed: int = 0,
):
    """A diffusers PixArtTransformer2DModel with random (non-zero everywhere) weights."""
    from diffusers import PixArtTransformer2DModel

    if micro_conditions is None:
        micro_conditions = family == "alpha" and sample_size == 128
    kwargs = dict(
        num_attention_heads=heads,
        attention_head_dim=width // heads,
        in_channels=4,
        out_channels=8,
        num_layers=depth,
        cross_attention_dim=width,
        sample_size=sample_size,
        patch_size=2,
        caption_channels=caption_channels,
        use_additional_conditions=micro_conditions,
        norm_type="ada_norm_single",
        num_embeds_ada_norm=1000,
    )
    if interpolation_scale is not None:
        kwargs["interpolation_scale"] = interpolation_scale
    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(**kwargs)
    with torch.no_grad():
        for p in model.parameters():  # zero-initialised layers would hide mistakes
            p.copy_(torch.randn_like(p) * 0.05)
    return model.eval()


_SIMPLE = {
    "pos_embed.proj.": "x_embedder.proj.",
    "caption_projection.linear_1.": "y_embedder.y_proj.fc1.",
    "caption_projection.linear_2.": "y_embedder.y_proj.fc2.",
    "adaln_single.emb.timestep_embedder.linear_1.": "t_embedder.mlp.0.",
    "adaln_single.emb.timestep_embedder.linear_2.": "t_embedder.mlp.2.",
    "adaln_single.emb.resolution_embedder.linear_1.": "csize_embedder.mlp.0.",
    "adaln_single.emb.resolution_embedder.linear_2.": "csize_embedder.mlp.2.",
    "adaln_single.emb.aspect_ratio_embedder.linear_1.": "ar_embedder.mlp.0.",
    "adaln_single.emb.aspect_ratio_embedder.linear_2.": "ar_embedder.mlp.2.",
    "adaln_single.linear.": "t_block.1.",
    "proj_out.": "final_layer.linear.",
}
_BLOCK = {
    "attn1.to_out.0.": "attn.proj.",
    "attn2.to_q.": "cross_attn.q_linear.",
    "attn2.to_out.0.": "cross_attn.proj.",
    "ff.net.0.proj.": "mlp.fc1.",
    "ff.net.2.": "mlp.fc2.",
}


def original_state_dict(diffusers_sd: dict, text_len: int = 120, caption_channels: int = 64,
                        pos_embed_tokens: int | None = None, width: int = TINY_WIDTH, seed: int = 1) -> dict:
    """The same weights in the original PixArt layout, with the buffers the released .pth files carry."""
    sd = {}
    depth = 1 + max(int(k.split(".")[1]) for k in diffusers_sd if k.startswith("transformer_blocks."))
    for k, v in diffusers_sd.items():
        if k.startswith("transformer_blocks."):
            continue
        if k == "scale_shift_table":
            sd["final_layer.scale_shift_table"] = v
            continue
        for old, new in _SIMPLE.items():
            if k.startswith(old):
                sd[new + k[len(old):]] = v
                break
        else:
            raise KeyError(k)
    for i in range(depth):
        p = f"transformer_blocks.{i}."
        for s in ("weight", "bias"):
            sd[f"blocks.{i}.attn.qkv.{s}"] = torch.cat([diffusers_sd[f"{p}attn1.to_{x}.{s}"] for x in "qkv"])
            sd[f"blocks.{i}.cross_attn.kv_linear.{s}"] = torch.cat([diffusers_sd[f"{p}attn2.to_{x}.{s}"] for x in "kv"])
        sd[f"blocks.{i}.scale_shift_table"] = diffusers_sd[f"{p}scale_shift_table"]
        for old, new in _BLOCK.items():
            for s in ("weight", "bias"):
                sd[f"blocks.{i}.{new}{s}"] = diffusers_sd[f"{p}{old}{s}"]
    g = torch.Generator().manual_seed(seed)
    sd["y_embedder.y_embedding"] = torch.randn(text_len, caption_channels, generator=g) * 0.1
    if pos_embed_tokens:
        sd["pos_embed"] = torch.zeros(1, pos_embed_tokens, width)
    return sd


def write_all_layouts(model, root: Path, *, text_len: int = 120) -> dict[str, Path]:
    """Save one tiny model as: diffusers folder, diffusers single file, original .pth, original .safetensors."""
    from safetensors.torch import save_file

    root = Path(root)
    folder = root / "diffusers_pipeline"
    model.save_pretrained(folder / "transformer")
    dsd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(dsd, root / "diffusers_single.safetensors")
    tokens = (model.config.sample_size // 2) ** 2
    osd = original_state_dict(dsd, text_len=text_len, caption_channels=model.config.caption_channels,
                              pos_embed_tokens=tokens, width=model.config.num_attention_heads * model.config.attention_head_dim)
    torch.save({"state_dict": osd}, root / "original.pth")
    save_file({k: v.contiguous() for k, v in osd.items()}, root / "original.safetensors")
    return {
        "diffusers_folder": folder,
        "diffusers_file": root / "diffusers_single.safetensors",
        "original_pth": root / "original.pth",
        "original_safetensors": root / "original.safetensors",
    }


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def to_ldm(state: dict, num_blocks: int = 4) -> dict:
    """diffusers AutoencoderKL keys -> the original ldm (CompVis) layout, written independently of diffusers'
    converter so that the loader's conversion is checked against the real layout: attention projections as 1x1
    convolutions, up blocks numbered from the bottom, nin_shortcut, norm_out."""
    out = {}
    for key, value in state.items():
        k = key
        if k.startswith("decoder.up_blocks."):
            parts = k.split(".")
            parts[2] = str(num_blocks - 1 - int(parts[2]))
            k = ".".join(parts)
        k = (k.replace("mid_block.resnets.0", "mid.block_1").replace("mid_block.resnets.1", "mid.block_2")
             .replace("down_blocks.", "down.").replace("up_blocks.", "up.").replace(".resnets.", ".block.")
             .replace("downsamplers.0", "downsample").replace("upsamplers.0", "upsample")
             .replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out"))
        if "mid_block.attentions.0" in k:
            k = k.replace("mid_block.attentions.0", "mid.attn_1")
            k = (k.replace("group_norm", "norm").replace("to_q", "q").replace("to_k", "k").replace("to_v", "v")
                 .replace("to_out.0", "proj_out"))
            if value.ndim == 2:
                value = value[:, :, None, None]
        out[k] = value.clone()
    return out
