"""pixart_core.vae: loading both file layouts, latent scale/shift, tiled decode/encode parity with diffusers' untiled
AutoencoderKL on the same random weights, fp16 overflow fallback, progress/cancel, and refusals of wrong files."""

import json
import logging
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from safetensors.torch import save_file

from pixart_core.errors import PixArtError
from pixart_core.loading.vae_files import load_vae
from pixart_core.vae import SD_VAE_CONFIG, PixArtVAE, decode_fitting, encode_fitting, raw_to_scaled, scaled_to_raw
from tests.factories import to_ldm

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(block_out_channels=(32, 32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=4, norm_num_groups=8)


def tiny_model(seed: int = 0, **overrides) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(**dict(TINY, **overrides)).eval()


def smooth_latents(h: int, w: int, seed: int = 1) -> torch.Tensor:
    """Scaled latents with smooth structure and a global gradient, so that tiles differ in their statistics as in real
    images (random weights make any image meaningless; the comparison is about tiles agreeing with the whole)."""
    g = torch.Generator().manual_seed(seed)
    low = F.interpolate(torch.randn(1, 4, h // 8 + 2, w // 8 + 2, generator=g), size=(h, w), mode="bicubic",
                        align_corners=True)
    yy, xx = torch.linspace(-1, 1, h)[:, None], torch.linspace(-1, 1, w)[None]
    return low + 1.5 * yy * xx + 0.3 * torch.randn(1, 4, h, w, generator=g)


def smooth_image(h: int, w: int, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    img = F.interpolate(torch.rand(1, 3, h // 64 + 2, w // 64 + 2, generator=g), size=(h, w), mode="bicubic",
                        align_corners=True)
    edges = ((torch.arange(w) // 24) % 2).float()[None] * (torch.arange(h) > h // 2).float()[:, None]
    return (img + 0.3 * edges + 0.05 * torch.rand(1, 3, h, w, generator=g)).clamp(0, 1)


def diffusers_tiled_decode(model: AutoencoderKL, z: torch.Tensor, tile: int) -> torch.Tensor:
    model.enable_tiling()
    model.tile_sample_min_size, model.tile_latent_min_size = tile, tile // 8
    try:
        with torch.no_grad():
            return model.decode(z).sample
    finally:
        model.disable_tiling()


def report(name: str, **numbers) -> None:
    print(f"[vae] {name}: " + ", ".join(f"{k}={v:.3g}" for k, v in numbers.items()))


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models and small tiles


# ---------------------------------------------------------------------------------------------------------------------
# Decode / encode parity
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("height,width", [(512, 512), (768, 1024)])
def test_tiled_decode_matches_whole_and_fast_beats_diffusers_tiling(height, width):
    model = tiny_model()
    vae = PixArtVAE(model, "sd", 0.18215)
    z = smooth_latents(height // 8, width // 8)
    with torch.no_grad():
        whole = model.decode(z / 0.18215).sample
    exact = vae.decode(z, mode="exact", tile_size=128, output="signed")
    fast = vae.decode(z, mode="fast", tile_size=192, output="signed")  # partial tiles at the right/bottom edges
    theirs = diffusers_tiled_decode(model, z / 0.18215, 192)
    d_exact, d_fast, d_theirs = (exact - whole).abs(), (fast - whole).abs(), (theirs - whole).abs()
    report(f"tiny VAE decode {width}x{height}", exact_max=d_exact.max(), fast_max=d_fast.max(),
           fast_mean=d_fast.mean(), diffusers_tiling_max=d_theirs.max(), diffusers_tiling_mean=d_theirs.mean(),
           output_std=whole.std())
    assert d_exact.max().item() <= 1e-3
    assert d_fast.mean() < d_theirs.mean() and d_fast.max() < d_theirs.max()
    assert d_theirs.max() > 0.1  # diffusers really tiled this input (and left tile-sized differences)


def test_tiled_decode_full_sd_architecture_512():
    """The real SD VAE shape (128-512 channels, 32 groups, 512-wide mid attention) with random weights at 512x512:
    exact tiled decode (small tiles) equals diffusers' untiled decode. ~17 s per decode on this CPU, so only exact
    here; the tiny-VAE tests compare fast mode with diffusers' tiling, and bench_vae.py does it at 2048 on this
    architecture."""
    torch.set_num_threads(2)  # big convolutions: both cores pay off (the fixture restores the setting)
    torch.manual_seed(0)
    model = AutoencoderKL(**{k: v for k, v in SD_VAE_CONFIG.items()}).eval()
    vae = PixArtVAE(model, "sd", 0.18215)
    z = smooth_latents(64, 64)
    with torch.no_grad():
        whole = model.decode(z / 0.18215).sample
    exact = vae.decode(z, mode="exact", tile_size=128, output="signed")
    report("full SD VAE decode 512x512", exact_max=(exact - whole).abs().max(), output_std=whole.std())
    assert (exact - whole).abs().max().item() <= 1e-3


def test_tiled_encode_matches_whole():
    model = tiny_model()
    vae = PixArtVAE(model, "sd", 0.18215)
    image = smooth_image(512, 384)
    with torch.no_grad():
        whole = model.encode(image * 2 - 1).latent_dist.mean * 0.18215
    exact = vae.encode(image, mode="exact", tile_size=128)
    fast = vae.encode(image, mode="fast", tile_size=128)
    model.enable_tiling()
    model.tile_sample_min_size, model.tile_latent_min_size = 128, 16
    with torch.no_grad():
        theirs = model.encode(image * 2 - 1).latent_dist.mean * 0.18215
    model.disable_tiling()
    d_fast, d_theirs = (fast - whole).abs(), (theirs - whole).abs()
    report("tiny VAE encode 384x512", exact_max=(exact - whole).abs().max(), fast_max=d_fast.max(),
           fast_mean=d_fast.mean(), diffusers_tiling_max=d_theirs.max(), diffusers_tiling_mean=d_theirs.mean())
    assert (exact - whole).abs().max().item() <= 1e-4
    assert d_fast.mean() < d_theirs.mean()


def test_encode_sample_matches_diffusers_posterior_sample():
    model = tiny_model()
    vae = PixArtVAE(model, "sd", 0.18215)
    image = smooth_image(64, 64)
    with torch.no_grad():
        theirs = model.encode(image * 2 - 1).latent_dist.sample(generator=torch.Generator().manual_seed(7)) * 0.18215
    ours = vae.encode(image, mode="whole", sample=True, generator=torch.Generator().manual_seed(7))
    assert (ours - theirs).abs().max().item() < 1e-5
    signed = vae.encode(image * 2 - 1, input="signed", mode="exact")
    assert (signed - vae.encode(image, mode="exact")).abs().max().item() < 1e-5


def test_untiled_cpu_decode_runs_channels_last_and_equals_the_plain_network():
    model = tiny_model()
    reference = tiny_model()  # same seed, same weights, left as diffusers builds it
    vae = PixArtVAE(model, "sd", 0.18215)
    z = smooth_latents(24, 16)
    with torch.no_grad():
        want = reference.decode(z / 0.18215).sample
    got = vae.decode(z, mode="whole", output="signed")
    assert model.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert got.is_contiguous() and (got - want).abs().max().item() < 1e-4  # float rounding of another conv kernel
    # the tile runner on the converted weights (it reads contiguous copies) still equals the network
    assert (vae.decode(z, mode="exact", output="signed", tile_size=64) - want).abs().max().item() < 1e-4


def test_auto_mode_follows_the_memory_budget():
    model = tiny_model()
    vae = PixArtVAE(model, "sd", 0.18215)
    from pixart_core.vae_tiling import decoder_steps, whole_peak_bytes

    steps, shape = decoder_steps(model), (1, 4, 128, 128)
    whole = whole_peak_bytes(steps, (128, 128), 4, 4) + 4 * 3 * 1024 * 1024  # the network, plus the fp32 image
    assert vae.plan(steps, shape, (128, 128), "auto", memory_budget=whole).mode == "whole"  # the CPU's fastest
    assert vae.plan(steps, shape, (128, 128), "auto", memory_budget=whole - 1).mode == "exact"
    small = vae.plan(steps, shape, (128, 128), "auto", memory_budget=64 << 20)
    assert small.mode == "fast" and small.tile < 128
    assert vae.plan(steps, shape, (128, 128), "auto", tile_size=256, memory_budget=64 << 20).tile == 32


# ---------------------------------------------------------------------------------------------------------------------
# Scale, shift, ComfyUI types, progress, cancel, input checks
# ---------------------------------------------------------------------------------------------------------------------


def test_alpha_and_sigma_latents_decode_with_their_scale_and_shift(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "vae")
    z = smooth_latents(16, 16)
    alpha = load_vae(tmp_path / "vae", latent_scale=0.18215, config_overrides={"norm_num_groups": 8})
    sigma = load_vae(tmp_path / "vae", latent_scale=0.13025)
    shifted = load_vae(tmp_path / "vae", kind="sdxl", config_overrides={"shift_factor": 0.25})
    assert (alpha.kind, alpha.scaling_factor, sigma.kind, sigma.scaling_factor) == ("sd", 0.18215, "sdxl", 0.13025)
    with torch.no_grad():
        for vae, expected in [(alpha, model.decode(z / 0.18215).sample), (sigma, model.decode(z / 0.13025).sample),
                              (shifted, model.decode(z / 0.13025 + 0.25).sample)]:
            assert (vae.decode(z, mode="whole", output="signed") - expected).abs().max().item() < 1e-5
        image = smooth_image(64, 64)
        raw = model.encode(image * 2 - 1).latent_dist.mean
    assert (shifted.encode(image, mode="whole") - (raw - 0.25) * 0.13025).abs().max().item() < 1e-5
    sigma.check_latent_scale(0.13025)
    with pytest.raises(PixArtError, match="SDXL VAE"):
        sigma.check_latent_scale(0.18215)


def test_raw_and_scaled_latents_convert_both_ways():
    vae = PixArtVAE(tiny_model(), "sdxl", 0.13025)
    z = smooth_latents(8, 8)
    raw = vae.to_raw(z)
    assert torch.equal(raw, z.float() / 0.13025) and torch.equal(raw, scaled_to_raw(z, 0.13025))
    assert torch.allclose(vae.from_raw(raw), z) and torch.allclose(raw_to_scaled(raw, 0.13025), z)
    assert torch.allclose(raw_to_scaled(raw, 0.13025, 0.25), (raw - 0.25) * 0.13025)
    assert torch.allclose(scaled_to_raw(z, 0.13025, 0.25), z / 0.13025 + 0.25)
    decoded = vae.decode(z, mode="whole")
    assert decoded.min() >= 0 and decoded.max() <= 1
    signed = vae.decode(z, mode="whole", output="signed")
    assert torch.allclose(decoded, (signed * 0.5 + 0.5).clamp(0, 1))
    # the nodes' one call each way: raw latents (ComfyUI's LATENT) in and out of the fitting decode / encode
    assert torch.equal(decode_fitting(vae, raw, "whole", raw_latents=True), vae.decode(vae.from_raw(raw), mode="whole"))
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    assert torch.equal(encode_fitting(vae, images, raw_latents=True), vae.to_raw(vae.encode(images)))


class _OutOfMemoryUntil:
    """A decode/encode stand-in that runs out of memory until the tile is at most `fits` px (None: never fits)."""

    def __init__(self, run, fits):
        self.run, self.fits, self.calls = run, fits, []

    def __call__(self, x, mode="auto", tile_size=None, **kwargs):
        self.calls.append((mode, tile_size))
        if self.fits is None or mode != "fast" or tile_size is None or tile_size > self.fits:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.run(x, mode=mode, tile_size=tile_size, **kwargs)


def test_decode_fitting_halves_the_tile_after_out_of_memory():
    vae = PixArtVAE(tiny_model(), "sd", 0.18215)
    z = smooth_latents(8, 8)
    vae.decode = _OutOfMemoryUntil(vae.decode, fits=128)
    freed = []
    out = decode_fitting(vae, z, "auto", None, free_memory=freed.append)
    assert vae.decode.calls == [("auto", None), ("fast", 512), ("fast", 256), ("fast", 128)]
    assert freed == [True, False, False]  # garbage collected once, on the first retry
    assert torch.equal(out, PixArtVAE.decode(vae, z, mode="fast", tile_size=128))


def test_fitting_stops_with_a_user_error_at_the_smallest_tile_and_leaves_other_errors_alone():
    vae = PixArtVAE(tiny_model(), "sd", 0.18215)
    vae.encode = _OutOfMemoryUntil(vae.encode, fits=None)
    with pytest.raises(PixArtError, match="even with 64 px tiles"):
        encode_fitting(vae, torch.rand(1, 3, 64, 64), 256, free_memory=lambda collect: None)
    assert vae.encode.calls == [("auto", 256), ("fast", 128), ("fast", 64)]

    def broken(*args, **kwargs):
        raise RuntimeError("expected scalar type Float but found Half")

    vae.decode = broken
    with pytest.raises(RuntimeError, match="scalar type"):
        decode_fitting(vae, smooth_latents(8, 8), free_memory=lambda collect: None)


def test_progress_callback_and_interrupt():
    vae = PixArtVAE(tiny_model(), "sd", 0.18215)
    z = smooth_latents(16, 16)
    for mode in ("exact", "fast"):
        calls = []
        vae.decode(z, mode=mode, tile_size=64, callback=lambda done, total: calls.append((done, total)))
        assert len(calls) > 4 and calls[-1][0] == calls[-1][1] == len(calls)
        assert [c[0] for c in calls] == sorted(c[0] for c in calls)

    class Cancelled(Exception):
        pass

    seen = []

    def interrupt():
        seen.append(1)
        if len(seen) == 3:
            raise Cancelled

    with pytest.raises(Cancelled):
        vae.decode(z, mode="exact", tile_size=64, interrupt=interrupt)


def test_batch_samples_keep_their_own_statistics():
    model = tiny_model()
    vae = PixArtVAE(model, "sd", 0.18215)
    z = torch.cat([smooth_latents(16, 24, seed=1), 3 * smooth_latents(16, 24, seed=5)])
    with torch.no_grad():
        whole = model.decode(z / 0.18215).sample
    for mode in ("exact", "fast"):
        out = vae.decode(z, mode=mode, tile_size=64, output="signed")
        assert out.shape == whole.shape
        if mode == "exact":
            assert (out - whole).abs().max().item() < 1e-4
    single = vae.decode(z[1:], mode="fast", tile_size=64, output="signed")
    assert torch.equal(single, out[1:])


def test_bad_inputs_are_explained():
    vae = PixArtVAE(tiny_model(), "sd", 0.18215)
    with pytest.raises(PixArtError, match="SD3/Flux"):
        vae.decode(torch.zeros(1, 16, 8, 8))
    bad = torch.zeros(1, 4, 8, 8)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(PixArtError, match="NaN"):
        vae.decode(bad)
    with pytest.raises(PixArtError, match="multiple of 8"):
        vae.encode(torch.zeros(1, 3, 60, 64))
    with pytest.raises(PixArtError, match="mode"):
        vae.decode(torch.zeros(1, 4, 8, 8), mode="tiled")
    with pytest.raises(PixArtError, match="tile_size"):
        vae.decode(torch.zeros(1, 4, 8, 8), tile_size=100)


# ---------------------------------------------------------------------------------------------------------------------
# fp16 safety
# ---------------------------------------------------------------------------------------------------------------------


def overflowing_model() -> AutoencoderKL:
    """Weights whose activations overflow fp16 (the SDXL-VAE failure) but are harmless in fp32: one up-block
    convolution scaled by 1e6; the next GroupNorm removes the scale again."""
    model = tiny_model()
    with torch.no_grad():
        conv = model.decoder.up_blocks[1].resnets[0].conv1
        conv.weight.mul_(1e6)
        conv.bias.mul_(1e6)
    return model


@pytest.mark.parametrize("mode", ["whole", "exact", "fast"])
def test_fp16_overflow_falls_back_instead_of_nan(mode, caplog):
    model = overflowing_model()
    z = smooth_latents(16, 16)
    with torch.no_grad():
        reference = model.decode(z / 0.18215).sample
        naive = model.half().decode((z / 0.18215).half()).sample
    assert not torch.isfinite(naive).all()  # plain fp16 really fails here
    vae = PixArtVAE(model, "sd", 0.18215)
    assert vae.dtype == torch.float16
    with caplog.at_level(logging.WARNING, logger="pixart_core.vae_tiling"):
        out = vae.decode(z, mode=mode, tile_size=64, output="signed")
    assert torch.isfinite(out).all()
    assert "overflowed" in caplog.text
    tolerance = 0.05 if mode != "fast" else 1.0  # fp16 until the overflow, then fp32; fast adds its estimate
    assert (out - reference).abs().mean().item() < tolerance


# ---------------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------------


class NotWeights:
    """An arbitrary object inside a pickle: what weights_only loading must refuse."""


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_folder_and_ldm_single_file_load_identical_weights(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "pipeline" / "vae")
    ldm = to_ldm(model.state_dict())
    assert "decoder.up.0.upsample.conv.weight" not in ldm and "decoder.up.3.upsample.conv.weight" in ldm
    assert ldm["encoder.mid.attn_1.q.weight"].ndim == 4
    save_file(ldm, tmp_path / "vae-ft-ema.safetensors")
    full_checkpoint = {f"first_stage_model.{k}": v for k, v in ldm.items()}
    full_checkpoint["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(4, 4, 3, 3)
    torch.save({"state_dict": full_checkpoint}, tmp_path / "sd15.ckpt")
    groups = {"norm_num_groups": 8}

    folder = load_vae(tmp_path / "pipeline", kind="sd")  # a pipeline folder: its vae/ is used
    single = load_vae(tmp_path / "vae-ft-ema.safetensors", kind="sd", config_overrides=groups)
    nested = load_vae(tmp_path / "sd15.ckpt", kind="sd", config_overrides=groups)
    for vae in (folder, single, nested):
        assert same_weights(vae.model, model)
    z = smooth_latents(8, 8)
    assert torch.equal(folder.decode(z, mode="whole"), single.decode(z, mode="whole"))

    half = load_vae(tmp_path / "vae-ft-ema.safetensors", kind="sd", dtype=torch.float16, config_overrides=groups)
    assert half.dtype == torch.float16


def test_single_file_with_non_sd_group_norm_asks_for_its_config(tmp_path):
    """A 16-channel VAE (like PixArt-nano's) cannot use SD's 32 GroupNorm groups: a clear error naming the way
    out, not diffusers' ValueError; with the override it loads the same weights."""
    model = tiny_model(block_out_channels=(16, 32, 32, 64))
    save_file(to_ldm(model.state_dict()), tmp_path / "nano_vae.safetensors")
    with pytest.raises(PixArtError, match="config_overrides"):
        load_vae(tmp_path / "nano_vae.safetensors", kind="sd")
    vae = load_vae(tmp_path / "nano_vae.safetensors", kind="sd", config_overrides={"norm_num_groups": 8})
    assert same_weights(vae.model, model)


def test_decoder_only_file_decodes_but_refuses_to_encode(tmp_path):
    model = tiny_model()
    decoder_only = {k: v for k, v in to_ldm(model.state_dict()).items() if not k.startswith(("encoder.", "quant_conv"))}
    save_file(decoder_only, tmp_path / "decoder.safetensors")
    vae = load_vae(tmp_path / "decoder.safetensors", kind="sd", config_overrides={"norm_num_groups": 8})
    assert not vae.can_encode
    with torch.no_grad():
        expected = model.decode(smooth_latents(8, 8) / 0.18215).sample
    assert (vae.decode(smooth_latents(8, 8), mode="exact", output="signed") - expected).abs().max() < 1e-4
    with pytest.raises(PixArtError, match="only a decoder"):
        vae.encode(torch.zeros(1, 3, 64, 64))


def test_kind_resolution(tmp_path, caplog):
    model = tiny_model()
    ldm = to_ldm(model.state_dict())
    groups = {"norm_num_groups": 8}
    save_file(ldm, tmp_path / "sdxl_vae.safetensors")
    save_file(ldm, tmp_path / "some_vae.safetensors")
    assert load_vae(tmp_path / "sdxl_vae.safetensors", config_overrides=groups).kind == "sdxl"
    assert load_vae(tmp_path / "sdxl_vae.safetensors", kind="sd", config_overrides=groups).scaling_factor == 0.18215
    assert load_vae(tmp_path / "some_vae.safetensors", latent_scale=0.13025, config_overrides=groups).kind == "sdxl"
    with caplog.at_level(logging.WARNING, logger="pixart_core.loading.vae_files"):
        assert load_vae(tmp_path / "some_vae.safetensors", config_overrides=groups).kind == "sd"
    assert "cannot be told apart" in caplog.text
    model.save_pretrained(tmp_path / "folder")
    config = json.loads((tmp_path / "folder" / "config.json").read_text())
    config["scaling_factor"] = 0.13025
    (tmp_path / "folder" / "config.json").write_text(json.dumps(config))
    assert load_vae(tmp_path / "folder").kind == "sdxl"
    with pytest.raises(PixArtError, match="neither"):
        load_vae(tmp_path / "folder", latent_scale=0.5)


def test_wrong_files_are_refused_with_what_they_are(tmp_path):
    model = tiny_model()
    ldm = to_ldm(model.state_dict())
    cases = {
        "unet.safetensors": ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)}, "UNet"),
        "pixart.safetensors": ({"x_embedder.proj.weight": torch.zeros(2, 2), "t_block.1.weight": torch.zeros(2, 2),
                                "blocks.0.attn.qkv.weight": torch.zeros(2, 2)}, "PixArt transformer"),
        "t5.safetensors": ({"shared.weight": torch.zeros(2, 2),
                            "encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(2, 2)}, "text encoder"),
        "partial.safetensors": ({k: v for k, v in ldm.items() if "up.2" not in k}, "missing"),
        "flux_ae.safetensors": (dict(ldm, **{"decoder.conv_in.weight": torch.zeros(64, 16, 3, 3)}), "16 latent"),
    }
    for name, (state, expected) in cases.items():
        save_file(state, tmp_path / name)
        with pytest.raises(PixArtError, match=expected):
            load_vae(tmp_path / name, kind="sd", config_overrides={"norm_num_groups": 8})

    good = tmp_path / "good.safetensors"
    save_file(ldm, good)
    (tmp_path / "truncated.safetensors").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(PixArtError, match="truncated"):
        load_vae(tmp_path / "truncated.safetensors", kind="sd")

    torch.save({"decoder.conv_in.weight": torch.zeros(1), "extra": NotWeights()}, tmp_path / "pickle.pt")
    with pytest.raises(PixArtError, match="refused"):
        load_vae(tmp_path / "pickle.pt", kind="sd")
    with pytest.raises(PixArtError, match="not found"):
        load_vae(tmp_path / "nope.safetensors")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(PixArtError, match="config.json"):
        load_vae(tmp_path / "empty_dir")


# ---------------------------------------------------------------------------------------------------------------------
# Benchmark smoke test
# ---------------------------------------------------------------------------------------------------------------------


def test_bench_quick_runs(capsys, monkeypatch):
    """bench_vae.py --quick, in-process (a subprocess would spend most of its time importing torch and diffusers)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import bench_vae
    finally:
        sys.path.remove(str(ROOT / "bench"))
    monkeypatch.setattr(sys, "argv", ["bench_vae.py", "--quick"])
    bench_vae.main()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "method" not in line]
    assert {row.split("|")[1].strip() for row in rows} == {"whole", "exact", "fast", "diffusers"}
