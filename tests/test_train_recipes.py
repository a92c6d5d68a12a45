"""Shortened PixArt-nano training recipes (a few steps each, tiny models): the losses fall, the recipes keep the
invariants of PixArt-δ (zero-initialised ControlNet = base model, LCM student starts as the teacher), and what the
build writes loads back through the project's loaders with the same numbers (checked against diffusers too)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pixart_core.schedule import ddpm_schedule
from train import caption_checker, common, data
from train.common import TrainSchedule
from train.controlnet_train import ControlNetTrainConfig, HintPool, controlnet_from_base, train_controlnet
from train.lcm_distill import LCMConfig, boundary_scalings, lcm_distill
from train.pretrain import PretrainConfig, VPredictionAsEpsilon, pretrain
from train.tokenizer import build_tokenizer, load_hf_tokenizer, save_tokenizer
from train.vae_train import (VAETrainConfig, _shape_triplets, rescale_latents, shape_separation_loss,
                              train_vae)
from pixart_core.transformer import PixArtTransformer

T5_WIDTH = 32


def _falls(losses: list[float], k: int = 5) -> bool:
    return float(np.mean(losses[-k:])) < float(np.mean(losses[:k]))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = save_tokenizer(build_tokenizer(data.VOCABULARY), tmp_path_factory.mktemp("tok"))
    return folder, load_hf_tokenizer(folder)


@pytest.fixture(scope="module")
def pool():
    """Latents of a handful of scenes through a small untrained VAE (the recipes do not care what the VAE is)."""
    torch.manual_seed(0)
    vae = common.build_vae(0).eval()
    scenes = data.make_scenes(3, 32)
    images, captions = data.batch(scenes)
    edges, _ = data.batch(scenes, edges=True)
    with torch.no_grad():
        rescale_latents(vae, images)
        img = common.encode_pool(vae, images, captions, 0.18215)
        hint = common.encode_pool(vae, edges, captions, 0.18215)
    # a trained nano VAE's posterior is nearly deterministic (std ~0.02 against latents of std 1); the untrained one's
    # is not (std ~1 before the rescaling, ~8 after), so keep only its means
    img.std, hint.std = torch.zeros_like(img.std), torch.zeros_like(hint.std)
    return img, HintPool(img, hint)


def _tiny_model(seed=0) -> PixArtTransformer:
    cfg = common.nano_transformer_config(T5_WIDTH, hidden=64, depth=2, heads=1)
    model = PixArtTransformer(cfg)
    common.init_pixart_weights(model, seed)
    return model


@pytest.fixture(scope="module")
def pretrained(tokenizer, pool):
    _, tok = tokenizer
    t5 = common.build_t5(len(tok), 0, d_model=T5_WIDTH)
    result = pretrain(_tiny_model(), t5, tok, pool[0],
                      PretrainConfig(steps=40, batch_size=16, lr=2e-3, warmup=5, ema_decay=0.9), log_every=0)
    return result


def test_dataset_is_deterministic_and_checker_agrees_with_ground_truth():
    a, b = data.make_scenes(7, 20), data.make_scenes(7, 20)
    assert [s.caption for s in a] == [s.caption for s in b]
    assert np.array_equal(data.render(a[3]), data.render(b[3]))
    img = data.render(a[0])
    assert img.shape == (64, 64, 3) and 0 < len(np.unique(img.round(2))) > 3  # antialiased edges
    ok = caption_checker.validate_on_ground_truth(seed=5, count=40)
    assert ok["colour"] == ok["position"] == ok["shape"] == ok["two_object_both"] == 1.0
    assert ok["single_position"] == ok["pair_relation"] == 1.0
    # the checker must also say no: same pictures, wrong shape / colour / relation in the caption
    scenes = caption_checker.evaluation_scenes(9, 20)
    wrong = []
    for s in scenes:
        o = s.objects[0]
        o2 = data.SceneObject("circle" if o.shape != "circle" else "square", o.colour, 0, 0, 0)
        fake = data.Scene([o2] + s.objects[1:], position=s.position, relation=s.relation)
        wrong.append(caption_checker.check(data.render(s), data.caption_of(fake)).shape)
    assert not any(wrong)
    flipped = {"above": "below", "below": "above", "to the left of": "to the right of",
               "to the right of": "to the left of"}
    pair = next(s for s in scenes if s.relation)
    fake = data.Scene(pair.objects, relation=flipped[pair.relation])
    assert caption_checker.check(data.render(pair), data.caption_of(fake)).position is False
    # a flipped relation counts against pair_relation only
    single = next(s for s in scenes if not s.relation)
    mixed = caption_checker.score(np.stack([data.render(single), data.render(pair)]),
                                  [single.caption, data.caption_of(fake)])
    assert mixed["single_position"] == 1.0 and mixed["pair_relation"] == 0.0 and mixed["position"] == 0.5


def test_tokenizer_loads_through_the_project_t5_path(tokenizer):
    from pixart_core.loading.t5_loading import load_tokenizer

    folder, _ = tokenizer
    tok = load_tokenizer(folder)
    enc = tok(["A red circle above a blue square", "a zebra"], padding="max_length", max_length=12,
              truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    ids = enc.input_ids
    assert ids[0, 7] == tok.convert_tokens_to_ids("</s>") == 1 and ids[0, 8:].eq(0).all()
    assert enc.attention_mask[0].sum() == 8
    assert ids[1, 1] == tok.convert_tokens_to_ids("<unk>") == 2


def test_vae_recipe_loss_falls():
    result = train_vae(VAETrainConfig(steps=10, batch_size=4, lr=3e-3, warmup=2, rescale_samples=8), log_every=0)
    assert _falls(result.losses, 3)


def test_shape_separation_hinge():
    """The triplets are one object in three shapes (same colour and box) and the background; the hinge is the margin
    per shape pair when the latents cannot tell shapes apart, 0 once they are far enough apart, and its gradient
    moves the shapes apart, never the object towards the background (the object's energy is detached)."""
    images = _shape_triplets(np.random.default_rng(0), 2)
    assert images.shape == (7, 3, 64, 64)
    background = images[-1]
    assert torch.all(background == background[:, :1, :1])  # the empty scene
    circle, square, triangle = images[0:3]
    assert (circle - square).abs().max() > 0.5 and (circle - triangle).abs().max() > 0.5

    def fill(img):  # the colour of the pixel farthest from the background: inside the object
        return img.flatten(1)[:, (img - background).abs().sum(dim=0).flatten().argmax()]

    assert torch.allclose(fill(square), fill(circle)) and torch.allclose(fill(triangle), fill(circle))
    empty = torch.zeros(1, 4, 8, 8)
    blob = torch.ones(2, 4, 8, 8)
    same = torch.cat([blob[0:1]] * 3 + [blob[1:2]] * 3 + [empty])
    loss = shape_separation_loss(same, margin=0.25)
    assert loss.item() == pytest.approx(3 * 0.25)
    apart = torch.cat([blob[:1], -blob[:1], 3 * blob[:1], blob[:1], -blob[:1], 3 * blob[:1], empty])
    assert shape_separation_loss(apart, margin=0.25).item() == 0.0
    near = apart.clone()
    near[1] = near[0] + 0.1  # circle and square of the first object nearly equal: ratio 0.01
    near.requires_grad_(True)
    loss = shape_separation_loss(near, margin=0.25)
    assert loss.item() == pytest.approx((0.25 - 0.01) / 2, rel=1e-4)
    loss.backward()
    # square = circle + 0.1: descent (minus the gradient) moves the square up and the circle down, apart
    assert torch.all(near.grad[1] < 0) and torch.all(near.grad[0] > 0)
    assert near.grad[-1].abs().max() == 0  # the background gets no push: the object's energy is detached
    # measured in the standardised latent: a channel scaled up by its std counts as before
    one_channel = apart.clone()
    one_channel[1] = one_channel[0]
    one_channel[1, 1] += 0.3  # square = circle except in channel 1: ratio 0.09 / 4
    std = torch.tensor([1.0, 4.0, 0.5, 2.0])
    stretched = one_channel * std.view(1, -1, 1, 1)
    plain = shape_separation_loss(one_channel, 0.25).item()
    assert plain == pytest.approx((0.25 - 0.09 / 4) / 2, rel=1e-4)
    assert shape_separation_loss(stretched, 0.25, std).item() == pytest.approx(plain, rel=1e-5)
    assert shape_separation_loss(stretched, 0.25).item() < plain - 0.01  # unstandardised, channel 1 counts 16x


def test_cosine_lr():
    assert common.cosine_lr(1.0, 0, 100, 0.1) == 1.0
    assert common.cosine_lr(1.0, 50, 100, 0.1) == pytest.approx(0.55)
    assert common.cosine_lr(1.0, 100, 100, 0.1) == pytest.approx(0.1)
    assert all(common.cosine_lr(2e-3, s, 100, 1.0) == 2e-3 for s in range(100))


def test_vae_rescale_standardises_each_channel_exactly():
    torch.manual_seed(0)
    vae = common.build_vae(0).eval()
    images, _ = data.batch(data.make_scenes(4, 16))
    with torch.no_grad():
        dist = vae.encode(images).latent_dist
        before_std = dist.std
        before = vae.decode(dist.mean).sample
        k = rescale_latents(vae, images)
        dist = vae.encode(images).latent_dist
        after = vae.decode(dist.mean).sample
    z = dist.mean * 0.18215
    assert z.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert (z.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-4
    assert torch.allclose(dist.std, before_std * k.view(1, -1, 1, 1), rtol=1e-3)
    assert (after - before).abs().max() < 1e-4  # decode(encode(x)) unchanged


def test_pretrain_loss_falls_and_v_prediction_option(pretrained, tokenizer, pool):
    assert _falls(pretrained.losses)
    assert not torch.equal(pretrained.model.y_embedder.y_embedding, torch.zeros_like(pretrained.model.y_embedder.y_embedding))
    # v-prediction: a few steps also train, and the wrapper turns v back into epsilon exactly
    _, tok = tokenizer
    t5 = common.build_t5(len(tok), 1, d_model=T5_WIDTH)
    res = pretrain(_tiny_model(1), t5, tok, pool[0], PretrainConfig(steps=25, batch_size=16, lr=2e-3, warmup=5,
                                                                    prediction="v"), log_every=0)
    assert _falls(res.losses)
    sched = TrainSchedule()
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 700])
    xt = sched.add_noise(x0, noise, t)
    assert torch.allclose(sched.eps_from_v(xt, sched.v_target(x0, noise, t), t), noise, atol=1e-4)
    wrapped = VPredictionAsEpsilon(res.model)
    text = res.model.prepare_text(torch.randn(2, 5, T5_WIDTH))
    v = res.model(xt, t.float(), text)[:, :4]
    assert torch.allclose(wrapped(xt, t.float(), text)[:, :4], sched.eps_from_v(xt, v, t), atol=1e-5)
    # the samplers' conversion (guidance.py, through schedule.py) agrees with the training one at integer t
    assert torch.allclose(ddpm_schedule().eps_from_v(xt, v, t), sched.eps_from_v(xt, v, t), atol=1e-4)


