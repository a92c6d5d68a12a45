"""Reliability of runs, driven through the nodes the way ComfyUI's executor runs them (tests/comfy_harness.py).

- Odd input (property-based where it fits): sizes, steps, prompts, batches, latents of the wrong channel count,
  NaN latents, images with alpha or one channel, mismatched model / VAE / ControlNet families. Each gives a correct
  result or a PixArtError naming the input and the fix, never a raw torch error.
- Cancel at every point the pack checks it (each sampler step, each VAE tile, the control image encode) and inside
  loading and text encoding: the pack stays usable and the next run equals a fresh one, bit for bit.
- 50 queued generations in one process keep the resident memory flat; the model caches stay bounded and let go of
  their models when ComfyUI asks for memory.
- Out of memory: the VAE retries with smaller tiles and the sampler one image at a time (with a logged message),
  else a clear error; the CLI never leaves a half-written PNG.
"""

from __future__ import annotations

import gc
import logging
import os
import weakref
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pixart_nodes import NODE_CLASS_MAPPINGS
from pixart_nodes import comfy_bridge as bridge
from pixart_nodes import model_cache
from pixart_core.errors import PixArtError
from tests import comfy_harness as harness

CLASSES = {**NODE_CLASS_MAPPINGS, **harness.NATIVE_NODES}
FILES = {k: Path(v).name for k, v in harness.TINY_FILES.items()}
HYPOTHESIS = settings(max_examples=12, deadline=None, derandomize=True,
                      suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def node(name: str):
    return NODE_CLASS_MAPPINGS[name]()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    models = harness.write_tiny_models(tmp_path_factory.getbasetemp() / "tiny_models")
    with harness.comfy_session(models, tmp_path_factory.mktemp("comfy_dirs_runs"), 64):
        yield models


@pytest.fixture(scope="module")
def parts(env):
    """Loaded tiny models and an encoded prompt, for the tests that call nodes directly."""
    loader = node("PixArtDeltaTransformerLoader")
    out = {name: loader.load(FILES[name], "auto", "auto", "auto", "auto")[0] for name in ("lcm", "alpha", "sigma")}
    out["t5"] = node("PixArtDeltaT5Loader").load(FILES["t5"], "fp32", "auto")[0]
    out["cond"] = node("PixArtDeltaT5TextEncode").encode(out["t5"], "a red fox", "blurry", 0, out["alpha"])[0]
    out["sd_vae"] = node("PixArtDeltaVAELoader").load(FILES["sd_vae"], "auto", "auto")[0]
    out["sdxl_vae"] = node("PixArtDeltaVAELoader").load(FILES["sdxl_vae"], "auto", "auto")[0]
    out["controlnet"] = node("PixArtDeltaControlNetLoader").load(FILES["controlnet"])[0]
    return out


def workflow(seed: int = 1, size: int = 64, steps: int = 2, prompt: str = "a red fox", control: bool = True,
             tile: int = 0, mode: str = "auto", batch: int = 1) -> dict:
    """α model + T5 + (HED edges -> ControlNet) + DPM-Solver++ with CFG + tiled decode + SaveImage."""
    p = {
        "1": {"class_type": "PixArtDeltaTransformerLoader", "inputs": {"model_name": FILES["alpha"],
              "precision": "auto", "family": "auto", "train_resolution": "auto", "text_len": "auto"}},
        "2": {"class_type": "PixArtDeltaT5Loader", "inputs": {"t5_name": FILES["t5"], "precision": "fp32",
                                                              "device": "auto"}},
        "3": {"class_type": "PixArtDeltaT5TextEncode", "inputs": {"t5": ["2", 0], "model": ["1", 0],
              "prompt": prompt, "negative_prompt": "blurry", "max_length": 0}},
        "5": {"class_type": "PixArtDeltaVAELoader", "inputs": {"vae_name": FILES["sd_vae"], "kind": "auto",
                                                               "precision": "auto"}},
        "8": {"class_type": "PixArtDeltaEmptyLatent", "inputs": {"width": size, "height": size, "batch_size": batch}},
        "4": {"class_type": "PixArtDeltaSampler", "inputs": {"model": ["1", 0], "conditioning": ["3", 0],
              "latent": ["8", 0], "seed": seed, "steps": steps, "cfg": 4.5, "sampler_name": "dpmpp_2m",
              "denoise": 1.0}},
        "6": {"class_type": "PixArtDeltaVAEDecodeTiled", "inputs": {"samples": ["4", 0], "vae": ["5", 0],
                                                                    "mode": mode, "tile_size": tile}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "rel"}},
    }
    if control:
        p["9"] = {"class_type": "LoadImage", "inputs": {"image": "pixart_delta_example.png"}}
        p["12"] = {"class_type": "PixArtDeltaHEDPreprocessor", "inputs": {"image": ["9", 0],
                                                                          "hed_name": FILES["hed"]}}
        p["10"] = {"class_type": "PixArtDeltaControlNetLoader", "inputs": {"controlnet_name": FILES["controlnet"]}}
        p["11"] = {"class_type": "PixArtDeltaControlNetApply", "inputs": {"controlnet": ["10", 0], "vae": ["5", 0],
                   "image": ["12", 0], "strength": 1.0, "start": 0.0, "end": 1.0}}
        p["4"]["inputs"]["control"] = ["11", 0]
    return p


