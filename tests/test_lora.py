"""LoRA on our transformer against PEFT on diffusers' PixArtTransformer2DModel (the oracle diffusers' PixArt LoRA
training script uses: inject_adapter_in_model + LoraConfig, files from get_peft_model_state_dict), in every key
format the reader accepts; strength, stacking and removal; int8 / fp8 layers; and the refusals.

Bound: fp32 outputs of magnitude ~3 through a 2-block model differ only by rounding order (the LoRA's scale is
folded into B before the matmul instead of after, as PEFT does): a few ulps (1.2e-7 relative) per op, measured
~1e-6; TOL = 1e-5 leaves room for other CPUs' summation orders.
"""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import save_file

from pixart_core.errors import PixArtError
from pixart_core.loading.checkpoint import load_transformer
from pixart_core.loading.lora_files import load_lora, parse_lora
from pixart_core.lora import LoraLinear, apply_loras, loras_applied, remove_loras
from pixart_core.quantize import quantize_transformer
from tests.factories import tiny_diffusers_transformer, write_all_layouts

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOL = 1e-5
RANK, ALPHA = 4, 8  # alpha != rank: the scale 2 must be read from the file's metadata / config
# Every kind of layer the issue names: self- and cross-attention q/k/v/out, the MLP, adaLN and caption projections.
ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
OTHER = ["ff.net.0.proj", "ff.net.2", "caption_projection.linear_1", "caption_projection.linear_2",
         "adaln_single.linear", "timestep_embedder.linear_1", "proj_out"]


def _peft_model(targets, seed=0, rank=RANK, alpha=ALPHA):
    """The tiny diffusers transformer with a PEFT LoRA of random non-zero weights, and the PEFT state dict."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    ref = tiny_diffusers_transformer(family="alpha", sample_size=128)  # micro-conditions: every embedder exists
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets)
    model = inject_adapter_in_model(config, ref)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    # copies: the state dict shares storage with the model, whose weights a test may change afterwards
    return model, config, {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """Our transformer holding the same base weights as _peft_model's (loaded from the diffusers folder)."""
    paths = write_all_layouts(tiny_diffusers_transformer(family="alpha", sample_size=128),
                              tmp_path_factory.mktemp("base"))
    return load_transformer(paths["diffusers_folder"])


@pytest.fixture(scope="module")
def peft_full():
    return _peft_model(ATTN + OTHER)


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    y = torch.randn(2, 12, 64, generator=g)
    mask = torch.zeros(2, 12, dtype=torch.long)
    mask[0, :5], mask[1, :9] = 1, 1
    return x, torch.tensor([999.0, 400.0]), y, mask, torch.tensor([[96.0, 64.0]] * 2), torch.tensor([[1.5]] * 2)


@torch.no_grad()
def _theirs(model):
    x, t, y, mask, res, ar = _inputs()
    return model(x, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask,
                 added_cond_kwargs={"resolution": res, "aspect_ratio": ar}, return_dict=False)[0]


@torch.no_grad()
def _mine(model):
    x, t, y, mask, res, ar = _inputs()
    return model(x, t, model.prepare_text(y, mask), resolution=res, aspect_ratio=ar)


def _diff(a, b) -> float:
    return float((a - b).abs().max())


def _pair(module, rank=4, rank_up=None, width=144, out=None, names=("lora_down.weight", "lora_up.weight")):
    g = torch.Generator().manual_seed(0)
    return {f"{module}.{names[0]}": torch.randn(rank, width, generator=g),
            f"{module}.{names[1]}": torch.randn(out or width, rank_up or rank, generator=g)}


# ----------------------------------------------------------------------------------------------- file formats
def _diffusers_file(sd, config, folder):
    """As diffusers' save_lora_weights writes it: transformer.<key>, the LoraConfig in the safetensors metadata."""
    from diffusers.loaders.lora_base import LoraBaseMixin, _pack_dict_with_prefix

    LoraBaseMixin.write_lora_layers(_pack_dict_with_prefix(sd, "transformer"), str(folder), True,
                                    "pytorch_lora_weights.safetensors", None, True,
                                    lora_adapter_metadata=_pack_dict_with_prefix(config.to_dict(), "transformer"))
    return folder / "pytorch_lora_weights.safetensors"


