"""Loaded models by file and settings, so the same file with the same settings is never loaded twice at once.

Inside ComfyUI a model lives as long as ComfyUI keeps it: its executor caches node outputs (a loader whose inputs did
not change is not run again) and its model management moves the weights. This cache holds only weak references there:
a model some workflow output still holds is handed out again instead of a second copy; nothing is kept alive here.
Outside ComfyUI (tests, scripts) nothing else caches, so each kind also keeps its `capacity` most recent models.

Entries are keyed by the file's identity (path, size, modification time) and every setting that changes the loaded
weights, so an edited file or a new precision loads afresh.
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


def load_file(cache: "ModelCache", path: str, settings: tuple, load: Callable[[], Any], what: str, name: str) -> Any:
    """The model in the file `path` with these settings: the one already loaded, else load(). Errors name the file
    (`what` 'name', as the user picked it in the node)."""
    with bridge.about_file(what, name):
        return cache.get_or_load((file_identity(path), *settings), load)


class ModelCache:
    """Least-recently-used cache holding at most `capacity` models of one kind (0: weak references only), plus a
    weak reference to every model it handed out."""

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

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._weak.clear()

    def __len__(self) -> int:
        return len(self._entries)


def _strong(capacity: int) -> int:
    return 0 if bridge.IN_COMFYUI else capacity


TRANSFORMERS = ModelCache(capacity=_strong(2))
TEXT_ENCODERS = ModelCache(capacity=_strong(1))  # T5-XXL is 5-19 GB: keep one
VAES = ModelCache(capacity=_strong(2))
CONTROLNETS = ModelCache(capacity=_strong(2))
ANNOTATORS = ModelCache(capacity=_strong(1))
LORAS = ModelCache(capacity=_strong(4))
_ALL = (TRANSFORMERS, TEXT_ENCODERS, VAES, CONTROLNETS, ANNOTATORS, LORAS)


def clear_all() -> None:
    for cache in _ALL:
        cache.clear()
