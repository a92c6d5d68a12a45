"""Write the nano models in the file layouts the project's loaders read for real PixArt models.

- `save_pipeline`: a diffusers pipeline folder like PixArt-LCM-XL-2-1024-MS (model_index.json, transformer/ in the
  diffusers key layout, text_encoder/ (T5EncoderModel), tokenizer/, vae/ (AutoencoderKL), scheduler/).
- `save_original_transformer`: one .safetensors in the ORIGINAL PixArt key layout with the buffers the released .pth
  files carry (pos_embed, y_embedder.y_embedding), like PixArt-XL-2-512x512.pth.
- `save_controlnet`: the PixArt-δ ControlNet key layout (controlnet.{i}.copied_block.*, controlnet.0.before_proj,
  controlnet.{i}.after_proj), without the base model (the loaders take a separately loaded base).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from pixart_core.loading.checkpoint_formats import diffusers_to_original_plan
from pixart_core.controlnet import PixArtControlNet
from pixart_core.transformer import PixArtTransformer, sincos_2d_position_embedding


def _contiguous(sd: dict, dtype: torch.dtype | None) -> dict:
    out = {}
    for k, v in sd.items():
        v = v.detach().cpu()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[k] = v.contiguous()
    return out


def to_diffusers(model: PixArtTransformer):
    """The same weights as a diffusers PixArtTransformer2DModel (the reference implementation)."""
    from diffusers import PixArtTransformer2DModel

    c = model.config
    dm = PixArtTransformer2DModel(
        num_attention_heads=c.num_heads, attention_head_dim=c.head_dim, in_channels=c.in_channels,
        out_channels=c.out_channels, num_layers=c.depth, cross_attention_dim=c.hidden_size,
        sample_size=c.sample_size, patch_size=c.patch_size, caption_channels=c.caption_channels,
        use_additional_conditions=c.micro_conditions, norm_type="ada_norm_single", num_embeds_ada_norm=1000,
    )
    dsd = dm.state_dict()
    plan = diffusers_to_original_plan(list(dsd))
    osd = model.state_dict()
    new = {}
    for orig, parts in plan.items():
        tensor, row = osd[orig], 0
        for part in parts:
            n = dsd[part].shape[0]
            new[part] = tensor[row:row + n] if len(parts) > 1 else tensor
            row += n
    dm.load_state_dict(new, strict=True)
    return dm.eval()


def save_original_transformer(model: PixArtTransformer, path: str | Path, dtype: torch.dtype | None = torch.float16
                              ) -> Path:
    """The model's config.prediction_type goes into the file's safetensors metadata, where the loader reads it."""
    c = model.config
    sd = dict(model.state_dict())
    grid = c.sample_size // c.patch_size
    sd["pos_embed"] = sincos_2d_position_embedding(c.hidden_size, grid, grid, grid, c.pe_interpolation)[None]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(_contiguous(sd, dtype), str(path), metadata={"prediction_type": c.prediction_type})
    return path


def save_controlnet(cn: PixArtControlNet, path: str | Path, dtype: torch.dtype | None = torch.float16) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(_contiguous(cn.state_dict(), dtype), str(path))
    return path


def save_pipeline(folder: str | Path, transformer: PixArtTransformer, t5, tokenizer_dir: str | Path, vae,
                  scheduler: str = "lcm", dtype: torch.dtype | None = torch.float16) -> Path:
    """A diffusers PixArtAlphaPipeline folder. scheduler: "lcm" (LCMScheduler) or "dpm" (DPMSolverMultistep).
    The transformer's config.prediction_type goes into the scheduler config, where diffusers records it."""
    import shutil

    from diffusers import DPMSolverMultistepScheduler, LCMScheduler

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dm = to_diffusers(transformer)
    if dtype is not None:
        dm = dm.to(dtype)
    dm.save_pretrained(folder / "transformer", safe_serialization=True)
    t5.save_pretrained(folder / "text_encoder", safe_serialization=True)
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    tok_out = folder / "tokenizer"
    tok_out.mkdir(exist_ok=True)
    for f in Path(tokenizer_dir).iterdir():
        shutil.copy(f, tok_out / f.name)
    common = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                  prediction_type=transformer.config.prediction_type)
    if scheduler == "lcm":
        sch = LCMScheduler(**common, original_inference_steps=50, clip_sample=False, set_alpha_to_one=True,
                           timestep_scaling=10.0)
    else:
        sch = DPMSolverMultistepScheduler(**common)
    sch.save_pretrained(folder / "scheduler")
    import diffusers

    index = {
        "_class_name": "PixArtAlphaPipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", type(sch).__name__],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "transformer": ["diffusers", "PixArtTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def folder_size(path: str | Path) -> int:
    p = Path(path)
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