def run(prompt: dict) -> harness.Executor:
    executor = harness.Executor(CLASSES)
    executor.run(prompt)
    return executor


def image_of(executor: harness.Executor) -> torch.Tensor:
    return executor.last_results["6"][0]


def assert_user_error(exc: BaseException, *needles: str) -> None:
    """A PixArtError whose message mentions each needle (the input at fault, the fix)."""
    assert isinstance(exc, PixArtError), f"raw {type(exc).__module__}.{type(exc).__name__}: {exc}"
    for needle in needles:
        assert needle.lower() in str(exc).lower(), f"{needle!r} not in: {exc}"


# ================================================================================================ odd input
@HYPOTHESIS
@given(width=st.integers(1, 600), height=st.integers(1, 600))
def test_any_size_is_made_or_explained(env, parts, width, height):
    """Sizes the widget cannot send but the API can (ComfyUI's min/max/step are not enforced for linked INTs)."""
    sampler = node("PixArtDeltaLCMSampler")
    try:
        latent = sampler.sample(parts["lcm"], parts["cond"], 0, 1, width, height, 1, 1.0)[0]
    except PixArtError as exc:
        assert width % 16 or height % 16, exc
        assert "16" in str(exc) and f"{width}x{height}" in str(exc)
        return
    assert width % 16 == 0 and height % 16 == 0
    assert latent["samples"].shape == (1, 4, height // 8, width // 8)
    assert torch.isfinite(latent["samples"]).all()


def test_out_of_range_widgets_are_rejected_before_running(env):
    """Negative, zero and huge values in the API prompt are stopped by ComfyUI's min/max validation."""
    prompt = workflow(control=False)
    prompt["8"]["inputs"].update(width=-64, batch_size=0)
    prompt["4"]["inputs"].update(steps=0, cfg=1e9, seed=-1, denoise=1.5)
    prompt["6"]["inputs"]["tile_size"] = 10**9
    with pytest.raises(harness.PromptRejected) as err:
        run(prompt)
    kinds = {n: sorted(e["type"] for e in v["errors"]) for n, v in err.value.node_errors.items()}
    assert kinds == {"8": ["value_smaller_than_min"] * 2,
                     "4": ["value_bigger_than_max", "value_bigger_than_max", "value_smaller_than_min",
                           "value_smaller_than_min"],
                     "6": ["value_bigger_than_max"]}


@HYPOTHESIS
@given(steps=st.integers(-3, 1200), sampler=st.sampled_from(["dpmpp_2m", "sa_solver", "euler", "ddim"]),
       denoise=st.sampled_from([0.0, 0.01, 0.3, 1.0]))
def test_any_step_count_runs_or_is_explained(env, parts, steps, sampler, denoise):
    """Zero, negative and huge step counts (called directly, as a script or an old workflow would)."""
    latent = {"samples": torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0))}
    try:
        out = node("PixArtDeltaSampler").sample(parts["alpha"], parts["cond"], latent, 3, steps, 1.0, sampler,
                                                denoise)[0]
    except PixArtError as exc:
        assert steps < 1 or steps > 1000 or denoise < 1, exc
        assert "step" in str(exc).lower()
        return
    assert out["samples"].shape == (1, 4, 2, 2) and torch.isfinite(out["samples"]).all()


