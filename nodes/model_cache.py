"""A small bounded cache of loaded models, so queuing again with the same loader settings does not reload a file.

ComfyUI already skips a loader whose inputs did not change; this cache also covers switching between workflows (and
the tests, which have no ComfyUI). Entries are keyed by the file's identity (path, size, modification time) and every
setting that changes the loaded weights, so an edited file or a new precision loads afresh.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Any, Callable, Hashable


def file_identity(path: str | os.PathLike) -> tuple:
    st = os.stat(path)
    return (os.path.realpath(path), st.st_size, st.st_mtime_ns)


class ModelCache:
    """Least-recently-used cache holding at most `capacity` models of one kind."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0  # how many times a loader actually ran (tests read it)

    def get_or_load(self, key: Hashable, load: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        value = load()
        with self._lock:
            self.loads += 1
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


TRANSFORMERS = ModelCache(capacity=2)
TEXT_ENCODERS = ModelCache(capacity=1)  # T5-XXL is 5-19 GB: keep one
VAES = ModelCache(capacity=2)
CONTROLNETS = ModelCache(capacity=2)
ANNOTATORS = ModelCache(capacity=1)


def clear_all() -> None:
    for cache in (TRANSFORMERS, TEXT_ENCODERS, VAES, CONTROLNETS, ANNOTATORS):
        cache.clear()
