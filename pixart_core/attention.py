"""The device-tuned kernels the transformer calls: attention, and the MLP's first linear layer with its GELU.

Attention. q, k, v: (B, heads, tokens, head_dim); mask: None or bool broadcastable to (B, heads, q_tokens, k_tokens),
True = attend. torch's scaled_dot_product_attention is used on every device: measured on this project's CPU (2-core
Sapphire Rapids with AMX, torch 2.13) for 1024 px self-attention (B 2, 16 heads, 4096 tokens, head width 72), one
thread: SDPA reaches 365 GFLOP/s in bf16 and 110 in fp32, the best query-chunked matmul + softmax built from torch ops
214 and 91 (its softmax makes an extra pass over every (chunk x 4096) score tile; SDPA's fused flash kernel does the
exponentials while the tile is in cache). So no hand-written path is kept; `bench/bench_transformer_step.py
--attention` re-measures both on any machine.

MLP. On the CPU in bf16, oneDNN can apply the tanh-GELU to the fc1 output while it is still in cache; the separate GELU
pass over (tokens x 4*width) costs about as much again as half the matmul (measured 1024 px: 189 ms -> 138 ms per
block, one thread). The fused op is torch's own (the one torch.compile emits for CPU), used only where it exists and
agrees with the plain ops on a probe; anything else (fp32, CUDA, autograd, quantised layers) takes the plain path.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@functools.lru_cache(maxsize=None)
def _fused_gelu_linear_works(dtype: torch.dtype) -> bool:
    """Whether oneDNN's linear + tanh-GELU exists here and matches F.gelu(F.linear(...)) on a small probe."""
    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return False
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(8, 64, generator=g).to(dtype)
        w = (torch.randn(96, 64, generator=g) * 0.1).to(dtype)
        b = torch.randn(96, generator=g).to(dtype)
        with torch.no_grad():
            fused = op(x, w, b, "gelu", [], "tanh").float()
            plain = F.gelu(F.linear(x, w, b).float(), approximate="tanh")
        return fused.shape == plain.shape and bool((fused - plain).abs().max() < 0.05)
    except (RuntimeError, NotImplementedError):
        return False


def gelu_linear(x: torch.Tensor, linear: nn.Module) -> torch.Tensor:
    """gelu_tanh(linear(x)), fused on the CPU in bf16 where torch's oneDNN build offers it."""
    if (
        type(linear) is nn.Linear
        and x.device.type == "cpu"
        and x.dtype == torch.bfloat16
        and linear.weight.dtype == torch.bfloat16
        and linear.bias is not None
        and not (torch.is_grad_enabled() and (x.requires_grad or linear.weight.requires_grad))
        and not torch.compiler.is_compiling()  # torch.compile fuses the plain ops itself
        and _fused_gelu_linear_works(torch.bfloat16)
    ):
        return torch.ops.mkldnn._linear_pointwise(x, linear.weight, linear.bias, "gelu", [], "tanh")
    return F.gelu(linear(x), approximate="tanh")
