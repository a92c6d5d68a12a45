"""8-bit transformer weights (quantize.py): memory, which layers, and quality against the bf16 model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pixart_core import samplers
from pixart_core.loading.checkpoint import load_transformer
from pixart_core.errors import PixArtError
from pixart_core import quantize
from pixart_core.quantize import Fp8Linear, Int8DynamicLinear, block_linears, quantize_transformer, weight_bytes
from pixart_core.schedule import ddpm_schedule
from tests.factories import tiny_diffusers_transformer, write_all_layouts


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: tiny models, shared CPU


MODES = ["int8", "fp8", "int8-dynamic"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # width 288 (4 heads): big enough that the block Linears dominate, as in the real model
    ref = tiny_diffusers_transformer(family="sigma", sample_size=32, depth=3, width=288, heads=4)
    return write_all_layouts(ref, tmp_path_factory.mktemp("quant"), text_len=300)["diffusers_folder"]


def _sample(model, steps: int = 4) -> torch.Tensor:
    """A short DPM-Solver++ run with CFG: the latent a user would get."""
    g = torch.Generator().manual_seed(0)
    y = torch.randn(2, 8, 64, generator=g)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, 1:] = 0  # the unconditional half: one valid token
    text = model.prepare_text(y.to(model.dtype), mask)

    def eps(x, t):
        out = model(torch.cat([x, x]).to(model.dtype), torch.cat([t, t]), text).float()
        uncond, cond = out.chunk(2)
        return (uncond + 4.5 * (cond - uncond))[:, :4]

    noise = torch.randn(1, 4, 16, 16, generator=g)
    with torch.no_grad():
        return samplers.sample("dpmpp_2m", eps, noise, ddpm_schedule(), samplers.sampler_timesteps("dpmpp_2m", steps))


@pytest.fixture(scope="module")
def bf16_latent(checkpoint):
    return _sample(load_transformer(checkpoint, dtype=torch.bfloat16))


@pytest.mark.parametrize("mode", MODES)
def test_8bit_latent_stays_close_to_bf16(checkpoint, bf16_latent, mode):
    model = quantize_transformer(load_transformer(checkpoint, dtype=torch.bfloat16), mode)
    latent = _sample(model)
    cos = F.cosine_similarity(latent.flatten(), bf16_latent.flatten(), dim=0).item()
    assert cos >= 0.995, cos  # measured 0.9997 int8, 0.9993 fp8, 0.9996 int8-dynamic on this model (torch 2.13 CPU)


@pytest.mark.parametrize("mode", MODES)
def test_8bit_weights_take_about_half_the_bf16_memory(checkpoint, mode):
    bf16 = load_transformer(checkpoint, dtype=torch.bfloat16)
    layers = [getattr(parent, name) for parent, name in block_linears(bf16)]
    linear_bytes = sum((m.weight.numel() + m.bias.numel()) * 2 for m in layers)
    total_bf16 = weight_bytes(bf16)
    q = quantize_transformer(bf16, mode)
    saved = total_bf16 - weight_bytes(q)
    # 8-bit weights + per-row scales + bf16 biases: the block layers shrink to <= 55% of their bf16 size
    assert weight_bytes(q) - (total_bf16 - linear_bytes) <= 0.55 * linear_bytes
    assert saved >= 0.44 * linear_bytes


def test_only_block_layers_are_quantised(checkpoint):
    model = load_transformer(checkpoint, dtype=torch.bfloat16, weights="fp8")  # the loader's one call
    assert not block_linears(model)  # every block Linear replaced
    assert all(type(b.mlp.fc1) is Fp8Linear for b in model.blocks)
    for m in (model.t_block[1], model.y_embedder.y_proj.fc1, model.final_layer.linear, model.t_embedder.mlp[0]):
        assert type(m) is nn.Linear and m.weight.dtype == torch.bfloat16
    assert model.quantization == "fp8"


def test_fp8_linear_roundtrip_error_is_small():
    torch.manual_seed(0)
    lin = nn.Linear(96, 40)
    q = Fp8Linear(lin.weight, lin.bias, torch.float32)
    w = q.dequantized_weight()
    rel = ((w - lin.weight).norm() / lin.weight.norm()).item()
    assert rel < 0.05  # e4m3 has 3 mantissa bits: ~2-3% relative error per weight
    x = torch.randn(7, 96)
    with torch.no_grad():
        assert F.cosine_similarity(q(x).flatten(), lin(x).flatten(), dim=0) > 0.998


def test_int8_runs_in_fp32_models_too(checkpoint):
    model = quantize_transformer(load_transformer(checkpoint, dtype=torch.float32), "int8")
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        out = model(x, torch.tensor([500.0]), model.prepare_text(torch.randn(1, 5, 64)))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_bad_requests_are_refused(checkpoint):
    model = load_transformer(checkpoint, dtype=torch.bfloat16)
    with pytest.raises(PixArtError, match="Unknown weight quantisation"):
        quantize_transformer(model, "int4")
    assert quantize_transformer(model, "none") is model
    quantize_transformer(model, "int8")
    with pytest.raises(PixArtError, match="already quantised"):
        quantize_transformer(model, "fp8")
    with pytest.raises(PixArtError, match="Unknown weight storage 'int4'"):
        load_transformer(checkpoint, weights="int4")


def test_int8_dynamic_linear_matches_the_float_layer():
    torch.manual_seed(0)
    lin = nn.Linear(96, 40)
    q = Int8DynamicLinear(lin.weight, lin.bias, torch.float32)
    x = torch.randn(3, 700, 96)  # 2100 rows: several row blocks and a partial one
    x_before = x.clone()
    with torch.no_grad():
        out, ref = q(x), lin(x)
    assert torch.equal(x, x_before)  # the input is quantised in a copy
    # int8 on both sides: ~1/254 of each row's largest value per element, so a ~1% relative error over a dot product
    assert ((out - ref).norm() / ref.norm()).item() < 0.02
    assert q.weight.dtype == torch.int8 and q.weight_scale.shape == (40,)


def test_int8_dynamic_falls_back_where_the_kernel_shape_rules_fail(monkeypatch):
    torch.manual_seed(0)
    lin = nn.Linear(12, 20)
    q = Int8DynamicLinear(lin.weight, lin.bias, torch.float32)
    monkeypatch.setattr(quantize, "_int_mm_fits", lambda m, k, n, device: False)  # as CUDA with K = 12
    monkeypatch.setattr(torch, "_int_mm", lambda *a: pytest.fail("the int8 kernel must not be called"))
    x = torch.randn(5, 12)
    with torch.no_grad():
        out, ref = q(x), lin(x)
    assert ((out - ref).norm() / ref.norm()).item() < 0.01  # weight-only int8: ~1/254 of each row's largest weight


def test_int8_dynamic_is_refused_without_the_int8_kernel(checkpoint, monkeypatch):
    model = load_transformer(checkpoint, dtype=torch.bfloat16)
    quantize.int_mm_available.cache_clear()
    monkeypatch.delattr(torch, "_int_mm")
    try:
        with pytest.raises(PixArtError, match=r"int8-dynamic needs torch's int8 matrix multiply.*choose int8 or fp8"):
            quantize_transformer(model, "int8-dynamic")
    finally:
        quantize.int_mm_available.cache_clear()
    assert getattr(model, "quantization", "none") == "none" and block_linears(model)  # nothing was changed


def test_int8_dynamic_is_refused_before_the_load(checkpoint, monkeypatch):
    quantize.int_mm_available.cache_clear()
    monkeypatch.delattr(torch, "_int_mm")
    read = []
    monkeypatch.setattr("pixart_core.loading.checkpoint.open_checkpoint", lambda path: read.append(path))
    try:
        with pytest.raises(PixArtError, match="int8-dynamic needs torch's int8 matrix multiply"):
            load_transformer(checkpoint, dtype=torch.bfloat16, weights="int8-dynamic")
    finally:
        quantize.int_mm_available.cache_clear()
    assert not read
