"""Everything this pack takes from ComfyUI, in one module, with plain-torch stand-ins when ComfyUI is absent.

Inside ComfyUI the nodes use only its stable surface: folder_paths (model folders), comfy.model_management (devices,
loading, Cancel), comfy.model_patcher.ModelPatcher (as a wrapper, never subclassed), comfy.utils.ProgressBar and
latent_preview. Outside ComfyUI (tests, scripts) the same calls work on a models folder set with `set_models_root`
(or the PIXART_MODELS_DIR environment variable), on the CPU or the first CUDA device.
"""

from __future__ import annotations

import gc
import logging
import os
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from pixart_core.loading import bundled
from pixart_core.errors import Interrupted, PixArtError
from pixart_core.memory import free_memory

try:  # ComfyUI puts its root on sys.path; these imports only succeed inside it.
    import comfy.latent_formats as _latent_formats
    import comfy.model_management as _mm
    import comfy.model_patcher as _model_patcher
    import comfy.utils as _comfy_utils
    import folder_paths as _folder_paths
    import latent_preview as _latent_preview

    IN_COMFYUI = True
except ImportError:
    IN_COMFYUI = False

log = logging.getLogger("pixart_delta")

MODEL_EXTENSIONS = (".safetensors", ".sft", ".pth", ".pt", ".ckpt", ".bin")
# Folders whose .gguf files the loaders read too. ComfyUI's own lists show .gguf only with ComfyUI-GGUF installed
# (it adds the extension), so these folders are also walked here; ComfyUI's extension lists are left as they are.
GGUF_FOLDERS = ("text_encoders",)

# ComfyUI's own folder names (and the legacy aliases it maps), used by the stand-in.
_FOLDER_ALIASES = {"unet": "diffusion_models", "clip": "text_encoders"}
_FOLDER_DIRS = {
    "diffusion_models": ("diffusion_models", "unet"),
    "checkpoints": ("checkpoints",),
    "text_encoders": ("text_encoders", "clip"),
    "vae": ("vae",),
    "controlnet": ("controlnet",),
}

_models_root: str | None = None


# ----------------------------------------------------------------------------------------------- model folders
def set_models_root(path: str | os.PathLike | None) -> None:
    """Outside ComfyUI: the folder that holds diffusion_models/, text_encoders/, vae/, controlnet/ ..."""
    global _models_root
    _models_root = None if path is None else str(path)


def _stand_in_root() -> str:
    return _models_root or os.environ.get("PIXART_MODELS_DIR") or os.path.join(os.getcwd(), "models")


def folder_dirs(folder: str) -> list[str]:
    """The directories a model folder name stands for (what a user is told to put files into)."""
    folder = _FOLDER_ALIASES.get(folder, folder)
    if IN_COMFYUI:
        return _folder_paths.get_folder_paths(folder)
    return [os.path.join(_stand_in_root(), d) for d in _FOLDER_DIRS.get(folder, (folder,))]


def list_models(folder: str, with_bundled: bool = True) -> list[str]:
    """Model files in a folder, relative names with '/' separators, sorted, as ComfyUI's combos show them; then the
    bundled PixArt-nano models of that kind."""
    gguf = _FOLDER_ALIASES.get(folder, folder) in GGUF_FOLDERS
    if IN_COMFYUI:
        names = _folder_paths.get_filename_list(folder)
        if gguf:
            names = [*names, *(n for n in _walk(folder_dirs(folder)) if n.lower().endswith(".gguf"))]
    else:
        names = _walk(folder_dirs(folder))
    extensions = MODEL_EXTENSIONS + ((".gguf",) if gguf else ())
    files = sorted({n for n in names if n.lower().endswith(extensions)})
    return files + [n for n in bundled.loader_entries(folder) if with_bundled and n not in files]


