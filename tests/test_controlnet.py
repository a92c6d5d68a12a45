"""The PixArt-δ ControlNet against the diffusers research project's dataflow (PixArtControlNetTransformerModel,
re-stated below with diffusers' own PixArtTransformer2DModel and BasicTransformerBlock) on the same random weights.

The test writes its ControlNets itself in both released layouts: the original combined file (base_model.* +
controlnet.{i}.copied_block/before_proj/after_proj, `{'state_dict': ...}`) and the diffusers research layout
(controlnet_blocks.{i}.before_proj / transformer_block / after_proj).
"""

import json

import pytest
import torch
from safetensors.torch import save_file

from pixart_core.loading.checkpoint import load_transformer
from pixart_core.controlnet import check_compatible, controls_at_step, prepare_control_image, resize_cover_crop
from pixart_core.loading.controlnet_files import load_combined, load_controlnet
from pixart_core.errors import PixArtError
from pixart_core.schedule import step_of_timestep
from tests.factories import TINY_HEADS, TINY_WIDTH, original_state_dict, tiny_diffusers_transformer

TOL = 1e-4
DEPTH = 14
COPIES = 13
CAPTION = 64

# The test's own statement of the original block layout (diffusers' scripts/convert_pixart_alpha_to_diffusers.py),
# independent of the loader.
_BLOCK_RENAME = {
    "attn1.to_out.0.": "attn.proj.",
    "attn2.to_q.": "cross_attn.q_linear.",
    "attn2.to_out.0.": "cross_attn.proj.",
    "ff.net.0.proj.": "mlp.fc1.",
    "ff.net.2.": "mlp.fc2.",
}


def _adapter_blocks(n, width=TINY_WIDTH, heads=TINY_HEADS, seed=5, zero_proj=False, base=None):
    """The research project's PixArtControlNetAdapterBlock parts: before_proj (block 0), a BasicTransformerBlock,
    after_proj. Random non-zero weights, or the training init (copies of the base blocks, zero projections)."""
    from diffusers.models.attention import BasicTransformerBlock

    torch.manual_seed(seed)
    blocks = []
    for i in range(n):
        tb = BasicTransformerBlock(width, heads, width // heads, cross_attention_dim=width,
                                   activation_fn="gelu-approximate", num_embeds_ada_norm=1000, attention_bias=True,
                                   norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)
        part = torch.nn.ModuleDict({"transformer_block": tb, "after_proj": torch.nn.Linear(width, width)})
        if i == 0:
            part["before_proj"] = torch.nn.Linear(width, width)
        with torch.no_grad():
            for p in part.parameters():
                p.copy_(torch.randn_like(p) * 0.05)
            if base is not None:
                tb.load_state_dict(base.transformer_blocks[i].state_dict())
            if zero_proj:
                for name in ("before_proj", "after_proj"):
                    if name in part:
                        part[name].weight.zero_()
                        part[name].bias.zero_()
        blocks.append(part.eval())
    return blocks


def _diffusers_layout(blocks):
    return {f"controlnet_blocks.{i}.{k}": v.detach().clone().contiguous()
            for i, b in enumerate(blocks) for k, v in b.state_dict().items()}


def _original_layout(blocks):
    sd = {}
    for i, b in enumerate(blocks):
        tb = {k: v.detach().clone() for k, v in b["transformer_block"].state_dict().items()}
        p = f"controlnet.{i}.copied_block."
        for s in ("weight", "bias"):
            sd[f"{p}attn.qkv.{s}"] = torch.cat([tb[f"attn1.to_{x}.{s}"] for x in "qkv"])
            sd[f"{p}cross_attn.kv_linear.{s}"] = torch.cat([tb[f"attn2.to_{x}.{s}"] for x in "kv"])
            for old, new in _BLOCK_RENAME.items():
                sd[f"{p}{new}{s}"] = tb[f"{old}{s}"]
            sd[f"controlnet.{i}.after_proj.{s}"] = b["after_proj"].state_dict()[s].clone()
            if i == 0:
                sd[f"controlnet.0.before_proj.{s}"] = b["before_proj"].state_dict()[s].clone()
        sd[f"{p}scale_shift_table"] = tb["scale_shift_table"]
    return sd


