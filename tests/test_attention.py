"""The speed kernels (attention.py), the layout fix and torch.compile fallback keep the numbers of the reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pixart_core import attention as kernels
from pixart_core.loading.checkpoint import load_transformer
from tests.factories import tiny_diffusers_transformer, write_all_layouts


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: tiny models, shared CPU


def naive_attention(q, k, v, mask=None):
    scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v.double()).to(q.dtype)


@pytest.mark.parametrize("masked", [False, True])
def test_attention_matches_the_math_in_fp32(masked):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 50, 24, generator=g)
    k = torch.randn(2, 3, 17, 24, generator=g)
    v = torch.randn(2, 3, 17, 24, generator=g)
    mask = None
    if masked:
        mask = torch.ones(2, 1, 1, 17, dtype=torch.bool)
        mask[1, ..., 5:] = False
    out = kernels.attention(q, k, v, mask)
    assert (out - naive_attention(q, k, v, mask)).abs().max() <= 1e-5


def _linear(n_in=64, n_out=160, dtype=torch.bfloat16):
    torch.manual_seed(0)
    lin = nn.Linear(n_in, n_out).to(dtype)
    return lin.requires_grad_(False)


def test_fused_gelu_linear_agrees_with_plain_ops_in_bf16():
    lin = _linear()
    x = torch.randn(3, 40, 64).to(torch.bfloat16)
    with torch.no_grad():
        fused = kernels.gelu_linear(x, lin).float()
        exact = F.gelu(F.linear(x.double(), lin.weight.double(), lin.bias.double()), approximate="tanh")
        plain = F.gelu(lin(x), approximate="tanh").double()
    assert fused.shape == (3, 40, 160)
    # the fused op rounds once (after the GELU), the plain ops twice: it may only be closer to the exact value
    assert (fused.double() - exact).abs().max() <= (plain - exact).abs().max() + 1e-6


def test_gelu_linear_is_the_plain_path_in_fp32_and_under_autograd():
    lin = _linear(dtype=torch.float32)
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.equal(kernels.gelu_linear(x, lin), F.gelu(lin(x), approximate="tanh"))
    lin_bf = _linear().requires_grad_(True)
    xb = torch.randn(5, 64).to(torch.bfloat16)
    out = kernels.gelu_linear(xb, lin_bf)
    out.float().sum().backward()  # the fused op has no backward: training must get the differentiable path
    assert lin_bf.weight.grad is not None


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    ref = tiny_diffusers_transformer(family="alpha", sample_size=128, depth=2)
    paths = write_all_layouts(ref, tmp_path_factory.mktemp("attn"), text_len=120)
    return ref, paths["diffusers_folder"]


def _inputs():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 12, generator=g)
    y = torch.randn(2, 10, 64, generator=g)
    mask = torch.zeros(2, 10, dtype=torch.long)
    mask[0, :3] = 1
    mask[1, :8] = 1
    return x, torch.tensor([999.0, 400.0]), y, mask, torch.tensor([[64.0, 96.0]] * 2), torch.tensor([[0.667]] * 2)


def _run_ref(ref, x, t, y, mask, res, ar):
    added = {"resolution": res.to(x.dtype), "aspect_ratio": ar.to(x.dtype)}
    return ref(x, encoder_hidden_states=y, timestep=t, added_cond_kwargs=added, encoder_attention_mask=mask,
               return_dict=False)[0]


def test_bf16_model_is_as_close_to_fp32_as_diffusers_bf16(tiny_pair):
    """The fused bf16 kernels may change rounding, never accuracy: compare both bf16 runs with the fp32 reference."""
    ref, folder = tiny_pair
    x, t, y, mask, res, ar = _inputs()
    with torch.no_grad():
        exact = _run_ref(ref, x, t, y, mask, res, ar)
        ours = load_transformer(folder, dtype=torch.bfloat16)
        ours_bf16 = ours(x.bfloat16(), t, ours.prepare_text(y.bfloat16(), mask), resolution=res, aspect_ratio=ar)
        ref_bf16 = _run_ref(ref.to(torch.bfloat16), x.bfloat16(), t, y.bfloat16(), mask, res, ar)
        ref.float()
    err_ours = (ours_bf16.float() - exact).abs().max()
    err_ref = (ref_bf16.float() - exact).abs().max()
    assert err_ours <= 1.5 * err_ref + 1e-3, (err_ours, err_ref)


def test_residual_stream_is_contiguous(tiny_pair):
    """Regression: the patch embedder's transposed view made every later op copy the tokens (30% of a CPU step)."""
    _, folder = tiny_pair
    ours = load_transformer(folder)
    x, t, y, mask, res, ar = _inputs()
    layouts = []

    def hook(i, h):
        layouts.append(h.is_contiguous())
        return None

    with torch.no_grad():
        ours(x, t, ours.prepare_text(y, mask), resolution=res, aspect_ratio=ar, block_hook=hook)
    assert layouts and all(layouts)