def test_lcm_distillation_loss_falls(pretrained, tokenizer, pool):
    _, tok = tokenizer
    c_skip, c_out = boundary_scalings(torch.tensor([0, 259]))
    assert c_skip[0].item() == 1.0 and c_out[0].item() == 0.0 and abs(c_out[1].item() - 1) < 1e-6
    result = lcm_distill(pretrained.model, pretrained.text_encoder, tok, pool[0],
                         LCMConfig(steps=20, batch_size=8, lr=1e-3, warmup=3), log_every=0)
    assert _falls(result.losses)
    # the teacher is untouched
    assert all(not p.requires_grad for p in pretrained.model.parameters())


def test_v_prediction_path_of_the_nano_build(tokenizer, pool, tmp_path):
    """The nano build's path: a v-prediction teacher, a v LCM student that starts as the teacher, a ControlNet trained
    on the v base, and files that record v_prediction where diffusers does, which the loaders read back."""
    import json

    from safetensors import safe_open

    from pixart_core.loading.checkpoint import load_transformer
    from train.export import save_original_transformer, save_pipeline

    folder, tok = tokenizer
    t5 = common.build_t5(len(tok), 2, d_model=T5_WIDTH)
    res = pretrain(_tiny_model(2), t5, tok, pool[0], PretrainConfig(steps=15, batch_size=16, lr=2e-3, warmup=3,
                                                                    prediction="v"), log_every=0)
    teacher, t5 = res.model, res.text_encoder
    assert teacher.config.prediction_type == "v_prediction"
    lcm = lcm_distill(teacher, t5, tok, pool[0], LCMConfig(steps=20, batch_size=8, lr=1e-3, warmup=3), log_every=0)
    assert _falls(lcm.losses)
    assert type(lcm.student) is PixArtTransformer  # the plain transformer is what gets saved, not the wrapper
    assert lcm.student.config.prediction_type == "v_prediction"
    # the wrapper forwards what the recipes read from a transformer
    wrapped = VPredictionAsEpsilon(teacher)
    assert wrapped.config is teacher.config and wrapped.blocks is teacher.blocks
    cn = train_controlnet(teacher, t5, tok, pool[1], ControlNetTrainConfig(steps=25, batch_size=16, lr=2e-3, warmup=3),
                          log_every=0)
    assert _falls(cn.losses)
    for model, expected in ((teacher, "v_prediction"), (_tiny_model(2), "epsilon")):
        path = save_original_transformer(model, tmp_path / f"{expected}.safetensors", dtype=None)
        with safe_open(str(path), framework="pt") as f:
            assert f.metadata()["prediction_type"] == expected
        assert load_transformer(path).config.prediction_type == expected
    save_pipeline(tmp_path / "pipe", lcm.student, t5, folder, common.build_vae(0).eval(), dtype=None)
    sched = json.loads((tmp_path / "pipe" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction" and sched["_class_name"] == "LCMScheduler"
    assert load_transformer(tmp_path / "pipe").config.prediction_type == "v_prediction"


def test_controlnet_starts_as_the_base_and_loss_falls(pretrained, tokenizer, pool):
    _, tok = tokenizer
    base = pretrained.model
    cn = controlnet_from_base(base, 1)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([500.0, 20.0])
    text = base.prepare_text(torch.randn(2, 6, T5_WIDTH))
    hint = torch.randn(2, 4, 8, 8)
    plain = base(x, t, text)
    assert torch.equal(base(x, t, text, controls=[cn.bind(base, hint)]), plain)  # zero-initialised projections
    result = train_controlnet(base, pretrained.text_encoder, tok, pool[1],
                              ControlNetTrainConfig(steps=25, batch_size=16, lr=2e-3, warmup=3), log_every=0)
    assert _falls(result.losses)
    trained = result.controlnet
    assert not torch.equal(base(x, t, text, controls=[trained.bind(base, hint)]), plain)
    assert torch.equal(base(x, t, text, controls=[trained.bind(base, hint, strength=0.0)]), plain)


def test_export_layouts_load_back_through_the_loaders(pretrained, tokenizer, tmp_path):
    from pixart_core.loading.checkpoint import load_transformer
    from pixart_core.loading.controlnet_files import load_controlnet
    from pixart_core.loading.t5_loading import load_t5
    from train.export import save_controlnet, save_original_transformer, save_pipeline, to_diffusers

    folder, _ = tokenizer
    model, t5 = pretrained.model, pretrained.text_encoder
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([999.0, 3.0])
    y = torch.randn(2, 7, T5_WIDTH)
    ref = model(x, t, model.prepare_text(y))
    # the reference implementation on the converted weights
    dm = to_diffusers(model)
    with torch.no_grad():
        out = dm(x, encoder_hidden_states=y, timestep=t, added_cond_kwargs={"resolution": None, "aspect_ratio": None}
                 ).sample
    assert (out - ref).abs().max() < 1e-4

    vae = common.build_vae(0).eval()
    save_pipeline(tmp_path / "pipe", model, t5, folder, vae, dtype=None)
    save_original_transformer(model, tmp_path / "base.safetensors", dtype=None)
    cn = controlnet_from_base(model, 1)
    save_controlnet(cn, tmp_path / "cn.safetensors", dtype=None)
    from_folder = load_transformer(tmp_path / "pipe")
    from_file = load_transformer(tmp_path / "base.safetensors")
    assert from_folder.config.family == from_file.config.family == "alpha"
    assert from_file.config.sample_size == from_folder.config.sample_size == 8
    for loaded in (from_folder, from_file):
        assert (loaded(x, t, loaded.prepare_text(y)) - ref).abs().max() < 1e-5
    assert torch.equal(from_file.y_embedder.y_embedding, model.y_embedder.y_embedding)
    assert load_controlnet(tmp_path / "cn.safetensors").num_copies == 1
    enc = load_t5(tmp_path / "pipe", precision="fp32")
    embeds, mask = enc.encode(["a red circle on the left"], 120)
    tok = load_hf_tokenizer(folder)
    ids = tok(["a red circle on the left"], return_tensors="pt")
    with torch.no_grad():
        direct = t5(ids.input_ids)[0]
    n = int(mask.sum())
    assert n == ids.input_ids.shape[1] and (embeds[0, :n] - direct[0]).abs().max() < 1e-5


# --------------------------------------------------------------------------------------------------- text encoder
def test_phrasings_of_a_scene_share_one_canonical_description():
    from train.text_pretrain import word_place_tags

    rng = np.random.default_rng(0)
    pairs = [data.random_pair(rng) for _ in range(30)]
    singles = [data.random_single(rng) for _ in range(30)]
    upper_first = []
    for s in pairs + singles:
        options = data.phrasings(s)
        assert options[0] == data.caption_of(s) and len(set(options)) == len(options)
        assert len(options) == (8 if s.relation else 4 if s.position else 2)
        want = data.canonical_description(s)
        for caption in options:
            parsed = caption_checker.parse_caption(caption)  # the checker reads every phrasing
            assert data.canonical_description(parsed) == want, caption
            if s.relation in ("above", "below"):
                first = min(s.objects, key=lambda o: caption.split().index(o.colour))
                upper_first.append(want.split()[1:].index(first.colour) < 2)
            # every object word is tagged with its object's place
            tags = word_place_tags(data.Scene(parsed.objects, parsed.position, parsed.relation, caption))
            assert sum(t >= 0 for t in tags) == sum(2 + bool(o.size_word) for o in s.objects)
    # word order alone never says which object is on top: the first colour named is the upper one half the time
    assert upper_first and np.mean(upper_first) == 0.5
    assert data.canonical_description(data.Scene(pairs[0].objects, relation="above")).startswith("top ")
    # varied training captions: deterministic, same scenes as without variation, several forms used
    a, b = data.make_scenes(5, 40, varied=True), data.make_scenes(5, 40, varied=True)
    plain = data.make_scenes(5, 40)
    assert [s.caption for s in a] == [s.caption for s in b]
    assert [data.canonical_description(s) for s in a] == [data.canonical_description(s) for s in plain]
    assert sum(s.caption.startswith("there is") for s in a) > 0 and sum(x.caption != y.caption
                                                                        for x, y in zip(a, plain)) > 10
    ok = caption_checker.validate_on_ground_truth(seed=6, count=40, varied=True)
    assert ok["colour"] == ok["single_position"] == ok["pair_relation"] == ok["shape"] == 1.0


def test_binding_probe_helper(tokenizer):
    from train.text_pretrain import binding_probe, colour_token_states, is_held_out, linear_probe, \
        probe_scenes

    # linearly separable data is learnt and generalises; labels independent of the data are not
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 8, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 3] > 0).long()
    _, acc = linear_probe(x[:200], y[:200], x[200:], y[200:])
    assert acc > 0.95
    _, acc = linear_probe(x[:200], torch.randint(0, 2, (200,), generator=g), x[200:],
                          torch.randint(0, 2, (200,), generator=g))
    assert acc < 0.7
    # the held-out split is a fixed, disjoint split of caption strings
    train, test = probe_scenes(0, 50)
    assert not any(is_held_out(s.caption) for s in train) and all(is_held_out(s.caption) for s in test)
    assert not {s.caption for s in train} & {s.caption for s in test}

    class WordEncoder(torch.nn.Module):
        """A fake encoder whose state at each token is [token id, its position]."""

        def forward(self, input_ids, attention_mask=None):
            pos = torch.arange(input_ids.shape[1]).expand_as(input_ids)
            return (torch.stack([input_ids.float(), pos.float()], -1),)

    _, tok = tokenizer
    s = data.Scene([data.SceneObject("circle", "red", 0, 0, 0), data.SceneObject("square", "blue", 0, 0, 0)],
                   relation="below", caption="below a blue square there is a red circle")
    # red is below blue: blue is first in the canonical order
    feats, order, place = colour_token_states(WordEncoder(), tok, [s])
    assert order.tolist() == [1, 0] and place.tolist() == [1, 0]
    assert feats[:, 1].tolist() == [7.0, 2.0] and feats[0, 0] == tok.convert_tokens_to_ids("red")
    # a random T5 does not bind: its colour tokens say little about their object's place
    res = binding_probe(common.build_t5(len(tok), 0, d_model=T5_WIDTH), tok, count=150)
    assert res["held_out_tokens"] == res["train_tokens"] == 300 and res["order"] < 0.8