def _base_original(ref, text_len=120):
    dsd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    return original_state_dict(dsd, text_len=text_len, caption_channels=CAPTION,
                               pos_embed_tokens=(ref.config.sample_size // 2) ** 2)


def _reference(ref, controls, x, t, y, mask):
    """diffusers research PixArtControlNetTransformerModel.forward, several controls summed, each scaled by strength.
    controls: list of (adapter blocks, hint latent, strength)."""
    with torch.no_grad():
        b = x.shape[0]
        p = ref.config.patch_size
        h, w = x.shape[-2] // p, x.shape[-1] // p
        enc_mask = ((1 - mask.to(x.dtype)) * -10000.0).unsqueeze(1)
        hs = ref.pos_embed(x)
        temb, emb_t = ref.adaln_single(t, {"resolution": None, "aspect_ratio": None}, batch_size=b,
                                       hidden_dtype=hs.dtype)
        enc = ref.caption_projection(y).view(b, -1, hs.shape[-1])
        states = [ref.pos_embed(hint) for _, hint, _ in controls]
        for i, block in enumerate(ref.transformer_blocks):
            if i > 0:
                add = 0
                for j, (blocks, _, strength) in enumerate(controls):
                    if i <= len(blocks):
                        a = blocks[i - 1]
                        c = hs + a["before_proj"](states[j]) if i == 1 else states[j]
                        states[j] = a["transformer_block"](c, encoder_hidden_states=enc,
                                                           encoder_attention_mask=enc_mask, timestep=temb)
                        add = add + strength * a["after_proj"](states[j])
                hs = hs + add
            hs = block(hs, encoder_hidden_states=enc, encoder_attention_mask=enc_mask, timestep=temb)
        shift, scale = (ref.scale_shift_table[None] + emb_t[:, None]).chunk(2, dim=1)
        hs = ref.proj_out(ref.norm_out(hs) * (1 + scale) + shift)
        hs = torch.einsum("nhwpqc->nchpwq", hs.reshape(-1, h, w, p, p, ref.out_channels))
        return hs.reshape(-1, ref.out_channels, h * p, w * p)


def _inputs(batch=2, lh=8, lw=12, tokens=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, lh, lw, generator=g)
    y = torch.randn(batch, tokens, CAPTION, generator=g)
    mask = torch.zeros(batch, tokens, dtype=torch.long)
    for i in range(batch):
        mask[i, : 4 + 3 * i] = 1
    t = torch.linspace(900, 300, batch)
    hint = torch.randn(1, 4, lh, lw, generator=g)
    return x, t, y, mask, hint


pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnet")
    ref = tiny_diffusers_transformer(family="alpha", depth=DEPTH, sample_size=16, caption_channels=CAPTION)
    blocks = _adapter_blocks(COPIES)
    base_sd = _base_original(ref)
    combined = {**{"base_model." + k: v for k, v in base_sd.items()}, **_original_layout(blocks)}
    paths = {"combined": root / "PixArt-tiny-ControlNet.pth", "base_only": root / "base.pth",
             "control_only": root / "control_only.safetensors", "diffusers_file": root / "cn_diffusers.safetensors",
             "diffusers_folder": root / "cn_diffusers"}
    torch.save({"state_dict": combined}, paths["combined"])
    torch.save({"state_dict": base_sd}, paths["base_only"])
    save_file({k: v.contiguous() for k, v in _original_layout(blocks).items()}, paths["control_only"])
    save_file(_diffusers_layout(blocks), paths["diffusers_file"])
    paths["diffusers_folder"].mkdir()
    save_file(_diffusers_layout(blocks), paths["diffusers_folder"] / "diffusion_pytorch_model.safetensors")
    (paths["diffusers_folder"] / "config.json").write_text(
        json.dumps({"_class_name": "PixArtControlNetAdapterModel", "num_layers": COPIES}))
    base, controlnet = load_combined(paths["combined"])
    return {"ref": ref, "blocks": blocks, "paths": paths, "base": base, "controlnet": controlnet, "root": root}


def _run(base, x, t, y, mask, controls=None):
    with torch.no_grad():
        return base(x, t, base.prepare_text(y, mask), controls=controls)


def test_original_layout_matches_research_reference(setup):
    base, cn, ref, blocks = setup["base"], setup["controlnet"], setup["ref"], setup["blocks"]
    assert base.detection.has_controlnet and cn.info.layout == "controlnet-combined"
    assert cn.num_copies == COPIES and cn.info.family == "alpha" and cn.info.text_len == 120
    x, t, y, mask, hint = _inputs()  # batch 2 (an [uncond, cond] pair), one hint for both
    plain = _run(base, x, t, y, mask)
    for strength in (1.0, 0.6):
        got = _run(base, x, t, y, mask, [cn.bind(base, hint, strength)])
        expected = _reference(ref, [(blocks, hint, strength)], x, t, y, mask)
        assert (got - expected).abs().max() <= TOL
        assert (got - plain).abs().max() > 1e-2  # the control really changes the output


def test_diffusers_layout_converts_to_the_same_weights(setup):
    cn = setup["controlnet"]
    reference_sd = cn.state_dict()
    for key in ("diffusers_file", "diffusers_folder"):
        other = load_controlnet(setup["paths"][key])
        assert other.info.layout == "diffusers" and other.num_copies == COPIES
        sd = other.state_dict()
        assert sd.keys() == reference_sd.keys()
        assert all(torch.equal(sd[k], reference_sd[k]) for k in sd)
    base = setup["base"]
    x, t, y, mask, hint = _inputs(seed=3)
    got = _run(base, x, t, y, mask, [other.bind(base, hint, 0.8)])
    expected = _reference(setup["ref"], [(setup["blocks"], hint, 0.8)], x, t, y, mask)
    assert (got - expected).abs().max() <= TOL


def test_zero_init_and_strength_zero_give_exactly_the_base_output(setup, tmp_path):
    base, ref = setup["base"], setup["ref"]
    fresh = _adapter_blocks(COPIES, zero_proj=True, base=ref)  # the training init: copied blocks, zero projections
    path = tmp_path / "fresh.pth"
    torch.save({"state_dict": _original_layout(fresh)}, path)
    zero = load_controlnet(path)
    x, t, y, mask, hint = _inputs(seed=1)
    plain = _run(base, x, t, y, mask)
    assert torch.equal(_run(base, x, t, y, mask, [zero.bind(base, hint, 1.0)]), plain)
    random_at_zero = setup["controlnet"].bind(base, hint, 0.0)
    assert torch.equal(_run(base, x, t, y, mask, [random_at_zero]), plain)
    assert not random_at_zero.active(0, 10)  # and the sampler need not run it at all


def test_effect_grows_with_strength(setup):
    base, cn = setup["base"], setup["controlnet"]
    x, t, y, mask, hint = _inputs(seed=2)
    plain = _run(base, x, t, y, mask)
    effects = [(_run(base, x, t, y, mask, [cn.bind(base, hint, s)]) - plain).norm().item()
               for s in (0.25, 0.5, 1.0, 1.5)]
    assert effects[0] > 1e-3
    assert all(a < b for a, b in zip(effects, effects[1:]))


def test_start_end_percent_switch_the_control_on_and_off(setup):
    base, cn = setup["base"], setup["controlnet"]
    hint = _inputs()[4]

    def pattern(start, end, n=10):
        c = cn.bind(base, hint, 1.0, start, end)
        return [i for i in range(n) if c.active(i, n)]

    assert pattern(0.0, 1.0) == list(range(10))
    assert pattern(0.0, 0.3) == [0, 1, 2]
    assert pattern(0.3, 0.6) == [3, 4, 5]
    assert pattern(0.5, 1.0) == [5, 6, 7, 8, 9]
    assert pattern(0.5, 0.5) == []
    assert pattern(0.0, 0.5, n=4) == [0, 1]
    # timestep form (ComfyUI's percent-of-schedule rule): t = (1 - p) * 999
    c = cn.bind(base, hint, 1.0, 0.2, 0.6)
    assert [c.active_at_timestep(t) for t in (999, 799, 700, 400, 399, 0)] == [False, True, True, True, False, False]
    # what a sampling loop sees: only the active controls at each step
    early, late = cn.bind(base, hint, 1.0, 0.0, 0.5), cn.bind(base, hint, 0.7, 0.5, 1.0)
    assert [len(controls_at_step([early, late], i, 4)) for i in range(4)] == [1, 1, 1, 1]
    assert controls_at_step([early, late], 0, 4) == [early] and controls_at_step([early, late], 3, 4) == [late]
    for bad in ((0.6, 0.4), (-0.1, 1.0), (0.0, 1.2)):
        with pytest.raises(PixArtError, match="start/end"):
            cn.bind(base, hint, 1.0, *bad)


def _sampler_trajectory(base, sampler, guidance, controls, x, y, mask):
    """Run a real sampler through GuidedEpsilon (CFG batch [uncond, cond]), which switches the controls on and off by
    their start/end, returning the latent after every step and how many controls were active at each."""
    from pixart_core.guidance import GuidedEpsilon
    from pixart_core.samplers import get_sampler, sampler_timesteps
    from pixart_core.schedule import ddpm_schedule

    timesteps = sampler_timesteps(sampler, 4)
    eps = GuidedEpsilon(base, y, mask, batch_size=x.shape[0], size=(x.shape[2] * 8, x.shape[3] * 8),
                        negative_embeds=torch.zeros_like(y[:, :2]), negative_mask=torch.ones(y.shape[0], 2),
                        guidance_scale=guidance, controls=controls, timesteps=timesteps)
    seen = []
    passed_to_model = base.forward

    def counting_forward(*args, controls=None, **kw):
        seen.append(len(controls or []))
        return passed_to_model(*args, controls=controls, **kw)

    base.forward = counting_forward
    eps_fn = eps
    g = torch.Generator().manual_seed(7)
    trajectory = []
    try:
        get_sampler(sampler).fn(eps_fn, x.clone(), ddpm_schedule(), timesteps,
                                noise_fn=lambda like: torch.randn(like.shape, generator=g),
                                callback=lambda i, n, xi, x0: trajectory.append(xi.clone()))
    finally:
        del base.forward  # back to the class method
    return trajectory, seen


@pytest.mark.parametrize("sampler,guidance", [("lcm", 0.0), ("dpmpp_2m", 4.5)])
def test_start_end_through_a_sampler_run(setup, sampler, guidance):
    base, cn = setup["base"], setup["controlnet"]
    x, _, y, mask, hint = _inputs(batch=1, seed=8)

    def run(*controls):
        return _sampler_trajectory(base, sampler, guidance, list(controls), x, y[:1], mask[:1])

    plain, _ = run()
    full, seen_full = run(cn.bind(base, hint, 1.0, 0.0, 1.0))
    first_half, seen_first = run(cn.bind(base, hint, 1.0, 0.0, 0.5))
    second_half, seen_second = run(cn.bind(base, hint, 1.0, 0.5, 1.0))
    assert seen_full == [1, 1, 1, 1] and seen_first == [1, 1, 0, 0] and seen_second == [0, 0, 1, 1]
    for i in range(4):
        assert (full[i] - plain[i]).abs().max() > 1e-4  # the control acts at every step
    # on for steps 0-1 only: identical to the full run until the control switches off, then it departs
    assert torch.equal(first_half[0], full[0]) and torch.equal(first_half[1], full[1])
    assert (first_half[3] - full[3]).abs().max() > 1e-5
    # off for steps 0-1: identical to the plain run until the control switches on
    assert torch.equal(second_half[0], plain[0]) and torch.equal(second_half[1], plain[1])
    assert (second_half[2] - plain[2]).abs().max() > 1e-4


def test_stacked_controlnets_and_hint_batches(setup):
    base, cn, ref, blocks = setup["base"], setup["controlnet"], setup["ref"], setup["blocks"]
    x, t, y, mask, hint = _inputs(batch=4, seed=4)
    hint2 = torch.randn(2, 4, *hint.shape[-2:])  # one hint per conditional image, repeated over [uncond; cond]
    got = _run(base, x, t, y, mask, [cn.bind(base, hint, 0.5), cn.bind(base, hint2, 0.9)])
    expected = _reference(ref, [(blocks, hint, 0.5), (blocks, hint2.repeat(2, 1, 1, 1), 0.9)], x, t, y, mask)
    assert (got - expected).abs().max() <= TOL
    with pytest.raises(PixArtError, match="batch of 3"):
        _run(base, x, t, y, mask, [cn.bind(base, torch.randn(3, 4, *hint.shape[-2:]))])
    with pytest.raises(PixArtError, match="generation size"):
        _run(base, x, t, y, mask, [cn.bind(base, torch.randn(1, 4, 16, 16))])
    with pytest.raises(PixArtError, match="VAE latent"):
        cn.bind(base, torch.randn(1, 3, 8, 12))
    with pytest.raises(PixArtError, match="strength"):
        cn.bind(base, hint, float("nan"))


def test_combined_and_separate_loading(setup):
    paths, cn = setup["paths"], setup["controlnet"]
    base_alone = load_transformer(paths["base_only"])
    base_from_combined = load_transformer(paths["combined"])
    assert base_from_combined.detection.has_controlnet
    sd = base_alone.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in base_from_combined.state_dict().items())
    separate = load_controlnet(paths["control_only"])
    assert separate.info.layout == "original" and "family=alpha" in " ".join(separate.info.assumed)
    assert all(torch.equal(v, cn.state_dict()[k]) for k, v in separate.state_dict().items())
    # a separately loaded ControlNet on a separately loaded base of the same shape
    x, t, y, mask, hint = _inputs(seed=6)
    got = _run(base_alone, x, t, y, mask, [separate.bind(base_alone, hint)])
    expected = _reference(setup["ref"], [(setup["blocks"], hint, 1.0)], x, t, y, mask)
    assert (got - expected).abs().max() <= TOL
    with pytest.raises(PixArtError, match="no ControlNet"):
        load_controlnet(paths["base_only"])
    base_only, none = load_combined(paths["base_only"])
    assert none is None and base_only.config.depth == DEPTH


def test_mismatched_controlnet_is_refused(setup, tmp_path):
    cn = setup["controlnet"]
    # Σ base (SDXL VAE latents) with an α ControlNet (SD VAE latents)
    sigma = tiny_diffusers_transformer(family="sigma", depth=DEPTH, sample_size=16, caption_channels=CAPTION,
                                       interpolation_scale=0.5)
    torch.save({"state_dict": _base_original(sigma, text_len=300)}, tmp_path / "sigma.pth")
    sigma_base = load_transformer(tmp_path / "sigma.pth")
    assert sigma_base.config.family == "sigma"
    with pytest.raises(PixArtError, match="latent spaces differ"):
        check_compatible(cn, sigma_base)
    # too shallow a base for 13 copies
    shallow = tiny_diffusers_transformer(family="alpha", depth=3, sample_size=16, caption_channels=CAPTION)
    torch.save({"state_dict": _base_original(shallow)}, tmp_path / "shallow.pth")
    with pytest.raises(PixArtError, match="only 3 blocks"):
        cn.bind(load_transformer(tmp_path / "shallow.pth"), _inputs()[4])
    # a ControlNet of another width (3 heads of 72)
    wide = _adapter_blocks(2, width=216, heads=3)
    save_file({k: v.contiguous() for k, v in _original_layout(wide).items()}, tmp_path / "wide.safetensors")
    wide_cn = load_controlnet(tmp_path / "wide.safetensors")
    assert wide_cn.info.hidden_size == 216 and wide_cn.info.num_heads == 3
    with pytest.raises(PixArtError, match="width 216"):
        check_compatible(wide_cn, setup["base"])
    # text length: an α base with 300 text tokens
    torch.save({"state_dict": _base_original(setup["ref"], text_len=300)}, tmp_path / "long_text.pth")
    long_text = load_transformer(tmp_path / "long_text.pth", overrides={"family": "alpha"})
    with pytest.raises(PixArtError, match="text length 120"):
        check_compatible(cn, long_text)
    # incomplete ControlNet
    sd = _original_layout(_adapter_blocks(3))
    del sd["controlnet.1.after_proj.weight"]
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "broken.safetensors")
    with pytest.raises(PixArtError, match="Missing: controlnet.1.after_proj.weight"):
        load_controlnet(tmp_path / "broken.safetensors")


