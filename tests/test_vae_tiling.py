"""The tiling machinery itself, against diffusers' untiled AutoencoderKL on the same (tiny, random) weights."""

import pytest
import torch
import torch.nn as nn
from diffusers import AutoencoderKL

from pixart_core.vae_tiling import (
    AttentionStep,
    ConvStep,
    Moments,
    Plan,
    TileRunner,
    decoder_steps,
    encoder_steps,
    exact_tiles,
    fast_parts,
    key_stride,
    run_fast,
)

CPU = torch.device("cpu")


def tiny_model(groups: int = 8) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(32, 32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                         norm_num_groups=groups).eval()


def runner(channels_last: bool = False) -> TileRunner:
    return TileRunner(CPU, CPU, torch.float32, torch.float32, channels_last=channels_last)


pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")  # hundreds of tiny tiles


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def inputs(model):
    g = torch.Generator().manual_seed(3)
    z = torch.randn(1, 4, 12, 16, generator=g) * 3
    x = torch.rand(1, 3, 96, 128, generator=g) * 2 - 1
    with torch.no_grad():
        dec = model.decoder(model.post_quant_conv(z))
        enc = model.quant_conv(model.encoder(x))
    return z, x, dec, enc


@pytest.mark.parametrize("work_bytes", [1 << 30, 1 << 20, 100_000], ids=["whole-maps", "strips", "squares"])
def test_exact_run_equals_untiled_network(model, inputs, work_bytes):
    """Every step tiled (strips, or squares with attention in 4-row strips), GroupNorm statistics pooled over the
    tiles: the same result as the untiled network, for the decoder and the encoder."""
    z, x, dec, enc = inputs
    steps = decoder_steps(model)
    image_tiles = exact_tiles(steps[-2], 32, (96, 128), work_bytes, 4)
    attention_strips = exact_tiles(steps[4], 64, (12, 16), work_bytes, 4)
    if work_bytes == 1 << 20:
        assert len(image_tiles) > 4 and all(t[3] - t[2] == 128 for t in image_tiles)
    if work_bytes == 100_000:
        assert len(image_tiles) > 20 and len(attention_strips) > 1
        assert any(t[3] - t[2] < 128 for t in image_tiles)
    out = runner().run_exact(steps, z.clone(), work_bytes)
    assert (out - dec).abs().max().item() < 1e-4
    out = runner().run_exact(encoder_steps(model), x.clone(), work_bytes)
    assert (out - enc).abs().max().item() < 1e-4


@pytest.mark.parametrize("which", ["decoder", "encoder"])
def test_independent_tiles_with_true_statistics_equal_untiled(model, inputs, which):
    """Fast mode's halo arithmetic: tiles computed independently, given the whole map's GroupNorm statistics,
    reproduce the untiled network exactly; so fast mode's only error is its statistics estimate."""
    z, x, dec, enc = inputs
    r = runner()
    if which == "decoder":
        steps, inp, ref, latent = decoder_steps(model), z, dec, (12, 16)
        parts = fast_parts(steps, latent, latent, 6)
        src = r.run_exact(parts.pre, inp.clone(), 1 << 30)
    else:
        steps, inp, ref, latent = encoder_steps(model), x, enc, (12, 16)
        parts = fast_parts(steps, (96, 128), latent, 6)
        src = inp
    assert len(parts.grid) > 4
    table: dict = {}
    r.run_exact(parts.tiled, src.clone(), 1 << 30, record=table)
    out = torch.empty(1, parts.tiled[-1].out_channels, *parts.sizes[-1])
    for region in parts.grid:
        out[:, :, region[0]:region[1], region[2]:region[3]] = r.run_tile(parts.tiled, src, parts.sizes, region, table)
    if parts.post:
        out = r.run_exact(parts.post, out, 1 << 30)
    assert (out - ref).abs().max().item() < 1e-4


def test_channels_last_runner_equals_the_untiled_network(model, inputs):
    """The CPU speed path (maps and weights channels-last) computes the same numbers, exact and fast."""
    z, x, dec, enc = inputs
    cl_model = tiny_model().to(memory_format=torch.channels_last)
    out = runner(channels_last=True).run_exact(decoder_steps(cl_model), z.clone(), 100_000)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert (out - dec).abs().max().item() < 1e-4
    out = runner(channels_last=True).run_exact(encoder_steps(cl_model), x.clone(), 1 << 20)
    assert (out - enc).abs().max().item() < 1e-4
    plan = Plan("fast", 1 << 30, 6)
    plain = run_fast(runner(), decoder_steps(model), z.clone(), (12, 16), plan)
    fast_cl = run_fast(runner(channels_last=True), decoder_steps(cl_model), z.clone(), (12, 16), plan)
    assert (fast_cl - plain).abs().max().item() < 1e-4