@pytest.mark.parametrize("steps", [1, 50])
def test_lcm_step_limits(env, parts, steps):
    out = node("PixArtDeltaLCMSampler").sample(parts["lcm"], parts["cond"], 5, steps, 16, 16, 1, 1.0)[0]
    assert torch.isfinite(out["samples"]).all()
    with pytest.raises(PixArtError, match="step"):
        node("PixArtDeltaLCMSampler").sample(parts["lcm"], parts["cond"], 5, 51, 16, 16, 1, 1.0)


def test_lcm_denoise_too_low_for_one_step_says_so(env, parts):
    latent = {"samples": torch.zeros(1, 4, 2, 2)}
    with pytest.raises(PixArtError) as err:
        node("PixArtDeltaLCMSampler").sample(parts["lcm"], parts["cond"], 5, 1, 16, 16, 1, 0.01, latent=latent)
    assert "1 to 0" not in str(err.value) and "denoise" in str(err.value)


@HYPOTHESIS
@given(prompt=st.one_of(st.just(""), st.text(max_size=40), st.text(min_size=2000, max_size=4000),
                        st.just("fox " * 3000), st.just("\x00\ufffd\U0001F98A" * 50)),
       max_length=st.sampled_from([0, 1, 7, 300, 1024]))
def test_empty_and_very_long_prompts_encode(env, parts, prompt, max_length):
    cond = node("PixArtDeltaT5TextEncode").encode(parts["t5"], prompt, prompt[:10], max_length, parts["alpha"])[0]
    length = max_length or 120
    assert cond.embeds.shape == (1, length, 64) and cond.mask.shape == (1, length)
    assert cond.negative_embeds.shape == (1, length, 64)
    assert torch.isfinite(cond.embeds).all() and cond.mask.sum() >= 1  # the end-of-text token at least


def test_truncation_warning_stays_short(env, parts, caplog):
    """A pasted novel must not put the whole cut-off text into the server log."""
    with caplog.at_level(logging.WARNING):
        node("PixArtDeltaT5TextEncode").encode(parts["t5"], "fox " * 5000 + "tail-marker", "", 0, parts["alpha"])
    lines = [r.getMessage() for r in caplog.records if "tokens were cut" in r.getMessage()]
    assert lines and all(len(line) < 600 for line in lines)


@HYPOTHESIS
@given(latent_batch=st.integers(1, 5), control_batch=st.integers(1, 4))
def test_batches_that_do_not_divide(env, parts, latent_batch, control_batch):
    """A latent batch, an img2img latent batch and a control image batch that do not match: a result with the
    right batch and per-image seeds, or a PixArtError naming the batches."""
    sampler = node("PixArtDeltaSampler")
    latent = {"samples": torch.randn(latent_batch, 4, 2, 2, generator=torch.Generator().manual_seed(1))}
    control = node("PixArtDeltaControlNetApply").apply(parts["controlnet"], parts["sd_vae"],
                                                       torch.rand(control_batch, 16, 16, 3), 1.0, 0.0, 1.0)[0]
    try:
        out = sampler.sample(parts["alpha"], parts["cond"], latent, 2, 1, 4.5, "euler", 0.5, control=control)[0]
    except PixArtError as exc:
        assert control_batch not in (1, latent_batch), exc
        assert "batch" in str(exc) and str(control_batch) in str(exc)
        return
    assert out["samples"].shape == (latent_batch, 4, 2, 2) and torch.isfinite(out["samples"]).all()