def test_prepare_control_image_covers_crops_and_normalises():
    # 40x80 image, left half black, right half white -> 32x32: scale 0.8 to 32x64, then the center 32 columns
    img = torch.zeros(1, 40, 80, 3)
    img[:, :, 40:] = 1.0
    out = prepare_control_image(img, 32, 32)
    assert out.shape == (1, 3, 32, 32) and out.min() >= -1 and out.max() <= 1
    assert torch.allclose(out[0, :, :, :14], torch.tensor(-1.0))
    assert torch.allclose(out[0, :, :, 18:], torch.tensor(1.0))
    # same size: no resampling at all, just [0,1] -> [-1,1]; a 1-channel edge map becomes 3 channels
    edge = torch.rand(2, 1, 16, 24)
    out = prepare_control_image(edge, 16, 24)
    assert out.shape == (2, 3, 16, 24) and torch.equal(out[:, 1], edge[:, 0] * 2 - 1)
    # a portrait image into a landscape size: covers (no black bars)
    tall = torch.rand(1, 3, 50, 20) * 0.5 + 0.5
    assert resize_cover_crop(tall, 16, 32).shape == (1, 3, 16, 32) and prepare_control_image(tall, 16, 32).min() > -0.01
    with pytest.raises(PixArtError, match="multiples of 8"):
        prepare_control_image(img, 30, 32)


def test_step_of_timestep_is_the_nearest_listed_timestep():
    """The one timestep -> step index rule (ControlNet start/end and step caching both use it)."""
    timesteps = [999.0, 749.0, 499.0, 249.0]
    assert [step_of_timestep(t, timesteps) for t in (999, 760, 500.2, 0)] == [0, 1, 2, 3]
    with pytest.raises(PixArtError, match="No sampling timesteps"):
        step_of_timestep(5, [])
