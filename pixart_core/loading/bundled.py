"""PixArt-nano, the tiny model trained by the project's own recipes: where its files go, and which the loaders offer.

`python -m train.build_nano` writes them to models/nano in the same layouts the loaders read for real
PixArt checkpoints, and the ComfyUI loaders then list them after the user's own files. The shipped build lives in the
repository's models/nano: the CLI falls back to it when the official pipeline is not in the Hugging Face cache.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import PixArtError

NANO_DIR = Path(__file__).resolve().parents[2] / "models" / "nano"

LCM_DIR = "PixArt-nano-LCM"  # diffusers pipeline folder: LCM transformer, T5, tokenizer, VAE, LCMScheduler
BASE_FILE = "PixArt-nano-base.safetensors"  # the pre-trained teacher, original PixArt key layout
CONTROLNET_FILE = "PixArt-nano-ControlNet.safetensors"  # PixArt-δ ControlNet key layout


# What the ComfyUI loaders list, per ComfyUI model folder: display name -> path under NANO_DIR (a file or a folder the
# core's loaders read).
LOADER_ENTRIES: dict[str, dict[str, str]] = {
    "diffusion_models": {
        "PixArt-nano-LCM (bundled)": f"{LCM_DIR}/transformer",
        "PixArt-nano-base (bundled)": BASE_FILE,
    },
    "text_encoders": {"PixArt-nano-T5 (bundled)": LCM_DIR},
    "vae": {"PixArt-nano-VAE (bundled)": f"{LCM_DIR}/vae"},
    "controlnet": {"PixArt-nano-ControlNet (bundled)": CONTROLNET_FILE},
}


def loader_entries(folder: str, root: Path | None = None) -> dict[str, Path]:
    """The bundled models a loader of ComfyUI model folder `folder` offers, limited to those present on disk."""
    root = root or NANO_DIR
    entries = {name: root / rel for name, rel in LOADER_ENTRIES.get(folder, {}).items()}
    return {name: path for name, path in entries.items() if path.exists()}


def nano_pipeline_dir(root: Path | None = None) -> Path:
    """The bundled PixArt-nano LCM pipeline folder (transformer, T5, tokenizer, VAE, scheduler)."""
    folder = (root or NANO_DIR) / LCM_DIR
    if not (folder / "model_index.json").is_file():
        raise PixArtError(f"The bundled PixArt-nano pipeline is missing from {folder}. Restore it from the repository "
                          "(git checkout -- models/nano) or rebuild it: python -m train.build_nano")
    return folder