def _walk(roots: Iterable[str]) -> list[str]:
    """Every file under `roots`, relative to its root with '/' separators."""
    names = []
    for root in roots:
        seen: set[str] = set()
        for dirpath, dirs, files in os.walk(root, followlinks=True):
            # A symlinked folder that leads back up the tree would be walked forever (two such links double
            # the listing at every level): every real folder is walked once.
            real = os.path.realpath(dirpath)
            if real in seen:
                dirs[:] = []
                continue
            seen.add(real)
            for f in files:
                rel = os.path.relpath(os.path.join(dirpath, f), root)
                names.append(rel.replace(os.sep, "/"))
    return names


def list_models_in(folders: Iterable[str]) -> list[str]:
    """Files of several folders in one list (first folder first), without duplicates."""
    out: list[str] = []
    for folder in folders:
        out.extend(n for n in list_models(folder) if n not in out)
    return out


def model_path(folders: str | Iterable[str], name: str, what: str) -> str:
    """The full path of a model file, or a PixArtError telling the user where to put it.

    Only a name that ComfyUI's file list of these folders shows may load: the name arrives from the /prompt API, where
    anyone who can reach the server can send "../../etc/passwd" or an absolute path. (A node that names its file input
    in VALIDATE_INPUTS switches off ComfyUI's own "value not in list" check, so this is the check.)"""
    folders = [folders] if isinstance(folders, str) else list(folders)
    for folder in folders:  # the models that ship with the pack (PixArt-nano): a file or a folder the core reads
        path = bundled.loader_entries(folder).get(name) if isinstance(name, str) else None
        if path is not None:
            return str(path)
    places = " or ".join(f"models/{f}" for f in folders)
    if not isinstance(name, str) or not name or "\0" in name:
        raise PixArtError(f"{what}: no file name was given ({name!r}). Pick a file from {places} in the node.")
    if name not in list_models_in(folders):
        raise _not_listed(folders, name, what, places)
    return _listed_file(folders, name, what, places)


def _listed_file(folders: list[str], name: str, what: str, places: str) -> str:
    """The path of a listed name, or why it cannot be opened."""
    for folder in folders:
        candidates = ([_folder_paths.get_full_path(folder, name)] if IN_COMFYUI
                      else [os.path.join(d, name) for d in folder_dirs(folder)])
        for path in candidates:
            if path and os.path.isfile(path):
                return path
            if path and os.path.islink(path):
                raise PixArtError(f"{what} '{name}' in {places} is a symbolic link that leads nowhere (a broken link "
                                  "or a loop of links). Replace it with the file itself or a link to it.")
    raise PixArtError(f"{what} '{name}' is listed in {places} but could not be opened; press R in the ComfyUI page "
                      "to refresh the list.")


def _not_listed(folders: list[str], name: str, what: str, places: str) -> PixArtError:
    """The error for a name the folders' file list does not show: refused, or not found (where to put it)."""
    if os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
        return PixArtError(f"{what} '{name}' is refused: only files listed from {places} can be loaded (no "
                           "absolute paths or '..'). Put the file in that folder and pick it in the node.")
    searched = "; ".join(d for f in folders for d in folder_dirs(f))
    return PixArtError(
        f"{what} '{name}' was not found in {places} (searched: {searched}). Put the file there and press R in "
        f"the ComfyUI page to refresh the list, or pick another file in the node."
    )


@contextmanager
def about_file(what: str, name: str) -> Iterator[None]:
    """Errors raised while loading a file name it, so the message on the node says which file is at fault."""
    try:
        yield
    except PixArtError as exc:
        if os.path.basename(name) in str(exc):
            raise
        raise PixArtError(f"{what} '{name}': {exc}") from exc


def validate_model_name(folders: str | Iterable[str], name: str, what: str) -> bool | str:
    """For VALIDATE_INPUTS of a file name: True, or the message saying where the file goes (it replaces ComfyUI's
    generic "value not in list", which naming the input in VALIDATE_INPUTS switches off). A listed name passes; a
    file that fails to open is reported when the node runs."""
    if isinstance(name, str) and name in list_models_in([folders] if isinstance(folders, str) else folders):
        return True
    try:
        model_path(folders, name, what)
    except PixArtError as exc:
        return str(exc)
    return True


