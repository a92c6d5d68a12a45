"""Out-of-memory errors: telling them apart from other failures, and freeing what the allocator caches before a
lower-memory retry. The retries themselves live where the work is (pipeline.sample_batch, vae.decode_fitting)."""

from __future__ import annotations

import gc
from typing import Callable

import torch

FreeMemory = Callable[[bool], None]


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's OutOfMemoryError, or a backend's RuntimeError saying the same (MPS, ROCm, older torch)."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def free_memory(collect: bool = True) -> None:
    """Give the allocator's cached blocks back (collect=False skips the garbage collection, which takes a while in a
    big process, on repeated retries). Inside ComfyUI the nodes pass ComfyUI's own version of this."""
    if collect:
        gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
