"""A small bounded cache of loaded models, so queuing again with the same loader settings does not reload a file.

ComfyUI already skips a loader whose inputs did not change; this cache also covers switching between workflows (and
the tests, which have no ComfyUI). Entries are keyed by the file's identity (path, size, modification time) and every
setting that changes the loaded weights, so an edited file or a new precision loads afresh.

Memory: each cache holds at most `capacity` models, and when ComfyUI is asked to free memory (the /free API, the
"Unload models" buttons; `comfy.model_management.unload_all_models`) every cache lets go of its models. A model a
workflow still holds (ComfyUI's own output cache, a running prompt) stays reachable through a weak reference, so it is
reused rather than loaded a second time; the rest are freed.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import OrderedDict
from typing import Any, Callable, Hashable

from . import comfy_bridge as bridge


def file_identity(path: str | os.PathLike) -> tuple:
    st = os.stat(path)
    return (os.path.realpath(path), st.st_size, st.st_mtime_ns)


class ModelCache:
    """Least-recently-used cache holding at most `capacity` models of one kind."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()
        self._weak: dict[Hashable, weakref.ref] = {}  # every model handed out that may still be alive
        self._lock = threading.Lock()
        self.loads = 0  # how many times a loader actually ran (tests read it)

    def _keep(self, key: Hashable, value: Any) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def get_or_load(self, key: Hashable, load: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
            ref = self._weak.get(key)
            alive = ref() if ref is not None else None
            if alive is not None:  # released or evicted, but still in use somewhere: no second copy
                self._keep(key, alive)
                return alive
        value = load()
        with self._lock:
            self.loads += 1
            self._keep(key, value)
            self._weak = {k: r for k, r in self._weak.items() if r() is not None}
            try:
                self._weak[key] = weakref.ref(value)
            except TypeError:  # a value without weak-reference support is only kept while cached
                pass
        return value

    def release(self) -> None:
        """Drop this cache's hold on its models (what nobody else uses is freed by the garbage collector)."""
        with self._lock:
            self._entries.clear()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._weak.clear()

    def __len__(self) -> int:
        return len(self._entries)


TRANSFORMERS = ModelCache(capacity=2)
TEXT_ENCODERS = ModelCache(capacity=1)  # T5-XXL is 5-19 GB: keep one
VAES = ModelCache(capacity=2)
CONTROLNETS = ModelCache(capacity=2)
ANNOTATORS = ModelCache(capacity=1)
_ALL = (TRANSFORMERS, TEXT_ENCODERS, VAES, CONTROLNETS, ANNOTATORS)


def release_all() -> None:
    """Let go of every cached model and prompt embedding: ComfyUI asked for memory."""
    from pixart_core.text_encoder import clear_cache

    for cache in _ALL:
        cache.release()
    clear_cache()


def clear_all() -> None:
    for cache in _ALL:
        cache.clear()


bridge.on_memory_release(release_all)
