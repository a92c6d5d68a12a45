"""A stand-in for the part of ComfyUI the pack imports (comfy.model_management, comfy.model_patcher, comfy.utils,
comfy.latent_formats, folder_paths, latent_preview), so the pack can be imported and run in its "inside ComfyUI"
mode without a ComfyUI checkout. `install(models_root, comfy_dir)` puts the modules into sys.modules;
`snapshot()` records every attribute of them (and of the classes they define) by identity."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import torch

MODULES = ("comfy", "comfy.model_management", "comfy.model_patcher", "comfy.utils", "comfy.latent_formats",
           "folder_paths", "latent_preview")


def _model_management() -> types.ModuleType:
    mm = types.ModuleType("comfy.model_management")
    cpu = torch.device("cpu")
    for name in ("get_torch_device", "unet_offload_device", "text_encoder_device", "text_encoder_offload_device",
                 "vae_device", "vae_offload_device", "intermediate_device"):
        setattr(mm, name, lambda *a, **k: cpu)
    mm.should_use_bf16 = mm.should_use_fp16 = lambda *a, **k: False
    mm.vae_dtype = lambda *a, **k: torch.float32
    mm.soft_empty_cache = lambda *a, **k: None
    mm.throw_exception_if_processing_interrupted = lambda: None
    mm.unload_all_models = lambda: None
    mm.loaded = []

    def load_models_gpu(patchers, memory_required=0, force_full_load=False, **kwargs):
        for p in patchers:
            p.model.to(p.load_device)
            mm.loaded.append(p)

    mm.load_models_gpu = load_models_gpu
    return mm


class ModelPatcher:
    def __init__(self, model, load_device, offload_device, **kwargs):
        self.model, self.load_device, self.offload_device = model, load_device, offload_device


class ProgressBar:
    def __init__(self, total):
        self.total, self.current = total, 0

    def update_absolute(self, value, total=None, preview=None):
        self.current = value


def install(models_root: Path, comfy_dir: Path, tokenizer_dir: Path) -> dict[str, types.ModuleType]:
    """comfy_dir: a folder standing for ComfyUI's comfy/ (the T5 tokenizer is linked into text_encoders/ there)."""
    (comfy_dir / "text_encoders").mkdir(parents=True, exist_ok=True)
    link = comfy_dir / "text_encoders" / "t5_tokenizer"
    if not link.exists():
        link.symlink_to(tokenizer_dir, target_is_directory=True)
    comfy = types.ModuleType("comfy")
    comfy.__path__ = [str(comfy_dir)]
    latent_formats = types.ModuleType("comfy.latent_formats")
    latent_formats.__file__ = str(comfy_dir / "latent_formats.py")
    latent_formats.SD15 = type("SD15", (), {})
    latent_formats.SDXL = type("SDXL", (), {})
    patcher, utils = types.ModuleType("comfy.model_patcher"), types.ModuleType("comfy.utils")
    patcher.ModelPatcher, utils.ProgressBar = ModelPatcher, ProgressBar
    folder_paths = types.ModuleType("folder_paths")
    folder_paths.get_folder_paths = lambda folder: [str(models_root / folder)]

    def get_filename_list(folder):
        root = models_root / folder
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.is_dir() else []

    folder_paths.get_filename_list = get_filename_list
    folder_paths.get_full_path = lambda folder, name: str(models_root / folder / name)
    preview = types.ModuleType("latent_preview")
    preview.get_previewer = lambda device, fmt: None
    modules = {"comfy": comfy, "comfy.model_management": _model_management(), "comfy.model_patcher": patcher,
               "comfy.utils": utils, "comfy.latent_formats": latent_formats, "folder_paths": folder_paths,
               "latent_preview": preview}
    for name, module in modules.items():
        sys.modules[name] = module
        if "." in name:
            setattr(comfy, name.split(".", 1)[1], module)
    return modules


def snapshot() -> dict[str, int]:
    """id() of every attribute of the stand-in modules and of the classes defined in them."""
    out = {}
    for name in MODULES:
        for attr, value in vars(sys.modules[name]).items():
            out[f"{name}.{attr}"] = id(value)
            if isinstance(value, type):
                out.update({f"{name}.{attr}.{k}": id(v) for k, v in vars(value).items()})
    return out