def _peft_folder(sd, config, folder):
    """As diffusers' PixArt training script saves it (PEFT save_pretrained): base_model.model.<key> in
    adapter_model.safetensors, alpha in adapter_config.json beside it."""
    save_file({f"base_model.model.{k}": v.contiguous() for k, v in sd.items()},
              str(folder / "adapter_model.safetensors"))
    config.save_pretrained(str(folder))
    return folder / "adapter_model.safetensors"


def _old_peft_bin(sd, config, folder):
    """The old PEFT script: unet.base_model.model.<key>, a pickled .bin; alpha = rank (nothing records it)."""
    path = folder / "lora.bin"
    torch.save({f"unet.base_model.model.{k}": v for k, v in sd.items()}, path)
    return path


@pytest.mark.parametrize("write", [_diffusers_file, _peft_folder, _old_peft_bin])
def test_peft_file_formats_match_peft(write, ours, peft_full, tmp_path):
    model, config, sd = peft_full
    if write is _old_peft_bin:  # no alpha in this format: the oracle is a LoRA trained with alpha = rank
        model, config, sd = _peft_model(ATTN + OTHER, rank=RANK, alpha=RANK)
    lora = load_lora(write(sd, config, tmp_path))
    assert len(lora.terms) == len(sd) // 2 and not lora.ignored
    expected = _theirs(model)
    base = _mine(ours)
    apply_loras(ours, [(lora, 1.0)])
    try:
        got = _mine(ours)
    finally:
        remove_loras(ours)
    assert _diff(got, expected) <= TOL
    assert _diff(base, expected) > 100 * TOL  # the LoRA matters
    assert torch.equal(_mine(ours), base)  # removed: the base again, exactly


def _kohya(sd, config, prefix):
    """kohya naming of the same tensors: <prefix><diffusers name with '_'>.lora_down/.lora_up + alpha."""
    out = {}
    for k, v in sd.items():
        module, kind = k.rsplit(".lora_", 1)
        name = prefix + module.replace(".", "_")
        out[f"{name}.lora_down.weight" if kind.startswith("A") else f"{name}.lora_up.weight"] = v
        out[f"{name}.alpha"] = torch.tensor(float(config.lora_alpha))
    return out


@pytest.mark.parametrize("prefix", ["lora_unet_", "lora_transformer_"])
def test_kohya_names_map_to_the_same_tensors(prefix, ours, peft_full, tmp_path):
    model, config, sd = peft_full
    path = tmp_path / "kohya.safetensors"
    save_file({k: v.contiguous() for k, v in _kohya(sd, config, prefix).items()}, str(path))
    kohya = load_lora(path)
    peft = parse_lora({f"transformer.{k}": v for k, v in sd.items()}, "peft", {"lora_alpha": ALPHA})

    def by_target(lora):
        return {(t.target, t.part): (t.down, t.up, t.scale) for t in lora.terms}

    a, b = by_target(kohya), by_target(peft)
    assert a.keys() == b.keys() and len(a) == len(sd) // 2
    for key in a:
        assert torch.equal(a[key][0], b[key][0]) and torch.equal(a[key][1], b[key][1]) and a[key][2] == b[key][2]
    with loras_applied(ours, [(kohya, 1.0)]):
        assert _diff(_mine(ours), _theirs(model)) <= TOL


def test_original_layer_names_and_adapter_suffixes(ours):
    """Files on the original PixArt names (ComfyUI's generic diffusion_model.<key>, kohya's lora_unet_<key>) name our
    layers directly: a LoRA on the fused qkv is one term over all its rows."""
    state = {**_pair("diffusion_model.blocks.0.attn.qkv", out=3 * 144),
             **_pair("model.diffusion_model.t_block.1", out=6 * 144), **_pair("lora_unet_blocks_1_cross_attn_q_linear"),
             **_pair("lora_unet_y_embedder_y_proj_fc2"),
             **_pair("transformer.transformer_blocks.0.attn2.to_k",
                     names=("lora_A.default.weight", "lora_B.default.weight"))}  # PEFT with its adapter name
    lora = parse_lora(state, "names.safetensors")
    got = {(t.target, t.part, t.parts) for t in lora.terms}
    assert got == {("blocks.0.attn.qkv", 0, 1), ("blocks.1.cross_attn.q_linear", 0, 1),
                   ("y_embedder.y_proj.fc2", 0, 1), ("t_block.1", 0, 1), ("blocks.0.cross_attn.kv_linear", 0, 2)}
    assert not lora.ignored
    base = _mine(ours)
    with loras_applied(ours, [(lora, 0.01)]):
        assert 0 < _diff(_mine(ours), base) < float("inf")


