"""Checkpoint layouts, detection of every released variant, memory during a load, and refusals."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from pixart_core.loading.checkpoint import describe, detect, load_transformer, read_state_dict
from pixart_core.errors import PixArtError
from tests.factories import original_state_dict, tiny_diffusers_transformer, write_all_layouts

# ---------------------------------------------------------------------------------------------------------------
# Every layout gives the same weights
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,sample_size", [("alpha", 128), ("sigma", 64)])
def test_every_layout_loads_identical_weights(tmp_path, family, sample_size):
    ref = tiny_diffusers_transformer(family=family, sample_size=sample_size,
                                     interpolation_scale=None if family == "alpha" else 1.0)
    paths = write_all_layouts(ref, tmp_path, text_len=120 if family == "alpha" else 300)
    overrides = {"family": family, "sample_size": sample_size}  # a lone diffusers file does not say these
    models = {name: load_transformer(p, overrides=overrides if name == "diffusers_file" else None)
              for name, p in paths.items()}
    first = models["original_pth"].state_dict()
    for name, model in models.items():
        sd = model.state_dict()
        shared = [k for k in first if k != "y_embedder.y_embedding"]
        assert all(torch.equal(first[k], sd[k]) for k in shared), name
        assert model.config.family == family and model.config.sample_size == sample_size, name
    # the same weights come back as a plain state dict too
    assert torch.equal(read_state_dict(paths["diffusers_file"])["blocks.1.attn.qkv.weight"],
                       first["blocks.1.attn.qkv.weight"])


def test_sharded_and_fp16_diffusers_folders(tmp_path):
    ref = tiny_diffusers_transformer(family="sigma", sample_size=64, interpolation_scale=1.0)
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").exists()
    ref.half().save_pretrained(tmp_path / "fp16", variant="fp16")
    a = load_transformer(tmp_path / "sharded")
    b = load_transformer(tmp_path / "fp16", dtype=torch.float16)
    assert b.dtype == torch.float16
    for k, v in a.state_dict().items():
        assert torch.equal(v.half(), b.state_dict()[k]), k


# ---------------------------------------------------------------------------------------------------------------
# Full-size released checkpoints, detected from key sets and shapes only (meta tensors, no memory)
# ---------------------------------------------------------------------------------------------------------------


def released_original_shapes(*, depth=28, width=1152, text_len=120, micro=False, pos_tokens=None, prefix=""):
    """Key -> shape of the original .pth files, written from the α repo's model definitions (not from our model)."""
    d = width
    s = {
        "x_embedder.proj.weight": (d, 4, 2, 2), "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256), "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d), "t_embedder.mlp.2.bias": (d,),
        "t_block.1.weight": (6 * d, d), "t_block.1.bias": (6 * d,),
        "y_embedder.y_embedding": (text_len, 4096),
        "y_embedder.y_proj.fc1.weight": (d, 4096), "y_embedder.y_proj.fc1.bias": (d,),
        "y_embedder.y_proj.fc2.weight": (d, d), "y_embedder.y_proj.fc2.bias": (d,),
        "final_layer.scale_shift_table": (2, d),
        "final_layer.linear.weight": (32, d), "final_layer.linear.bias": (32,),
    }
    if pos_tokens:
        s["pos_embed"] = (1, pos_tokens, d)
    if micro:
        for e in ("csize_embedder", "ar_embedder"):
            s.update({f"{e}.mlp.0.weight": (d // 3, 256), f"{e}.mlp.0.bias": (d // 3,),
                      f"{e}.mlp.2.weight": (d // 3, d // 3), f"{e}.mlp.2.bias": (d // 3,)})
    for i in range(depth):
        b = f"blocks.{i}."
        s.update({
            b + "scale_shift_table": (6, d),
            b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
            b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
            b + "cross_attn.q_linear.weight": (d, d), b + "cross_attn.q_linear.bias": (d,),
            b + "cross_attn.kv_linear.weight": (2 * d, d), b + "cross_attn.kv_linear.bias": (2 * d,),
            b + "cross_attn.proj.weight": (d, d), b + "cross_attn.proj.bias": (d,),
            b + "mlp.fc1.weight": (4 * d, d), b + "mlp.fc1.bias": (4 * d,),
            b + "mlp.fc2.weight": (d, 4 * d), b + "mlp.fc2.bias": (d,),
        })
    return {prefix + k: v for k, v in s.items()}


RELEASED = [
    # file, shapes, expected (family, sample_size, pe_interpolation, micro, text_len, depth)
    ("PixArt-XL-2-256x256.pth", dict(pos_tokens=256), ("alpha", 32, 1.0, False, 120, 28)),
    ("PixArt-XL-2-512x512.pth", dict(pos_tokens=1024), ("alpha", 64, 1.0, False, 120, 28)),
    ("PixArt-XL-2-1024-MS.pth", dict(pos_tokens=4096, micro=True), ("alpha", 128, 2.0, True, 120, 28)),
    ("PixArt-Sigma-XL-2-256x256.pth", dict(pos_tokens=256, text_len=300), ("sigma", 32, 0.5, False, 300, 28)),
    ("PixArt-Sigma-XL-2-512-MS.pth", dict(pos_tokens=1024, text_len=300), ("sigma", 64, 1.0, False, 300, 28)),
    ("PixArt-Sigma-XL-2-1024-MS.pth", dict(pos_tokens=4096, text_len=300), ("sigma", 128, 2.0, False, 300, 28)),
    ("PixArt-Sigma-XL-2-2K-MS.pth", dict(pos_tokens=16384, text_len=300), ("sigma", 256, 4.0, False, 300, 28)),
    ("community 900M (depth 42) Σ-1024", dict(pos_tokens=4096, text_len=300, depth=42), ("sigma", 128, 2.0, False, 300, 42)),
]


@pytest.mark.parametrize("name,shape_kw,expected", RELEASED, ids=[r[0] for r in RELEASED])
def test_released_original_checkpoints_are_recognised(name, shape_kw, expected):
    det = detect(released_original_shapes(**shape_kw))
    c = det.config
    assert (c.family, c.sample_size, c.pe_interpolation, c.micro_conditions, c.text_len, c.depth) == expected
    assert (c.hidden_size, c.num_heads, c.out_channels, c.caption_channels) == (1152, 16, 8, 4096)
    assert not det.assumed, det.assumed  # everything came from the file
    from pixart_core.loading.checkpoint import _verify_keys, build_empty
    _verify_keys(build_empty(c), det.plan, released_original_shapes(**shape_kw))


def test_released_controlnet_combined_file_is_recognised():
    shapes = released_original_shapes(pos_tokens=4096, micro=True, prefix="base_model.")
    block = released_original_shapes(depth=1)
    for i in range(13):
        for k, v in block.items():
            if k.startswith("blocks.0."):
                shapes[f"controlnet.{i}.copied_block.{k[len('blocks.0.'):]}"] = v
        shapes[f"controlnet.{i}.after_proj.weight"] = (1152, 1152)
        shapes[f"controlnet.{i}.after_proj.bias"] = (1152,)
    shapes["controlnet.0.before_proj.weight"] = (1152, 1152)
    shapes["controlnet.0.before_proj.bias"] = (1152,)
    det = detect(shapes)
    assert det.layout == "controlnet-combined" and det.has_controlnet
    assert (det.config.family, det.config.sample_size, det.config.micro_conditions) == ("alpha", 128, True)


@pytest.mark.parametrize("variant", ["lcm-alpha-1024", "sigma-2k", "sigma-512", "alpha-512"])
def test_released_diffusers_configs_are_recognised(variant):
    """Diffusers transformers built on the meta device with the released configs ([HF] values in the reference)."""
    from diffusers import PixArtTransformer2DModel

    base = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                cross_attention_dim=1152, patch_size=2, caption_channels=4096, norm_type="ada_norm_single",
                num_embeds_ada_norm=1000)
    cfg = {
        "lcm-alpha-1024": dict(sample_size=128),  # α configs have no interpolation_scale; micro-conds by default
        "alpha-512": dict(sample_size=64),
        "sigma-2k": dict(sample_size=256, interpolation_scale=4, use_additional_conditions=False),
        "sigma-512": dict(sample_size=64, interpolation_scale=1, use_additional_conditions=False),
    }[variant]
    with torch.device("meta"):
        model = PixArtTransformer2DModel(**base, **cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    file_config = dict(base, **cfg)
    if "interpolation_scale" not in cfg:
        file_config.pop("interpolation_scale", None)
    c = detect(shapes, file_config).config
    expected = {
        "lcm-alpha-1024": ("alpha", 128, 2.0, True),
        "alpha-512": ("alpha", 64, 1.0, False),
        "sigma-2k": ("sigma", 256, 4.0, False),
        "sigma-512": ("sigma", 64, 1.0, False),
    }[variant]
    assert (c.family, c.sample_size, c.pe_interpolation, c.micro_conditions) == expected
    assert c.num_heads == 16 and c.depth == 28


def test_sigma_extras_qk_norm_and_kv_compress():
    shapes = released_original_shapes(pos_tokens=4096, text_len=300, depth=28)
    for i in range(28):
        shapes[f"blocks.{i}.attn.q_norm.weight"] = (1152,)
        shapes[f"blocks.{i}.attn.q_norm.bias"] = (1152,)
        shapes[f"blocks.{i}.attn.k_norm.weight"] = (1152,)
        shapes[f"blocks.{i}.attn.k_norm.bias"] = (1152,)
    for i in range(14, 28):
        shapes[f"blocks.{i}.attn.sr.weight"] = (1152, 1, 2, 2)
        shapes[f"blocks.{i}.attn.sr.bias"] = (1152,)
        shapes[f"blocks.{i}.attn.norm.weight"] = (1152,)
        shapes[f"blocks.{i}.attn.norm.bias"] = (1152,)
    c = detect(shapes).config
    assert c.qk_norm and c.kv_compress_layers == tuple(range(14, 28)) and c.kv_compress_scale == 2


def test_kv_compress_model_runs_on_odd_grids(tmp_path):
    """A tiny Σ model with KV compression (as the Σ repo's conv sampling) runs at non-square sizes."""
    from pixart_core.config import PixArtConfig
    from pixart_core.transformer import PixArtTransformer

    torch.manual_seed(0)
    cfg = PixArtConfig(family="sigma", depth=2, hidden_size=144, num_heads=2, caption_channels=64, text_len=300,
                       sample_size=64, pe_interpolation=1.0, qk_norm=True, kv_compress_layers=(1,))
    model = PixArtTransformer(cfg).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "kv.safetensors")
    loaded = load_transformer(tmp_path / "kv.safetensors")
    assert loaded.config.kv_compress_layers == (1,) and loaded.config.qk_norm
    x = torch.randn(1, 4, 12, 20)
    with torch.no_grad():
        out = loaded(x, torch.tensor([500.0]), loaded.prepare_text(torch.randn(1, 5, 64)))
    assert out.shape == (1, 8, 12, 20) and torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------------------------
# Describe and overrides
# ---------------------------------------------------------------------------------------------------------------


def test_describe_reports_what_was_found_and_assumed(tmp_path):
    ref = tiny_diffusers_transformer(family="alpha", sample_size=128)
    paths = write_all_layouts(ref, tmp_path / "a")
    info = describe(paths["original_pth"])
    assert info["family"] == "alpha" and info["micro_conditions"] and info["resolution"] == 1024
    assert info["layout"] == "original" and info["latent_scale"] == 0.18215
    sigma = tiny_diffusers_transformer(family="sigma", sample_size=64, interpolation_scale=1.0)
    lone_file = write_all_layouts(sigma, tmp_path / "s", text_len=300)["diffusers_file"]
    lone = describe(lone_file)  # a diffusers file without config.json says neither family nor size
    assert any(a.startswith("family=") for a in lone["assumed"])
    assert any(a.startswith("sample_size=") for a in lone["assumed"])
    fixed = describe(lone_file, overrides={"family": "sigma", "sample_size": 64})
    assert fixed["resolution"] == 512 and fixed["pe_interpolation"] == 1.0
    assert not any(a.startswith(("family=", "sample_size=")) for a in fixed["assumed"])
    assert any(a.startswith("text_len=") for a in fixed["assumed"])  # not in the file, not given
    given = describe(lone_file, overrides={"family": "sigma", "sample_size": 64, "text_len": 300})
    assert given["text_len"] == 300 and not any(a.startswith("text_len=") for a in given["assumed"])
    with pytest.raises(PixArtError, match="Unknown override"):
        describe(paths["original_pth"], overrides={"depht": 3})


# ---------------------------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------------------------


def test_sd_unet_is_refused(tmp_path):
    sd = {f"model.diffusion_model.input_blocks.{i}.0.weight": torch.zeros(2, 2) for i in range(8)}
    sd["model.diffusion_model.out.2.weight"] = torch.zeros(2)
    save_file(sd, tmp_path / "sd15.safetensors")
    with pytest.raises(PixArtError, match="Stable Diffusion UNet"):
        load_transformer(tmp_path / "sd15.safetensors")


def test_vae_is_refused(tmp_path):
    sd = {f"encoder.down.{i}.block.0.conv1.weight": torch.zeros(2) for i in range(4)}
    sd.update({f"decoder.up.{i}.block.0.conv1.weight": torch.zeros(2) for i in range(4)})
    save_file(sd, tmp_path / "vae.safetensors")
    with pytest.raises(PixArtError, match="PixArt Load VAE node"):
        load_transformer(tmp_path / "vae.safetensors")


def test_truncated_safetensors_is_refused(tmp_path):
    ref = tiny_diffusers_transformer(family="sigma", sample_size=64, interpolation_scale=1.0)
    paths = write_all_layouts(ref, tmp_path, text_len=300)
    data = paths["original_safetensors"].read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(PixArtError, match="truncated"):
        load_transformer(cut)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + b"\0" * 64)
    with pytest.raises(PixArtError, match="not a valid safetensors"):
        load_transformer(garbage)


def test_missing_blocks_are_refused(tmp_path):
    ref = tiny_diffusers_transformer(family="sigma", sample_size=64, interpolation_scale=1.0, depth=3)
    sd = original_state_dict({k: v for k, v in ref.state_dict().items()}, text_len=300)
    for k in [k for k in sd if k.startswith("blocks.1.")]:
        del sd[k]
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "holes.safetensors")
    with pytest.raises(PixArtError, match=r"blocks \[1\] are missing"):
        load_transformer(tmp_path / "holes.safetensors")
    sd2 = original_state_dict({k: v for k, v in ref.state_dict().items()}, text_len=300)
    del sd2["blocks.2.mlp.fc2.weight"]
    save_file({k: v.contiguous() for k, v in sd2.items()}, tmp_path / "partial.safetensors")
    with pytest.raises(PixArtError, match="Missing: blocks.2.mlp.fc2.weight"):
        load_transformer(tmp_path / "partial.safetensors")


class _Payload:
    """Unpickling this calls os.system: the loader must refuse it without running it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "payload_ran"
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x_embedder.proj.weight": torch.zeros(1)}, "hook": _Payload(marker)}, evil)
    with pytest.raises(PixArtError, match="could run code"):
        load_transformer(evil)
    assert not marker.exists(), "the pickle payload ran"
    # the payload is real: an unsafe load would run it (proves the test can fail)
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(PixArtError, match="does not exist"):
        load_transformer(tmp_path / "nope.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PixArtError, match="contains no model weights"):
        load_transformer(tmp_path / "empty")
    loop = tmp_path / "loop.safetensors"
    loop.symlink_to(loop)
    with pytest.raises(PixArtError, match="broken link|does not exist"):
        load_transformer(loop)


# ---------------------------------------------------------------------------------------------------------------
# Memory: load straight into the target dtype with no random init and no second copy
# ---------------------------------------------------------------------------------------------------------------

_MEASURE = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {root!r})
    from pixart_core.loading.checkpoint import load_transformer
    def status_mb(field):  # VmHWM, unlike ru_maxrss, is not inherited from the forking parent
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) / 1024
    # warm up torch's allocator and kernels so the baseline holds them
    torch.cat([torch.ones(4, 4), torch.ones(4, 4)]).to(torch.bfloat16).to(torch.float16)
    open('/proc/self/clear_refs', 'w').write('5')  # reset the peak (VmHWM) to the current size
    base = status_mb('VmRSS')
    m = load_transformer({path!r}, dtype=getattr(torch, {dtype!r}))
    peak = status_mb('VmHWM')
    weights = sum(p.numel() * p.element_size() for p in m.state_dict().values()) / 2**20
    print(peak - base, weights)
""")