@pytest.mark.parametrize("channels", [1, 3, 8, 16])
def test_latent_of_the_wrong_channel_count(env, parts, channels):
    latent = {"samples": torch.zeros(1, channels, 4, 4)}
    for denoise in (1.0, 0.5):
        with pytest.raises(PixArtError) as err:
            node("PixArtDeltaSampler").sample(parts["alpha"], parts["cond"], latent, 1, 1, 4.5, "euler", denoise)
        assert_user_error(err.value, f"{channels} channels", "4-channel")
    with pytest.raises(PixArtError) as err:
        node("PixArtDeltaVAEDecodeTiled").decode(latent, parts["sd_vae"], "auto", 0)
    assert_user_error(err.value, f"{channels}, 4, 4")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_latents_are_named(env, parts, bad):
    latent = {"samples": torch.zeros(1, 4, 2, 2)}
    latent["samples"][0, 1, 1, 0] = bad
    with pytest.raises(PixArtError) as err:
        node("PixArtDeltaSampler").sample(parts["alpha"], parts["cond"], latent, 1, 1, 4.5, "euler", 0.5)
    assert_user_error(err.value, "input latent", "NaN")
    out = node("PixArtDeltaSampler").sample(parts["alpha"], parts["cond"], latent, 1, 1, 4.5, "euler", 1.0)[0]
    assert torch.isfinite(out["samples"]).all()  # denoise 1 only takes the latent's size
    with pytest.raises(PixArtError) as err:
        node("PixArtDeltaVAEDecodeTiled").decode(latent, parts["sd_vae"], "auto", 0)
    assert_user_error(err.value, "NaN")


def test_malformed_latents(env, parts):
    for latent, needle in (({"samples": torch.zeros(4, 4, 4)}, "shape"), ({"samples": torch.zeros(0, 4, 2, 2)},
                           "empty"), ({}, "samples"), ({"samples": None}, "samples")):
        with pytest.raises(PixArtError) as err:
            node("PixArtDeltaSampler").sample(parts["alpha"], parts["cond"], latent, 1, 1, 4.5, "euler", 1.0)
        assert_user_error(err.value, needle)


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_images_with_alpha_or_one_channel(env, parts, channels):
    """Grey, RGB and RGBA IMAGEs: encode (alpha dropped, grey as RGB), HED and ControlNet all take them."""
    g = torch.Generator().manual_seed(channels)
    rgb = torch.rand(1, 32, 32, 3, generator=g)
    image = {1: rgb[..., :1], 3: rgb, 4: torch.cat([rgb, torch.rand(1, 32, 32, 1, generator=g)], -1)}[channels]
    as_rgb = image.expand(-1, -1, -1, 3) if channels == 1 else image[..., :3]
    encode = node("PixArtDeltaVAEEncodeTiled")
    latent = encode.encode(image, parts["sd_vae"], 0)[0]["samples"]
    assert torch.equal(latent, encode.encode(as_rgb.contiguous(), parts["sd_vae"], 0)[0]["samples"])
    edges = node("PixArtDeltaHEDPreprocessor").detect(image, FILES["hed"])[0]
    assert edges.shape == (1, 32, 32, 3) and torch.isfinite(edges).all()
    control = node("PixArtDeltaControlNetApply").apply(parts["controlnet"], parts["sd_vae"], image, 1.0, 0.0, 1.0)[0]
    sampler, latent = node("PixArtDeltaSampler"), {"samples": torch.zeros(1, 4, 4, 4)}
    out = sampler.sample(parts["alpha"], parts["cond"], latent, 1, 1, 4.5, "euler", 1.0, control=control)[0]
    rgb_control = node("PixArtDeltaControlNetApply").apply(parts["controlnet"], parts["sd_vae"], as_rgb.contiguous(),
                                                           1.0, 0.0, 1.0)[0]
    expected = sampler.sample(parts["alpha"], parts["cond"], latent, 1, 1, 4.5, "euler", 1.0, control=rgb_control)[0]
    assert torch.equal(out["samples"], expected["samples"])  # the control image's alpha (or grey) changes nothing
    plain = sampler.sample(parts["alpha"], parts["cond"], latent, 1, 1, 4.5, "euler", 1.0)[0]
    assert not torch.equal(out["samples"], plain["samples"])