def test_terms_on_rows_of_one_fused_layer_add_up(ours):
    """A LoRA on the whole fused qkv (original names) stacked with one on to_q (diffusers names): each term writes
    its own rows of the same layer, as the explicit sum says."""
    whole = parse_lora(_pair("diffusion_model.blocks.0.attn.qkv", out=3 * 144), "whole")
    q = parse_lora(_pair("transformer.transformer_blocks.0.attn1.to_q", rank=2), "q")
    x = torch.randn(1, 5, 144, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ours.blocks[0].attn.qkv(x)
        for lora, strength in ((whole, 0.5), (q, -2.0)):
            t = lora.terms[0]
            delta = x @ t.down.T @ t.up.T * (t.scale * strength)
            expected[..., : delta.shape[-1]] += delta
        with loras_applied(ours, [(whole, 0.5), (q, -2.0)]):
            got = ours.blocks[0].attn.qkv(x)
    assert _diff(got, expected) <= TOL * expected.abs().max()
    assert _diff(got, ours.blocks[0].attn.qkv(x)) > 1


# ----------------------------------------------------------------------------------------------- strength, stacking
def test_strength_zero_is_the_base_bit_for_bit(ours, peft_full):
    _, _, sd = peft_full
    lora = parse_lora(sd, "lora", {"lora_alpha": ALPHA})
    base = _mine(ours)
    apply_loras(ours, [(lora, 0.0)])
    assert not any(isinstance(m, LoraLinear) for m in ours.modules())
    assert torch.equal(_mine(ours), base)


def test_new_strength_and_other_lora_without_reload(ours, tmp_path):
    """Re-applying replaces: strength 0.5 equals PEFT with B halved; then another LoRA alone equals PEFT with it."""
    model, config, sd = _peft_model(ATTN + OTHER, seed=1)
    lora = parse_lora(sd, "first", {"lora_alpha": ALPHA})
    apply_loras(ours, [(lora, 1.0)])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.5)
    apply_loras(ours, [(lora, 0.5)])
    assert _diff(_mine(ours), _theirs(model)) <= TOL
    other_model, _, other_sd = _peft_model(["to_q", "ff.net.2"], seed=2)
    apply_loras(ours, [(parse_lora(other_sd, "second", {"lora_alpha": ALPHA}), 1.0)])
    assert _diff(_mine(ours), _theirs(other_model)) <= TOL
    remove_loras(ours)


def test_stacked_loras_add_up(ours, peft_full):
    """Two files (attention layers / the rest) stacked equal the one PEFT adapter holding both; the same file twice
    at 0.25 + 0.75 equals it once at 1."""
    model, _, sd = peft_full
    attn = {k: v for k, v in sd.items() if ".attn" in k}
    rest = {k: v for k, v in sd.items() if ".attn" not in k}
    assert attn and rest
    first, second = parse_lora(attn, "attn", {"lora_alpha": ALPHA}), parse_lora(rest, "rest", {"lora_alpha": ALPHA})
    with loras_applied(ours, [(first, 1.0), (second, 1.0)]):
        assert _diff(_mine(ours), _theirs(model)) <= TOL
    whole = parse_lora(sd, "whole", {"lora_alpha": ALPHA})
    with loras_applied(ours, [(whole, 0.25), (whole, 0.75)]):
        assert _diff(_mine(ours), _theirs(model)) <= TOL
    assert not any(isinstance(m, LoraLinear) for m in ours.modules())


