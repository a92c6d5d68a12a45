"""Find the official PixArt-δ LCM pipeline in the Hugging Face cache, downloading it only when asked and online.

This is the ONLY module of the project that may touch the network, and only when `--model official` (or
resolve_official_lcm) asks for the official pipeline; with no model named, only the cache is read (default_pipeline).
It goes through huggingface_hub's cache (HF_HOME / HF_HUB_CACHE), so a model fetched once by any tool is reused.

Order of attempts, each failing fast:
1. the local cache (no network at all): a complete snapshot of the files below is used as is;
2. offline (HF_HUB_OFFLINE=1) or downloads not allowed: stop with instructions;
3. a 3-second TCP probe of the hub endpoint: unreachable -> stop with instructions instead of hanging in retries;
4. `snapshot_download` of only the files the pipeline needs (no .bin duplicates, no fp16 variants when fp32 exists).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from ..errors import PixArtError

OFFICIAL_LCM_REPO = "PixArt-alpha/PixArt-LCM-XL-2-1024-MS"
PROBE_TIMEOUT_S = 3.0

# Folders of the diffusers pipeline the core uses; the scheduler config only tells us the checkpoint is an LCM.
NEEDED_PATTERNS = [
    "model_index.json",
    "scheduler/*.json",
    "transformer/*.json",
    "transformer/*.safetensors",
    "vae/*.json",
    "vae/*.safetensors",
    "text_encoder/*.json",
    "text_encoder/*.safetensors",
    "tokenizer/*",
]
SKIPPED_PATTERNS = ["*.fp16.safetensors", "*.bin", "*.msgpack", "*.h5", "*.onnx*"]


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it, but looked up now (tests and the CLI set it late)."""
    from huggingface_hub import constants

    return _truthy(os.environ.get("HF_HUB_OFFLINE")) or bool(constants.HF_HUB_OFFLINE)


def hub_cache_dir() -> Path:
    """The cache huggingface_hub would use, resolved from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _has_weights(folder: Path) -> bool:
    """A diffusers/transformers component folder with complete weights (every shard its index names)."""
    for index in folder.glob("*.safetensors.index.json"):
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        return bool(shards) and all((folder / s).is_file() for s in shards)
    return any(folder.glob("*.safetensors"))


def missing_parts(root: Path) -> list[str]:
    """What a local copy of the pipeline still lacks (empty when it is usable)."""
    root = Path(root)
    missing = []
    for part in ("transformer", "vae", "text_encoder"):
        folder = root / part
        if not (folder / "config.json").is_file() or not _has_weights(folder):
            missing.append(f"{part}/ (config.json and the .safetensors weights)")
    tok = root / "tokenizer"
    if not ((tok / "spiece.model").is_file() or (tok / "tokenizer.json").is_file()):
        missing.append("tokenizer/ (spiece.model or tokenizer.json, with tokenizer_config.json)")
    return missing


def download_instructions(reason: str, cache: Path | None = None) -> str:
    cache = cache or hub_cache_dir()
    repo_folder = cache / ("models--" + OFFICIAL_LCM_REPO.replace("/", "--"))
    return (
        f"{reason}\n"
        f"No model path was given, so PixArt-δ needs the official pipeline {OFFICIAL_LCM_REPO} "
        f"(transformer/, vae/, text_encoder/, tokenizer/, scheduler/ and model_index.json; about 21 GB).\n"
        "Either download it into the Hugging Face cache on a machine with internet access:\n"
        f"    hf download {OFFICIAL_LCM_REPO} --include "
        + " ".join(f'"{p}"' for p in NEEDED_PATTERNS)
        + f"\n  (it lands in {repo_folder}; copy that folder to the same place here, or set HF_HOME),\n"
        "or download those folders anywhere and pass them explicitly:\n"
        "    python -m pixart_core generate \"prompt\" --model /path/to/PixArt-LCM-XL-2-1024-MS "
        "(or --transformer, --t5, --vae separately)."
    )


def _probe(endpoint: str) -> None:
    """Fail within PROBE_TIMEOUT_S if the hub cannot be reached at all."""
    url = urlparse(endpoint)
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme != "http" else 80)
    with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
        pass


def _snapshot_kwargs(cache: Path) -> dict:
    return dict(allow_patterns=NEEDED_PATTERNS, ignore_patterns=SKIPPED_PATTERNS, cache_dir=str(cache))


def cached_official_lcm() -> tuple[Path | None, str]:
    """The complete copy of the official pipeline in the Hugging Face cache, never touching the network; or None and
    why there is none."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hub_cache_dir()
    try:
        folder = Path(snapshot_download(OFFICIAL_LCM_REPO, local_files_only=True, **_snapshot_kwargs(cache)))
    except LocalEntryNotFoundError:
        return None, f"{OFFICIAL_LCM_REPO} is not in the Hugging Face cache ({cache})."
    gaps = missing_parts(folder)
    if gaps:
        return None, f"The cached copy in {folder} is incomplete; missing: " + "; ".join(gaps) + "."
    return folder, ""