@pytest.mark.parametrize("channels", [2, 5])
def test_images_with_other_channel_counts_are_named(env, parts, channels):
    with pytest.raises(PixArtError) as err:
        node("PixArtDeltaVAEEncodeTiled").encode(torch.rand(1, 32, 32, channels), parts["sd_vae"], 0)
    assert_user_error(err.value, "pixels", "IMAGE")


def test_mismatched_families_are_explained(env, parts):
    """Σ model with an α ControlNet / SD VAE, α model with the SDXL VAE as the control encoder."""
    latent = {"samples": torch.zeros(1, 4, 4, 4)}
    sampler = node("PixArtDeltaSampler")
    apply = node("PixArtDeltaControlNetApply")
    on_sigma = apply.apply(parts["controlnet"], parts["sdxl_vae"], torch.rand(1, 32, 32, 3), 1.0, 0.0, 1.0)[0]
    with pytest.raises(PixArtError) as err:
        sampler.sample(parts["sigma"], parts["cond"], latent, 1, 1, 4.5, "euler", 1.0, control=on_sigma)
    assert_user_error(err.value, "PixArt-α", "PixArt-Σ")
    wrong_vae = apply.apply(parts["controlnet"], parts["sdxl_vae"], torch.rand(1, 32, 32, 3), 1.0, 0.0, 1.0)[0]
    with pytest.raises(PixArtError) as err:
        sampler.sample(parts["alpha"], parts["cond"], latent, 1, 1, 4.5, "euler", 1.0, control=wrong_vae)
    assert_user_error(err.value, "SD VAE", "0.18215")


# ================================================================================================ cancel
_stand_in_check = bridge.check_interrupted


def test_cancel_at_every_check_leaves_the_pack_usable(env, monkeypatch):
    """Cancel pressed at each point the pack checks it: every sampler step (before each model evaluation and after
    each step), the control image's VAE encode, every decode tile. After each, the next run equals a fresh run."""
    prompt = workflow(size=32, tile=16, mode="fast", steps=2)
    prompt["11"]["inputs"]["image"] = ["9", 0]  # no HED here (it has no check and is the slowest node)
    del prompt["12"]
    model_cache.clear_all()
    fresh = image_of(run(prompt)).clone()
    calls, stop = [], [0]

    def check():
        calls.append(1)
        if len(calls) == stop[0]:
            bridge.request_interrupt()  # the user presses Cancel just before this check
        _stand_in_check()

    monkeypatch.setattr(bridge, "check_interrupted", check)
    run(prompt)
    total = len(calls)
    assert total >= 2 * 2 + 4, f"expected checks at every step and tile, saw {total}"
    # The control image's encode comes first and checks before each of its many small tiles: every third of those;
    # the sampler's steps and the decode tiles are the last checks: every one of them.
    for stop_at in sorted(set(range(1, total + 1, 3)) | set(range(max(1, total - 12), total + 1))):
        calls.clear()
        stop[0] = stop_at
        with pytest.raises(harness.ExecutionError) as err:
            run(prompt)
        assert isinstance(err.value.exception, bridge.Interrupted), err.value
        assert len(calls) == stop_at  # it stopped right there
        stop[0] = 0
        assert torch.equal(image_of(run(prompt)), fresh), f"the run after a cancel at check {stop_at} differs"


