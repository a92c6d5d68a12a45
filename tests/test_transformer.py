"""Our transformer against diffusers' PixArtTransformer2DModel on the same weights (fp32, max abs diff <= 1e-4)."""

import pytest
import torch

from pixart_core.loading.checkpoint import load_transformer
from pixart_core.errors import PixArtError
from tests.factories import tiny_diffusers_transformer, write_all_layouts

TOL = 1e-4


def _pair(tmp_path, **kw):
    ref = tiny_diffusers_transformer(**kw)
    paths = write_all_layouts(ref, tmp_path, text_len=120 if kw.get("family", "alpha") == "alpha" else 300)
    return ref, load_transformer(paths["diffusers_folder"]), paths


def _reference(ref, x, t, y, mask, resolution=None, aspect_ratio=None):
    added = {"resolution": resolution, "aspect_ratio": aspect_ratio}
    with torch.no_grad():
        return ref(x, encoder_hidden_states=y, timestep=t, added_cond_kwargs=added,
                   encoder_attention_mask=mask, return_dict=False)[0]


def _inputs(batch=2, h=8, w=8, tokens=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, h, w, generator=g)
    y = torch.randn(batch, tokens, 64, generator=g)
    mask = torch.zeros(batch, tokens, dtype=torch.long)
    for i in range(batch):
        mask[i, : 3 + 4 * i] = 1  # different text lengths per sample
    t = torch.linspace(999, 100, batch)
    return x, t, y, mask


def test_alpha_1024_ms_with_micro_conditions(tmp_path):
    ref, ours, _ = _pair(tmp_path, family="alpha", sample_size=128)
    assert ours.config.micro_conditions and ours.config.family == "alpha" and ours.config.pe_interpolation == 2.0
    x, t, y, mask = _inputs(h=12, w=8)
    res = torch.tensor([[96.0, 64.0]] * 2)
    ar = torch.tensor([[1.5]] * 2)
    expected = _reference(ref, x, t, y, mask, res, ar)
    with torch.no_grad():
        got = ours(x, t, ours.prepare_text(y, mask), resolution=res, aspect_ratio=ar)
    assert got.shape == (2, 8, 12, 8)
    assert (got - expected).abs().max() <= TOL
    # the micro-conditions matter: other values give another output
    with torch.no_grad():
        other = ours(x, t, ours.prepare_text(y, mask), resolution=res * 2, aspect_ratio=ar)
    assert (other - expected).abs().max() > 1e-3


@pytest.mark.parametrize("sample_size,interp", [(32, 0.5), (64, 1.0), (128, 2.0), (256, 4.0)])
def test_sigma_interpolations(tmp_path, sample_size, interp):
    ref, ours, _ = _pair(tmp_path, family="sigma", sample_size=sample_size, interpolation_scale=interp)
    assert ours.config.family == "sigma" and ours.config.pe_interpolation == interp
    x, t, y, mask = _inputs(h=10, w=6)
    expected = _reference(ref, x, t, y, mask)
    with torch.no_grad():
        got = ours(x, t, ours.prepare_text(y, mask))
    assert (got - expected).abs().max() <= TOL


def test_non_square_batch_with_different_text_lengths(tmp_path):
    ref, ours, _ = _pair(tmp_path, family="sigma", sample_size=64, interpolation_scale=1.0, depth=3)
    x, t, y, mask = _inputs(batch=2, h=6, w=14, tokens=20)
    expected = _reference(ref, x, t, y, mask)
    with torch.no_grad():
        text = ours.prepare_text(y, mask)
        got = ours(x, t, text)
        again = ours(x, t, text)  # the cached text K/V give the same answer on the next step
    assert (got - expected).abs().max() <= TOL
    assert torch.equal(got, again)
    assert text.tokens.shape[1] == 7  # trimmed to the longest valid caption


def test_alpha_256_uses_interpolation_one(tmp_path):
    """α-256: the official inference uses 1.0 (diffusers' convert script defines 0.5 but never uses it)."""
    ref, ours, paths = _pair(tmp_path, family="alpha", sample_size=32)
    assert ours.config.pe_interpolation == 1.0
    from_pth = load_transformer(paths["original_pth"])
    assert from_pth.config.family == "alpha" and from_pth.config.sample_size == 32
    x, t, y, mask = _inputs(h=4, w=4)
    expected = _reference(ref, x, t, y, mask)
    with torch.no_grad():
        assert (from_pth(x, t, from_pth.prepare_text(y, mask)) - expected).abs().max() <= TOL


def test_text_batch_of_one_broadcasts(tmp_path):
    _, ours, _ = _pair(tmp_path, family="sigma", sample_size=64, interpolation_scale=1.0)
    x, t, y, mask = _inputs(batch=2)
    with torch.no_grad():
        one = ours(x, t, ours.prepare_text(y[:1], mask[:1]))
        two = ours(x, t, ours.prepare_text(y[:1].expand(2, -1, -1), mask[:1].expand(2, -1)))
    assert (one - two).abs().max() <= 1e-6


def test_learned_sigma_output_is_returned_whole(tmp_path):
    ref, ours, _ = _pair(tmp_path, family="sigma", sample_size=64, interpolation_scale=1.0)
    x, t, y, mask = _inputs()
    with torch.no_grad():
        out = ours(x, t, ours.prepare_text(y, mask))
    expected = _reference(ref, x, t, y, mask)  # diffusers' PixArtTransformer2DModel on the same weights: 8 channels
    assert ours.config.learned_sigma and out.shape == expected.shape == (2, 8, 8, 8)
    assert (out - expected).abs().max() <= TOL  # the variance channels too, not only epsilon


def test_null_embedding_from_original_checkpoint(tmp_path):
    _, _, paths = _pair(tmp_path, family="alpha", sample_size=64)
    model = load_transformer(paths["original_pth"])
    emb, mask = model.null_text(2)
    stored = torch.load(paths["original_pth"], map_location="cpu", weights_only=True)
    stored = stored.get("state_dict", stored)["y_embedder.y_embedding"]  # the file's learned null caption (120, 64)
    assert emb.shape == (2, 120, 64) and torch.equal(emb, stored.expand(2, -1, -1))
    assert torch.equal(mask, torch.ones(2, 120, dtype=torch.long))
    with pytest.raises(PixArtError, match="null caption"):
        load_transformer(paths["diffusers_folder"]).null_text(1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_fp32(tmp_path, dtype):
    ref, ours, paths = _pair(tmp_path, family="alpha", sample_size=128)
    half = load_transformer(paths["original_safetensors"], dtype=dtype)
    assert half.dtype == dtype
    x, t, y, mask = _inputs()
    with torch.no_grad():
        full = ours(x, t, ours.prepare_text(y, mask))
        low = half(x, t, half.prepare_text(y, mask))
    assert low.dtype == torch.float32  # output follows the latent's dtype
    assert (low - full).abs().max() < 0.1
    assert torch.nn.functional.cosine_similarity(low.flatten(), full.flatten(), dim=0) > 0.999


def test_bad_inputs_give_clear_errors(tmp_path):
    _, ours, _ = _pair(tmp_path, family="sigma", sample_size=64, interpolation_scale=1.0)
    x, t, y, mask = _inputs()
    text = ours.prepare_text(y, mask)
    with pytest.raises(PixArtError, match="4, height/8"):
        ours(torch.randn(1, 16, 8, 8), t[:1], text)
    with pytest.raises(PixArtError, match="multiples of 16"):
        ours(torch.randn(1, 4, 7, 8), t[:1], text)
    with pytest.raises(PixArtError, match="T5 embeddings"):
        ours.prepare_text(torch.randn(1, 5, 32))
