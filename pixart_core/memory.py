"""Memory: telling out-of-memory errors apart from other failures, freeing what the allocator caches before a
lower-memory retry, and giving freed heap memory back to the OS after a load. The retries themselves live where the work is (pipeline.sample_batch, vae.decode_fitting)."""

from __future__ import annotations

import ctypes
import gc
import sys
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


def return_freed_memory() -> None:
    """Give freed heap memory back to the OS. glibc keeps it mapped otherwise: after every layer's weights were
    replaced, the process would still hold about the old model's size (measured: fp8 RSS 2.5 GB for 0.6 GB of
    weights on the full-size model). No-op where the C library has no malloc_trim."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