def test_text_pretraining_loss_falls_and_encoder_is_a_t5_encoder(tokenizer, tmp_path):
    from pixart_core.loading.t5_loading import load_t5
    from train.text_pretrain import TextPretrainConfig, build_text_model, encoder_of, pretrain_text

    folder, tok = tokenizer
    model = build_text_model(len(tok), 0, d_model=T5_WIDTH)
    res = pretrain_text(model, tok, TextPretrainConfig(steps=30, batch_size=16, lr=3e-3, warmup=5), log_every=0,
                        eval_count=8)
    assert _falls(res.losses) and _falls(res.tagging_losses)
    assert 0.0 <= res.held_out_exact <= 1.0
    enc = encoder_of(model)
    assert type(enc).__name__ == "T5EncoderModel" and not any(p.requires_grad for p in enc.parameters())
    ids = tok(["above a blue square there is a red circle"], return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model.encoder(input_ids=ids)[0]
        assert (enc(ids)[0] - ref).abs().max() < 1e-5
    # saved in the T5EncoderModel layout, it loads through the project's T5 loader with the same states
    enc.save_pretrained(tmp_path / "text_encoder", safe_serialization=True)
    import shutil

    shutil.copytree(folder, tmp_path / "tokenizer")
    (tmp_path / "model_index.json").write_text('{"_class_name": "PixArtAlphaPipeline"}')
    embeds, mask = load_t5(tmp_path, precision="fp32").encode(["above a blue square there is a red circle"], 120)
    n = int(mask.sum())
    assert n == ids.shape[1] and (embeds[0, :n] - ref[0]).abs().max() < 1e-5


def test_pixel_x0_loss_option(tokenizer, pool):
    """pretrain's pixel_weight: the decoded x0 estimate is compared with the decoded target, weighted by ᾱ_t; an exact
    v (or ε) prediction gives 0, the VAE stays frozen, and the transformer still learns with it."""
    from train.losses import pixel_x0_loss
    from train.pretrain import _pixel_loss

    torch.manual_seed(0)
    vae = common.build_vae(0).eval()
    sched = TrainSchedule()
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 999])
    xt = sched.add_noise(x0, noise, t)
    cfg = PretrainConfig(pixel_weight=1.0, pixel_batch=2, prediction="v")
    exact_v = torch.cat([sched.v_target(x0, noise, t), torch.zeros_like(x0)], dim=1)
    assert _pixel_loss(vae, 0.18215, exact_v, x0, xt, t, sched, cfg).item() < 1e-8
    cfg_eps = PretrainConfig(pixel_weight=1.0, pixel_batch=2, prediction="epsilon")
    exact_eps = torch.cat([noise, torch.zeros_like(x0)], dim=1)
    assert _pixel_loss(vae, 0.18215, exact_eps, x0, xt, t, sched, cfg_eps).item() < 1e-6
    # ᾱ_999 = 4e-5: a wrong estimate at the highest noise costs almost nothing, at t = 10 it costs fully
    wrong = x0 + 1.0
    low, high = (pixel_x0_loss(vae, 0.18215, wrong[i:i + 1], x0[i:i + 1], t[i:i + 1], sched).item() for i in (0, 1))
    assert high < 1e-3 * low

    _, tok = tokenizer
    t5 = common.build_t5(len(tok), 1, d_model=T5_WIDTH)
    with pytest.raises(ValueError, match="decoder"):
        pretrain(_tiny_model(1), t5, tok, pool[0], cfg, log_every=0)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    res = pretrain(_tiny_model(1), t5, tok, pool[0], PretrainConfig(steps=25, batch_size=16, lr=2e-3, warmup=5,
                   prediction="v", pixel_weight=1.0, pixel_batch=4), log_every=0, decoder=vae)
    assert _falls(res.losses)
    assert all(torch.equal(before[k], v) for k, v in vae.state_dict().items())