def test_key_stride_keeps_at_most_max_keys():
    assert key_stride((512, 512), 128 * 128) == 4 and key_stride((256, 256), 128 * 128) == 2
    assert key_stride((128, 128), 128 * 128) == 1 and key_stride((512, 512), 0) == 1
    for h in range(1, 40):
        for w in range(1, 40, 3):
            for max_keys in (1, 5, 48, 300):
                s = key_stride((h, w), max_keys)
                kept = len(range(s // 2, h, s)) * len(range(s // 2, w, s))
                assert kept >= 1  # never an attention over no keys
                if s < 2 * min(h, w) - 1:  # not capped by a thin map
                    assert kept <= max(max_keys, h * w if s == 1 else 0)


@pytest.mark.parametrize("work_bytes", [1 << 30, 20_000], ids=["one-strip", "row-strips"])
def test_subsampled_attention_equals_diffusers_attention_over_those_keys(model, work_bytes):
    """Fast mode's bounded attention: queries from every pixel, keys and values from every 2nd pixel of every 2nd
    row (offset 1), normalised with the whole map's statistics; the same as diffusers' Attention given exactly
    those pixels as its key/value states. With enough keys allowed it is the full attention."""
    step = next(s for s in decoder_steps(model) if isinstance(s, AttentionStep))
    x = torch.randn(1, 64, 12, 16, generator=torch.Generator().manual_seed(5)) * 2
    attn = step.attn
    with torch.no_grad():
        keys = attn.group_norm(x)[:, :, 1::2, 1::2].flatten(2).transpose(1, 2)
        subsampled_ref, full_ref = attn(x, encoder_hidden_states=keys), attn(x)
    if work_bytes == 20_000:
        assert len(exact_tiles(step, 64, (12, 16), work_bytes, 4)) > 2  # strips without key rows are covered too
    assert key_stride((12, 16), 48) == 2
    out = runner().run_exact([step], x.clone(), work_bytes, attention_keys=48)
    assert (out - subsampled_ref).abs().max().item() < 1e-4
    assert (out - full_ref).abs().max().item() > 1e-3  # the keys really were subsampled
    out = runner().run_exact([step], x.clone(), work_bytes, attention_keys=12 * 16)
    assert (out - full_ref).abs().max().item() < 1e-4


def test_pooled_moments_are_those_of_the_union():
    """Chan pooling gives the exact mean/variance of all tiles together, including the between-tile spread that an
    average of per-tile variances misses."""
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 8, 30, 40, generator=g)
    t[:, :, :10] += 5.0  # tiles with very different means
    moments = Moments()
    per_tile_var = []
    for y0, y1 in [(0, 10), (10, 25), (25, 30)]:
        for x0, x1 in [(0, 17), (17, 40)]:
            moments.add(t[:, :, y0:y1, x0:x1])
            per_tile_var.append(t[:, :, y0:y1, x0:x1].reshape(2, 4, -1).var(-1, unbiased=False))
    mean, var = moments.group_stats(4)
    groups = t.reshape(2, 4, -1).double()
    assert torch.allclose(mean, groups.mean(-1), atol=1e-9)
    assert torch.allclose(var, groups.var(-1, unbiased=False), atol=1e-9)
    assert (var.float() - torch.stack(per_tile_var).mean(0)).abs().max() > 1.0  # what naive pooling would lose


def test_moments_refuse_non_finite_tiles():
    moments = Moments()
    assert moments.add(torch.ones(1, 4, 3, 3))
    bad = torch.ones(1, 4, 3, 3)
    bad[0, 1, 1, 1] = float("inf")
    assert not moments.add(bad)
    assert moments.count == 9


def test_fp16_overflow_in_a_later_tile_moves_the_rest_of_the_run_to_fp32(caplog):
    """Tiles already written in fp16 stay, the overflowing tile is redone, and every later tile and step runs in
    fp32: the result is finite and matches an fp32 run."""
    torch.manual_seed(0)
    big = nn.Conv2d(4, 8, 3, padding=1)
    with torch.no_grad():
        big.weight.fill_(60.0)
    steps = [ConvStep(big), ConvStep(nn.Conv2d(8, 8, 3, padding=1), norm=nn.GroupNorm(2, 8))]
    x = torch.full((1, 4, 32, 16), 0.01)
    x[:, :, 24:] = 50.0  # only the bottom strips overflow fp16: 50 * 60 * 36 inputs > 65504
    reference = runner().run_exact(steps, x.clone(), 1 << 30)
    half = TileRunner(CPU, CPU, torch.float16, torch.float32)
    tiles = exact_tiles(steps[0], 4, (32, 16), 5_000, 2)
    assert len(tiles) >= 4 and tiles[0][1] <= 24
    with caplog.at_level("WARNING", logger="pixart_core.vae_tiling"):
        out = half.run_exact([s for s in steps], x.clone().half(), 5_000)
    assert half.dtype == torch.float32 and "overflowed" in caplog.text
    assert torch.isfinite(out).all()
    assert (out.float() - reference).abs().max().item() < 1e-2 * reference.abs().max().item()