def default_pipeline() -> tuple[Path, str]:
    """The pipeline used when no model is named: the official PixArt-δ LCM pipeline when it is in the cache, else the
    bundled PixArt-nano. Returns the folder and one line that says which and how to get the official one."""
    from . import bundled

    folder, reason = cached_official_lcm()
    if folder is not None:
        return folder, f"model: {OFFICIAL_LCM_REPO} (Hugging Face cache)"
    return bundled.nano_pipeline_dir(), (
        f"model: PixArt-nano (bundled 64 px toy model: coloured circles, squares, triangles), because {reason} "
        f"For real images: hf download {OFFICIAL_LCM_REPO} (about 21 GB), or --model PATH.")


def resolve_model(model: str | Path | None, parts_given: bool = False) -> tuple[Path | None, str]:
    """The pipeline folder a model argument names, with a one-line note on what was chosen (empty for a path):
    "nano" is the bundled PixArt-nano, "official" the official pipeline (downloaded if absent and allowed), a path is
    itself; no name means default_pipeline(), or nothing at all when every part was given separately."""
    from . import bundled

    if model == "nano":
        return bundled.nano_pipeline_dir(), "model: PixArt-nano (bundled 64 px toy model)"
    if model == "official":
        return resolve_official_lcm(), f"model: {OFFICIAL_LCM_REPO}"
    if model is not None:
        return Path(model), ""
    if parts_given:
        return None, ""
    return default_pipeline()


def resolve_official_lcm(allow_download: bool = True) -> Path:
    """Local folder of the official PixArt-δ LCM pipeline (diffusers layout), from the cache or freshly downloaded."""
    from huggingface_hub import constants, snapshot_download

    folder, reason = cached_official_lcm()
    if folder is not None:
        return folder
    cache = hub_cache_dir()
    kwargs = _snapshot_kwargs(cache)
    if hub_offline():
        raise PixArtError(download_instructions(reason + " HF_HUB_OFFLINE is set, so nothing is downloaded.", cache))
    if not allow_download:
        raise PixArtError(download_instructions(reason, cache))
    try:
        _probe(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT)
    except OSError as e:
        raise PixArtError(download_instructions(f"{reason} The Hugging Face hub is unreachable ({e}).", cache)) from e
    try:
        folder = Path(snapshot_download(OFFICIAL_LCM_REPO, etag_timeout=PROBE_TIMEOUT_S, **kwargs))
    except Exception as e:  # any hub/HTTP failure becomes the same actionable message
        raise PixArtError(download_instructions(f"{reason} Downloading failed: {e}", cache)) from e
    gaps = missing_parts(folder)
    if gaps:
        raise PixArtError(download_instructions(f"The download in {folder} is incomplete; missing: {'; '.join(gaps)}.",
                                                cache))
    return folder