# ----------------------------------------------------------------------------------------------- 8-bit weights
def test_fp8_layers_take_the_lora_as_an_adapter(tmp_path, peft_full):
    """fp8 layers compute F.linear(x, dequantised weight): with the LoRA they equal a float model holding exactly
    those dequantised weights with the same LoRA; removing it gives the fp8 base back exactly."""
    _, _, sd = peft_full
    lora = parse_lora(sd, "lora", {"lora_alpha": ALPHA})
    paths = write_all_layouts(tiny_diffusers_transformer(family="alpha", sample_size=128), tmp_path)
    fp8 = quantize_transformer(load_transformer(paths["diffusers_folder"]), "fp8")
    plain = load_transformer(paths["diffusers_folder"])
    for (name, q), (_, f) in zip(fp8.named_modules(), plain.named_modules()):
        if hasattr(q, "dequantized_weight"):
            f.weight.data.copy_(q.dequantized_weight())
    base = _mine(fp8)
    with loras_applied(fp8, [(lora, 1.0)]), loras_applied(plain, [(lora, 1.0)]):
        assert _diff(_mine(fp8), _mine(plain)) <= TOL
        assert _diff(_mine(fp8), base) > 100 * TOL
    assert torch.equal(_mine(fp8), base)


@pytest.mark.parametrize("mode", ["int8", "int8-dynamic"])
def test_int8_layers_take_the_lora(tmp_path, peft_full, mode):
    """int8 layers (bitsandbytes LLM.int8, or int8-dynamic's int8 x int8 matmul; no float equivalent to compare
    exactly): the LoRA's effect on the output equals the float model's within int8's resolution. int8 keeps each
    weight (and with int8-dynamic each activation) to 1/127 of its row's largest (<= 0.8% relative); summed over many
    products the output's RMS error is far smaller (measured 0.25% int8, 0.39% int8-dynamic): bound 1%."""
    _, _, sd = peft_full
    lora = parse_lora(sd, "lora", {"lora_alpha": ALPHA})
    paths = write_all_layouts(tiny_diffusers_transformer(family="alpha", sample_size=128), tmp_path)
    int8 = quantize_transformer(load_transformer(paths["diffusers_folder"]), mode)
    plain = load_transformer(paths["diffusers_folder"])
    base8, base = _mine(int8), _mine(plain)
    with loras_applied(int8, [(lora, 1.0)]), loras_applied(plain, [(lora, 1.0)]):
        effect8, effect = _mine(int8) - base8, _mine(plain) - base
    assert (effect8 - effect).norm() <= 0.01 * effect.norm()
    assert effect.norm() >= 0.5 * base.norm()  # a LoRA that matters
    assert torch.equal(_mine(int8), base8)


# ----------------------------------------------------------------------------------------------- bad input
def test_lora_for_another_model_is_refused_naming_it(tmp_path):
    sdxl = _pair("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", width=640)
    save_file(sdxl, str(tmp_path / "sdxl.safetensors"))
    with pytest.raises(PixArtError, match="SDXL"):
        load_lora(tmp_path / "sdxl.safetensors")
    flux = {"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 3072),
            "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(3072, 4)}
    with pytest.raises(PixArtError, match="Flux"):
        parse_lora(flux, "flux.safetensors")
    loha = {"lora_unet_transformer_blocks_0_attn1_to_q.hada_w1_a": torch.zeros(144, 4)}
    with pytest.raises(PixArtError, match="LoHa"):
        parse_lora(loha, "loha.safetensors")


def test_rank_and_shape_mismatch_are_clear(ours):
    with pytest.raises(PixArtError, match="rank 4 but an up/B matrix of rank 8"):
        parse_lora(_pair("transformer.transformer_blocks.0.attn1.to_q", rank=4, rank_up=8), "bad.safetensors")
    wide = parse_lora(_pair("transformer.transformer_blocks.0.attn1.to_q", width=1152), "xl.safetensors")
    with pytest.raises(PixArtError, match="does not fit this transformer.*1152x1152.*144x144"):
        apply_loras(ours, [(wide, 1.0)])
    deep = parse_lora(_pair("transformer.transformer_blocks.27.attn1.to_q"), "deep.safetensors")
    with pytest.raises(PixArtError, match="block 27, but this transformer has 2 blocks"):
        apply_loras(ours, [(deep, 1.0)])
    assert not any(isinstance(m, LoraLinear) for m in ours.modules())


def test_damaged_and_unsafe_files_are_refused(tmp_path, peft_full):
    _, _, sd = peft_full
    good = tmp_path / "good.safetensors"
    save_file({f"transformer.{k}": v.contiguous() for k, v in sd.items()}, str(good))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(PixArtError, match="cut.safetensors is truncated"):
        load_lora(cut)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + bytes(64))
    with pytest.raises(PixArtError, match="garbage.safetensors is not a valid safetensors file"):
        load_lora(garbage)
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"x": torch.zeros(1), "code": print}, unsafe)
    with pytest.raises(PixArtError, match="Refused to open unsafe.pt"):
        load_lora(unsafe)