@pytest.mark.parametrize("fmt,dtype", [("original_safetensors", "float32"), ("original_pth", "float32"),
                                       ("diffusers_folder", "float32")])
def test_peak_memory_during_load(tmp_path, fmt, dtype):
    ref = tiny_diffusers_transformer(family="sigma", sample_size=64, interpolation_scale=1.0, depth=3,
                                     width=576, heads=8, caption_channels=4096)
    paths = write_all_layouts(ref, tmp_path, text_len=300)
    size_mb = sum(f.stat().st_size for f in [paths[fmt]] if f.is_file()) / 2**20 or 0
    root = str(__import__("pathlib").Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", _MEASURE.format(root=root, path=str(paths[fmt]), dtype=dtype)],
                         capture_output=True, text=True, check=True)
    grew, weights = map(float, out.stdout.split())
    assert 50 <= (size_mb or weights * 2) and weights >= 25, (size_mb, weights)
    assert grew <= 1.3 * weights, f"load grew resident memory by {grew:.0f} MB for {weights:.0f} MB of weights"


def test_cast_on_read_matches_a_plain_cast_with_and_without_the_file_mapping(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from pixart_core.loading import checkpoint_formats as formats

    torch.manual_seed(0)
    tensors = {"a": torch.randn(300, 70), "b": torch.randn(5), "c": torch.empty(0, 3), "d": torch.arange(7)}
    save_file(tensors, tmp_path / "w.safetensors")
    expected = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in
                load_file(tmp_path / "w.safetensors").items()}

    def read():
        source = formats.StateDictSource(tmp_path / "w.safetensors", files=[tmp_path / "w.safetensors"])
        return dict(source.iter_tensors(dtype=torch.bfloat16))

    mapped = read()
    monkeypatch.setattr(formats, "_cast_from_map", lambda *a: False)  # as for data not aligned for its dtype
    for got in (mapped, read()):
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) and got[k].dtype == expected[k].dtype for k in expected)