# ----------------------------------------------------------------------------------------------- devices, dtypes
def compute_device() -> torch.device:
    if IN_COMFYUI:
        return _mm.get_torch_device()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def offload_device() -> torch.device:
    return _mm.unet_offload_device() if IN_COMFYUI else torch.device("cpu")


def text_encoder_devices(choice: str) -> tuple[torch.device, torch.device]:
    """(load device, offload device) for the T5 encoder; choice is 'auto', 'cpu' or 'gpu'."""
    cpu = torch.device("cpu")
    if choice == "cpu":
        return cpu, cpu
    if choice == "gpu":
        device = compute_device()
        if device.type == "cpu":
            raise PixArtError("device=gpu was chosen for the T5 encoder but no GPU is available (or ComfyUI runs with "
                              "--cpu). Choose device=auto or cpu.")
        return device, (_mm.text_encoder_offload_device() if IN_COMFYUI else cpu)
    if IN_COMFYUI:
        return _mm.text_encoder_device(), _mm.text_encoder_offload_device()
    return compute_device(), cpu


def vae_devices() -> tuple[torch.device, torch.device]:
    if IN_COMFYUI:
        return _mm.vae_device(), _mm.vae_offload_device()
    return compute_device(), torch.device("cpu")


def intermediate_device() -> torch.device:
    """Where LATENT and IMAGE tensors live between nodes (the CPU, as ComfyUI keeps them)."""
    return _mm.intermediate_device() if IN_COMFYUI else torch.device("cpu")


def auto_dtype(device: torch.device) -> torch.dtype:
    """The fastest safe floating type for running a transformer on `device`."""
    if IN_COMFYUI:
        if _mm.should_use_bf16(device):
            return torch.bfloat16
        if _mm.should_use_fp16(device):
            return torch.float16
        return torch.float32
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def vae_dtype(device: torch.device) -> torch.dtype:
    """ComfyUI's choice for VAEs; outside it bf16 on GPUs that have it, else fp32 (fp16 VAEs can overflow)."""
    if IN_COMFYUI:
        return _mm.vae_dtype(device)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


# ----------------------------------------------------------------------------------------------- model management
class _Holder(nn.Module):
    """ModelPatcher writes attributes such as `.device` onto the module it manages; our models (and transformers' /
    diffusers' ones) define `device` as a read-only property, so ComfyUI manages this plain container instead."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner


class ManagedModel:
    """One model under ComfyUI's memory management (shares VRAM with other models, unloads when memory is needed),
    or, outside ComfyUI, a model kept on its load device."""

    def __init__(self, module: nn.Module, load_device: torch.device, offload_device: torch.device):
        self.module = module
        self.load_device = torch.device(load_device)
        self.offload_device = torch.device(offload_device)
        self.patcher = None
        if IN_COMFYUI:
            # A holder class named after the model, so ComfyUI's log says "Requested to load PixArtTransformer".
            holder = type(type(module).__name__, (_Holder,), {})(module)
            self.patcher = _model_patcher.ModelPatcher(holder, load_device=self.load_device,
                                                       offload_device=self.offload_device)

    def __repr__(self) -> str:
        return f"ManagedModel({type(self.module).__name__} on {self.load_device})"


def load(models: Iterable[ManagedModel]) -> None:
    """Put the models on their load devices before use (inside ComfyUI this may unload other models first)."""
    models = [m for m in models if m is not None]
    if IN_COMFYUI:
        # Our modules have no ComfyUI cast-weight layers, so they cannot be partially loaded: always load them whole.
        _mm.load_models_gpu([m.patcher for m in models], force_full_load=True)
        return
    for m in models:
        m.module.to(m.load_device)


def free_cached_memory(collect: bool = True) -> None:
    """After an out-of-memory error: give the allocator's cached blocks back before a lower-memory retry (the core's
    memory.free_memory, through ComfyUI's soft_empty_cache inside it)."""
    if IN_COMFYUI:
        if collect:
            gc.collect()
        _mm.soft_empty_cache()
    else:
        free_memory(collect)