def test_unmatched_keys_are_listed_in_one_warning(ours, caplog):
    state = {**_pair("transformer.transformer_blocks.0.attn1.to_q"), **_pair("transformer.not_a_layer"),
             "transformer.pos_embed.proj.lora_A.weight": torch.zeros(4, 4, 2, 2),
             "transformer.pos_embed.proj.lora_B.weight": torch.zeros(144, 4, 1, 1), "note": torch.zeros(1)}
    lora = parse_lora(state, "partly.safetensors")
    with caplog.at_level(logging.WARNING, logger="pixart_delta"):
        apply_loras(ours, [(lora, 1.0)])
    remove_loras(ours)
    warnings = [r.getMessage() for r in caplog.records if "match nothing" in r.getMessage()]
    assert len(warnings) == 1
    assert all(k in warnings[0] for k in ("transformer.not_a_layer", "pos_embed.proj.lora_A", "note"))
    assert "attn1.to_q" not in warnings[0]


# ----------------------------------------------------------------------------------------------- the node
def test_node_returns_a_new_model_and_leaves_the_cached_base_alone(tmp_path):
    """ComfyUI caches the loader's output for every branch that uses it: Load LoRA returns a new model value, the
    sampler adds the LoRA only while it runs, so the base branch samples the base before and after; strength 0 is the
    base bit for bit, and another strength re-runs only the LoRA node (the file is read once)."""
    from pixart_nodes import comfy_bridge as bridge
    from pixart_nodes import model_cache
    from pixart_nodes.lora_loader import PixArtDeltaLoraLoader
    from pixart_nodes.sampling import PixArtDeltaSampler
    from pixart_nodes.sockets import Conditioning
    from pixart_nodes.transformer_loader import PixArtDeltaTransformerLoader
    from tests import comfy_harness as harness

    models = harness.write_tiny_models(tmp_path / "models")
    bridge.set_models_root(models)
    try:
        lora_name = harness.TINY_FILES["lora"].split("/", 1)[1]
        assert lora_name in PixArtDeltaLoraLoader.INPUT_TYPES()["required"]["lora_name"][0]
        base, _ = PixArtDeltaTransformerLoader().load(harness.TINY_FILES["sigma"].split("/", 1)[1], "fp32", "auto",
                                                      "auto", "auto")
        g = torch.Generator().manual_seed(0)
        embeds = torch.randn(1, 8, harness.TINY_CAPTION, generator=g)
        cond = Conditioning(embeds, torch.ones(1, 8), torch.zeros_like(embeds), torch.ones(1, 8), 8)

        def sample(model):
            latent = {"samples": torch.zeros(1, 4, 8, 8)}
            return PixArtDeltaSampler().sample(model, cond, latent, 1, 2, 1.0, "euler", 1.0)[0]["samples"]

        before = sample(base)
        loads = model_cache.LORAS.loads
        (with_lora,) = PixArtDeltaLoraLoader().apply(base, lora_name, 0.8)
        (stacked,) = PixArtDeltaLoraLoader().apply(with_lora, lora_name, -0.8)  # stacks: cancels the first
        (zero,) = PixArtDeltaLoraLoader().apply(base, lora_name, 0.0)
        assert model_cache.LORAS.loads == loads + 1
        assert base.loras == () and len(stacked.loras) == 2 and with_lora.module is base.module
        changed = sample(with_lora)
        scale = before.abs().max()  # raw latents after two Euler steps from sigma_max: ~1e3
        assert (changed - before).abs().max() > 1e-3 * scale
        assert (sample(stacked) - before).abs().max() <= TOL * scale  # +0.8 - 0.8: rounding only
        assert torch.equal(sample(zero), before)
        assert torch.equal(sample(base), before)
        assert not any(isinstance(m, LoraLinear) for m in base.module.modules())
    finally:
        bridge.set_models_root(None)
        model_cache.clear_all()
