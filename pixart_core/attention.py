"""The attention kernel every PixArt attention layer calls, in one place so it can be tuned for each device.

q, k, v: (B, heads, tokens, head_dim); mask: None or bool broadcastable to (B, heads, q_tokens, k_tokens), True = attend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