def test_cancel_while_loading_leaves_nothing_half_loaded(env, monkeypatch):
    """ComfyUI stops a run by raising from inside whatever is running; a loader interrupted halfway (transformer,
    ControlNet, T5) must not leave a half-built model in the cache."""
    import pixart_core.loading.checkpoint as checkpoint
    import pixart_core.loading.controlnet_files as controlnet
    import pixart_core.loading.t5_loading as t5_loading

    prompt = workflow(tile=32, mode="fast")
    model_cache.clear_all()
    fresh = image_of(run(prompt)).clone()

    def interrupted(*args, **kwargs):
        raise bridge.Interrupted("Processing interrupted")

    for module, name in ((checkpoint, "materialise"), (controlnet, "materialise"), (t5_loading, "build_t5_encoder")):
        model_cache.clear_all()
        with monkeypatch.context() as m:
            m.setattr(module, name, interrupted)
            with pytest.raises(harness.ExecutionError) as err:
                run(prompt)
            assert isinstance(err.value.exception, bridge.Interrupted)
        assert torch.equal(image_of(run(prompt)), fresh), f"after a cancel in {module.__name__}.{name}"


def test_cancel_while_encoding_text_leaves_no_stale_embedding(env, monkeypatch):
    prompt = workflow(prompt="a cancelled prompt", control=False)
    executor = run(prompt)
    fresh = image_of(executor).clone()
    encoder_stack = type(executor.last_results["2"][0].module.model.encoder)

    def forward(self, *args, **kwargs):
        raise bridge.Interrupted("Processing interrupted")

    with monkeypatch.context() as m:
        m.setattr(encoder_stack, "forward", forward)
        with pytest.raises(harness.ExecutionError) as err:
            run(prompt)
        assert err.value.node_type == "PixArtDeltaT5TextEncode"
    assert torch.equal(image_of(run(prompt)), fresh)


def test_cancel_flag_left_by_an_unchecked_stage_does_not_kill_the_next_prompt(env):
    """Cancel pressed while a stage that never checks runs (a loader): ComfyUI clears the flag when the next prompt
    starts (execution.py: interrupt_processing(False)); the stand-in's flag is cleared the same way here, and the
    run that follows is complete."""
    prompt = workflow(control=False)
    fresh = image_of(run(prompt)).clone()
    bridge.request_interrupt()
    with pytest.raises(harness.ExecutionError):
        run(prompt)  # the next check in this prompt stops it, as ComfyUI's would
    assert torch.equal(image_of(run(prompt)), fresh)


# ================================================================================================ long runs
def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


RSS_GROWTH_BOUND = 30 * 2**20


def test_fifty_queued_generations_keep_memory_flat(env):
    """50 prompts in one process (new seed and prompt each time, as a queue would send them) with the tiniest
    models and sizes: after warm-up the resident memory grows by less than 30 MB."""
    model_cache.clear_all()

    def prompt(i: int) -> dict:
        p = workflow(seed=i, size=16, steps=1, prompt=f"a red fox number {i}", control=False)
        p["1"]["inputs"]["model_name"] = FILES["lcm"]
        p["4"] = {"class_type": "PixArtDeltaLCMSampler", "inputs": {"model": ["1", 0], "conditioning": ["3", 0],
                  "seed": i, "steps": 1, "width": 16, "height": 16, "batch_size": 1, "denoise": 1.0}}
        del p["8"]
        return p

    for i in range(5):
        run(prompt(i))
    gc.collect()
    before = resident_bytes()
    loads = (model_cache.TRANSFORMERS.loads, model_cache.TEXT_ENCODERS.loads, model_cache.VAES.loads)
    for i in range(5, 55):
        run(prompt(i))
    gc.collect()
    growth = resident_bytes() - before
    assert growth < RSS_GROWTH_BOUND, f"resident memory grew {growth / 2**20:.1f} MB over 50 generations"
    assert (model_cache.TRANSFORMERS.loads, model_cache.TEXT_ENCODERS.loads, model_cache.VAES.loads) == loads
    print(f"RSS growth over 50 generations: {growth / 2**20:.1f} MB")


def test_model_caches_are_bounded(env):
    model_cache.clear_all()
    loader = node("PixArtDeltaVAELoader")
    for precision in ("auto", "fp32", "bf16", "fp16"):
        for kind in ("sd", "sdxl"):
            loader.load(FILES["sd_vae"], kind, precision)
    assert len(model_cache.VAES) == model_cache.VAES.capacity == 2
    transformer = node("PixArtDeltaTransformerLoader")
    for name in ("lcm", "alpha", "sigma", "sigma_2k"):
        transformer.load(FILES[name], "auto", "auto", "auto", "auto")
    assert len(model_cache.TRANSFORMERS) <= model_cache.TRANSFORMERS.capacity