# ----------------------------------------------------------------------------------------------- progress, cancel
_interrupt_requested = False


def request_interrupt(value: bool = True) -> None:
    """Outside ComfyUI: the stand-in of the Cancel button (the next check raises)."""
    global _interrupt_requested
    _interrupt_requested = value


def check_interrupted() -> None:
    """Raise if the user pressed Cancel (inside ComfyUI this is its own interrupt exception)."""
    global _interrupt_requested
    if IN_COMFYUI:
        _mm.throw_exception_if_processing_interrupted()
    elif _interrupt_requested:
        _interrupt_requested = False
        raise Interrupted("Processing interrupted")


class _StandInProgressBar:
    def __init__(self, total: int):
        self.total = total
        self.current = 0

    def update_absolute(self, value: int, total: int | None = None, preview=None) -> None:
        if total is not None:
            self.total = total
        self.current = min(value, self.total)


def progress_bar(total: int):
    return _comfy_utils.ProgressBar(total) if IN_COMFYUI else _StandInProgressBar(total)


def tile_progress() -> Callable[[int, int], None]:
    """A (done, total) callback for tiled VAE work: progress bar plus Cancel."""
    bar = None

    def callback(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = progress_bar(total)
        bar.update_absolute(done, total)

    return callback


def _previewer(family: str, device: torch.device):
    """ComfyUI's latent previewer for the VAE latent space of a family, or None when previews are off."""
    if not IN_COMFYUI:
        return None
    fmt = _latent_formats.SDXL() if family == "sigma" else _latent_formats.SD15()
    try:
        return _latent_preview.get_previewer(device, fmt)
    except Exception as exc:  # a preview must never break sampling
        log.warning("PixArt: latent previews unavailable (%s)", exc)
        return None


def sampling_progress(family: str, device: torch.device) -> Callable[[int, int, torch.Tensor | None], None]:
    """A step callback: checks Cancel, advances the progress bar and sends a preview of the current clean estimate.

    Call it as callback(steps_done, total_steps, denoised) where denoised is the model-space latent (scaled, as the
    transformer sees it) or None.
    """
    bar = None
    previewer = _previewer(family, device)

    def callback(steps_done: int, total_steps: int, denoised: torch.Tensor | None = None) -> None:
        nonlocal bar
        check_interrupted()
        if bar is None:
            bar = progress_bar(total_steps)
        preview = None
        if previewer is not None and denoised is not None:
            preview = previewer.decode_latent_to_preview_image("JPEG", denoised.float())
        bar.update_absolute(steps_done, total_steps, preview)

    return callback


_t5_tokenizer_dir: str | None = None


def set_t5_tokenizer_dir(path: str | os.PathLike | None) -> None:
    """Outside ComfyUI: the folder holding the T5 v1.1 tokenizer (tokenizer.json ...)."""
    global _t5_tokenizer_dir
    _t5_tokenizer_dir = None if path is None else str(path)


def t5_tokenizer_dir() -> str | None:
    """ComfyUI ships the T5 v1.1 tokenizer (comfy/text_encoders/t5_tokenizer); outside it, the folder set with
    set_t5_tokenizer_dir or the PIXART_T5_TOKENIZER environment variable."""
    if IN_COMFYUI:
        # `comfy` is a namespace package (no __file__); its modules know where they are.
        path = os.path.join(os.path.dirname(_latent_formats.__file__), "text_encoders", "t5_tokenizer")
        if os.path.isdir(path):
            return path
    return _t5_tokenizer_dir or os.environ.get("PIXART_T5_TOKENIZER") or None
