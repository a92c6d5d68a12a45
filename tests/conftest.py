"""Test setup: the repository root on sys.path (so `pixart_core`, `pixart_nodes`, `train` and `tests.factories`
import), and no hub."""

import os
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Tests never touch the network: any accidental hub call fails fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

T5_TOKENIZER = ROOT / "tests" / "data" / "t5-v1_1-xxl"  # the real T5 v1.1 tokenizer (Apache-2.0)


@contextmanager
def torch_threads(count: int):
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def record_keyword(monkeypatch, owner, name: str, keyword: str) -> list:
    """Wrap owner.name so every call is recorded by its `keyword` argument (None when not passed), then runs as
    before; returns the list the values go to."""
    seen = []
    original = getattr(owner, name)

    def spy(*args, **kwargs):
        seen.append(kwargs.get(keyword))
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, spy)
    return seen


@pytest.fixture
def one_torch_thread():
    """Tiny models run fastest on one thread, and the suite shares two cores: two OpenMP threads wait on each other
    for every small op (measured: test_attention.py 408 s with 2 threads under load, 16 s with 1). Use with
    pytest.mark.usefixtures."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def one_torch_thread_per_module():
    """one_torch_thread for a whole test module, its module-scoped model building included: in the module,
    `pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")`."""
    with torch_threads(1):
        yield