def test_inside_comfyui_the_caches_keep_nothing_alive_but_never_load_a_held_model_twice(env, monkeypatch):
    """Inside ComfyUI the caches hold weak references only (capacity 0): a model no workflow output holds is freed,
    one that is still held is handed out again rather than loaded a second time."""
    model_cache.clear_all()
    for cache in (model_cache.VAES, model_cache.TRANSFORMERS, model_cache.TEXT_ENCODERS):
        monkeypatch.setattr(cache, "capacity", 0)
    loader = node("PixArtDeltaVAELoader")
    held = loader.load(FILES["sd_vae"], "auto", "auto")[0]  # e.g. in ComfyUI's output cache
    dropped = weakref.ref(loader.load(FILES["sdxl_vae"], "auto", "auto")[0])
    transformer = weakref.ref(node("PixArtDeltaTransformerLoader").load(FILES["lcm"], "auto", "auto", "auto",
                                                                         "auto")[0])
    t5 = weakref.ref(node("PixArtDeltaT5Loader").load(FILES["t5"], "fp32", "auto")[0])
    loads = model_cache.VAES.loads
    gc.collect()
    assert dropped() is None and transformer() is None and t5() is None
    assert len(model_cache.VAES) == len(model_cache.TRANSFORMERS) == len(model_cache.TEXT_ENCODERS) == 0
    again = loader.load(FILES["sd_vae"], "auto", "auto")[0]
    assert again is held and model_cache.VAES.loads == loads
    loader.load(FILES["sdxl_vae"], "auto", "auto")
    assert model_cache.VAES.loads == loads + 1


# ================================================================================================ out of memory
def _oom(message: str = "CUDA out of memory. Tried to allocate 2.00 GiB"):
    return torch.OutOfMemoryError(message)


@pytest.mark.parametrize("error", ["torch", "runtime"])
def test_decode_out_of_memory_retries_with_smaller_tiles(env, parts, monkeypatch, caplog, error):
    vae = parts["sd_vae"]
    module = vae.module
    original = type(module).decode
    attempts = []

    def decode(self, latents, mode="auto", tile_size=None, **kwargs):
        attempts.append((mode, tile_size))
        if mode != "fast" or tile_size is None or tile_size > 128:
            raise _oom() if error == "torch" else RuntimeError("MPS backend out of memory (MPS allocated: 9 GB)")
        return original(self, latents, mode=mode, tile_size=tile_size, **kwargs)

    latent = {"samples": torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))}
    expected = node("PixArtDeltaVAEDecodeTiled").decode(latent, vae, "fast", 128)[0]
    monkeypatch.setattr(type(module), "decode", decode)
    with caplog.at_level(logging.WARNING, logger="pixart_delta"):
        image = node("PixArtDeltaVAEDecodeTiled").decode(latent, vae, "auto", 0)[0]
    assert attempts == [("auto", None), ("fast", 512), ("fast", 256), ("fast", 128)]
    assert torch.equal(image, expected)
    assert any("out of memory" in r.getMessage() and "tiles" in r.getMessage() for r in caplog.records)


def test_decode_out_of_memory_at_the_smallest_tile_is_a_clear_error(env, parts, monkeypatch):
    def decode(self, *args, **kwargs):
        raise _oom()

    monkeypatch.setattr(type(parts["sd_vae"].module), "decode", decode)
    with pytest.raises(PixArtError) as err:
        node("PixArtDeltaVAEDecodeTiled").decode({"samples": torch.zeros(1, 4, 8, 8)}, parts["sd_vae"], "auto", 0)
    assert_user_error(err.value, "out of memory", "64 px")


