"""Optional torch.compile of the transformer blocks, off by default, with a clean fallback to eager mode.

Each block's forward is compiled (the blocks share one graph; the state dict keys do not change). If compiling or
running the compiled code fails on this machine (no C++ compiler, an unsupported backend, an old torch), a warning
is logged once and every block goes back to plain eager mode for good, so generation still works.

Measured on the project CPU (2-core Sapphire Rapids, torch 2.13, bf16, 1024 px): no gain (attention in SDPA and the
matmuls dominate and are the same kernels either way), and ~15-20 s of compile time on the first step. It is offered
for GPUs, where fusing the elementwise work matters more.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .errors import PixArtError

log = logging.getLogger(__name__)


def compile_transformer(model: nn.Module, mode: str | None = None) -> bool:
    """Compile the blocks of `model` in place. Returns False (and changes nothing) where torch.compile is missing."""
    if not hasattr(torch, "compile"):
        return False
    if getattr(model, "compiled", False):
        return True
    state = {"failed": False}
    blocks = list(model.blocks)
    for block in blocks:
        eager = block.forward
        compiled = torch.compile(eager, mode=mode, dynamic=False)
        block.forward = _guarded(eager, compiled, state, blocks)
    model.compiled = True
    return True


def uncompile_transformer(model: nn.Module) -> None:
    """Back to eager mode."""
    for block in model.blocks:
        block.__dict__.pop("forward", None)
    model.compiled = False


def _guarded(eager, compiled, state: dict, blocks: list[nn.Module]):
    def forward(*args, **kwargs):
        if state["failed"]:
            return eager(*args, **kwargs)
        try:
            return compiled(*args, **kwargs)
        except PixArtError:
            raise
        except Exception as e:  # the compiler's own failures come in many types; eager mode is always correct
            state["failed"] = True
            for block in blocks:
                block.__dict__.pop("forward", None)
            log.warning("torch.compile failed here (%s: %s); the transformer runs uncompiled.", type(e).__name__,
                        str(e).splitlines()[0] if str(e) else "")
            return eager(*args, **kwargs)

    return forward