def test_encode_out_of_memory_retries_with_smaller_tiles(env, parts, monkeypatch):
    module = parts["sd_vae"].module
    original = type(module).encode
    attempts = []

    def encode(self, images, mode="auto", tile_size=None, **kwargs):
        attempts.append((mode, tile_size))
        if tile_size is None:
            raise _oom()
        return original(self, images, mode=mode, tile_size=tile_size, **kwargs)

    monkeypatch.setattr(type(module), "encode", encode)
    latent = node("PixArtDeltaVAEEncodeTiled").encode(torch.rand(1, 32, 32, 3), parts["sd_vae"], 0)[0]
    assert attempts == [("auto", None), ("fast", 512)] and latent["samples"].shape == (1, 4, 4, 4)


def test_other_runtime_errors_are_not_taken_for_out_of_memory(env, parts, monkeypatch):
    def decode(self, *args, **kwargs):
        raise RuntimeError("expected scalar type Float but found Half")

    monkeypatch.setattr(type(parts["sd_vae"].module), "decode", decode)
    with pytest.raises(RuntimeError, match="scalar type"):
        node("PixArtDeltaVAEDecodeTiled").decode({"samples": torch.zeros(1, 4, 8, 8)}, parts["sd_vae"], "auto", 0)


def test_sampling_out_of_memory_runs_the_batch_one_image_at_a_time(env, parts, monkeypatch, caplog):
    """Image k of a batch uses seed + k, so one at a time gives the same images with a quarter of the memory."""
    model = parts["alpha"]
    latent = {"samples": torch.zeros(3, 4, 4, 4)}
    sampler = node("PixArtDeltaSampler")
    whole = sampler.sample(model, parts["cond"], latent, 11, 2, 4.5, "dpmpp_2m", 1.0)[0]["samples"]
    original = type(model.module).forward
    batches = []

    def forward(self, x, *args, **kwargs):
        batches.append(x.shape[0])
        if x.shape[0] > 2:  # a CFG batch of more than one image does not fit
            raise _oom()
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(type(model.module), "forward", forward)
    with caplog.at_level(logging.WARNING, logger="pixart_delta"):
        split = sampler.sample(model, parts["cond"], latent, 11, 2, 4.5, "dpmpp_2m", 1.0)[0]["samples"]
    assert batches[0] == 6 and set(batches[1:]) == {2}
    assert (split - whole).abs().max() <= 1e-5 * whole.abs().max()
    assert any("one at a time" in r.getMessage() for r in caplog.records)


def test_sampling_out_of_memory_with_one_image_is_a_clear_error(env, parts, monkeypatch):
    model = parts["alpha"]

    def forward(self, *args, **kwargs):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(type(model.module), "forward", forward)
    with pytest.raises(PixArtError) as err:
        node("PixArtDeltaSampler").sample(model, parts["cond"], {"samples": torch.zeros(1, 4, 4, 4)}, 1, 2, 4.5,
                                          "euler", 1.0)
    assert_user_error(err.value, "out of memory", "batch", "int8")


def test_cli_never_leaves_a_half_written_png(tmp_path, monkeypatch):
    from PIL import Image

    import pixart_core.pipeline as pipeline
    from pixart_core import cli

    class FakePipe:
        default_sampler = "lcm"

        def __call__(self, *args, **kwargs):
            return [Image.new("RGB", (16, 16), (200, 10, 10))]

    monkeypatch.setattr(pipeline.PixArtPipeline, "from_paths", classmethod(lambda cls, *a, **k: FakePipe()))

    def failing_save(self, fp, *args, **kwargs):
        with open(fp, "wb") if isinstance(fp, (str, os.PathLike)) else fp as f:
            f.write(b"\x89PNG\r\n\x1a\n half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", failing_save)
    out = tmp_path / "out" / "image.png"
    with pytest.raises(OSError):
        cli.main(["generate", "a fox", "-o", str(out), "--no-progress", "--transformer", "t", "--t5", "t",
                  "--vae", "v"])
    assert not out.exists(), "a half-written PNG was left under the output name"
    assert list(out.parent.iterdir()) == [], "a temporary file was left behind"
