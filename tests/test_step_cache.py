"""Step caching (step_cache.py): which blocks run on which step, T-GATE's gate, and the change it makes to images."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pixart_core import samplers
from pixart_core.loading.checkpoint import load_transformer
from pixart_core.errors import PixArtError
from pixart_core.schedule import ddpm_schedule
from pixart_core.step_cache import StepCache, StepCacheOptions, make_step_cache
from tests.factories import tiny_diffusers_transformer, write_all_layouts


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: tiny models, shared CPU


DEPTH = 8
STEPS = 20
# Stated bound: on this tiny model, 20 DPM-Solver++ steps with CFG 4.5 change the final latent by less than 5%
# (relative L2) with Δ-DiT, T-GATE or both at their defaults (measured: ~1.3%, ~0.02%, ~1.3%).
MAX_RELATIVE_CHANGE = 0.05


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    ref = tiny_diffusers_transformer(family="sigma", sample_size=32, depth=DEPTH)
    paths = write_all_layouts(ref, tmp_path_factory.mktemp("cache"), text_len=300)
    return load_transformer(paths["diffusers_folder"])


class Counting:
    """Counts, per sampling call, which blocks ran and how many cross-attentions were computed."""

    def __init__(self, model):
        self.blocks_run: list[list[int]] = []
        self.cross_runs: list[int] = []
        for i, block in enumerate(model.blocks):
            block.register_forward_pre_hook(lambda m, a, i=i: self.blocks_run[-1].append(i))
            block.cross_attn.register_forward_pre_hook(lambda m, a: self._count_cross())

    def _count_cross(self):
        self.cross_runs[-1] += 1

    def new_call(self):
        self.blocks_run.append([])
        self.cross_runs.append(0)


def generate(model, options, *, steps=STEPS, counting=None, controls=None):
    """What a guidance wrapper does with a StepCache: CFG batch until T-GATE's gate, conditional batch after."""
    g = torch.Generator().manual_seed(0)
    y = torch.randn(1, 12, 64, generator=g)
    mask = torch.zeros(1, 12, dtype=torch.long)
    mask[:, :7] = 1
    null_mask = torch.zeros(1, 12, dtype=torch.long)
    null_mask[:, 0] = 1
    text_cfg = model.prepare_text(torch.cat([torch.zeros_like(y), y]), torch.cat([null_mask, mask]))
    text_cond = model.prepare_text(y, mask)
    timesteps = samplers.sampler_timesteps("dpmpp_2m", steps)
    cache = make_step_cache(options, timesteps, model)

    def eps(x, t):
        if counting is not None:
            counting.new_call()
        cfg = cache is None or cache.guidance_needed(t)
        kwargs = cache.model_kwargs(t, cfg=cfg, controls=controls) if cache else {}
        if cfg:
            out = model(torch.cat([x, x]), torch.cat([t, t]), text_cfg, controls=controls, **kwargs).float()
            uncond, cond = out.chunk(2)
            out = uncond + 4.5 * (cond - uncond)
        else:
            out = model(x, t, text_cond, controls=controls, **kwargs).float()
        return out[:, :4]

    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        latent = samplers.sample("dpmpp_2m", eps, noise, ddpm_schedule(), timesteps)
    return latent, cache


@pytest.fixture(scope="module")
def uncached(model):
    return generate(model, None)[0]


def relative_change(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_off_by_default_and_off_means_untouched(model, uncached):
    assert not StepCacheOptions().enabled
    assert make_step_cache(StepCacheOptions(), [999, 500], model) is None
    latent, cache = generate(model, StepCacheOptions())
    assert cache is None and torch.equal(latent, uncached)


@pytest.mark.parametrize("options", [StepCacheOptions(delta_dit=True), StepCacheOptions(tgate=True),
                                     StepCacheOptions(delta_dit=True, tgate=True)], ids=["delta", "tgate", "both"])
def test_cached_image_stays_within_the_stated_bound(model, uncached, options):
    latent, _ = generate(model, options)
    change = relative_change(latent, uncached)
    assert 0 < change < MAX_RELATIVE_CHANGE, change
    assert F.cosine_similarity(latent.flatten(), uncached.flatten(), dim=0) > 0.998


def test_delta_dit_skips_rear_blocks_early_and_front_blocks_late(model):
    counting = Counting(model)
    _, cache = generate(model, StepCacheOptions(delta_dit=True), counting=counting)
    k = round(0.75 * DEPTH)  # 6 of 8 blocks
    runs = counting.blocks_run
    assert len(runs) == STEPS
    for step, ran in enumerate(runs):
        if step % 2 == 0:
            assert ran == list(range(DEPTH)), step  # full step
        elif step < STEPS / 2:
            assert ran == list(range(DEPTH - k)), step  # rear blocks reused: the front ones run
        else:
            assert ran == list(range(k, DEPTH)), step  # front blocks reused
    assert (cache.full_steps, cache.cached_steps) == (10, 10)
    total = sum(len(r) for r in runs)
    assert STEPS * DEPTH / total >= 1.5  # the block work saved (wall-time speed-up: bench/bench_step_cache.py)


def test_tgate_freezes_cross_attention_and_drops_guidance_after_the_gate(model):
    counting = Counting(model)
    _, cache = generate(model, StepCacheOptions(tgate=True), counting=counting)
    gate = cache.gate_step
    assert gate == STEPS // 2
    assert counting.cross_runs == [DEPTH] * gate + [0] * (STEPS - gate)
    timesteps = samplers.sampler_timesteps("dpmpp_2m", STEPS)
    assert [cache.guidance_needed(t) for t in timesteps] == [True] * gate + [False] * (STEPS - gate)
    assert cache.guidance_needed(torch.tensor([float(timesteps[0])] * 2))


def test_both_caches_recompute_when_the_batch_changes_at_the_gate(model):
    counting = Counting(model)
    generate(model, StepCacheOptions(delta_dit=True, tgate=True, tgate_gate=0.55), counting=counting)
    # the gate (step 11) halves the batch: the Δ remembered from the CFG batch cannot be reused there
    assert counting.blocks_run[11] == list(range(DEPTH))


class FakeControl:
    """A ControlNet signal feeding blocks 1..3 (the transformer asks it for residuals after block 0)."""

    class Net:
        num_copies = 3

    controlnet = Net()

    def __call__(self, x, t0, text, grid_hw):
        return [torch.full_like(x, 0.01) for _ in range(3)]


def test_blocks_fed_by_a_controlnet_are_never_skipped(model):
    counting = Counting(model)
    generate(model, StepCacheOptions(delta_dit=True), steps=6, counting=counting, controls=[FakeControl()])
    for ran in counting.blocks_run:
        assert ran[:4] == [0, 1, 2, 3]


def test_the_block_hook_sees_the_output_of_the_last_block(model):
    seen = []
    text = model.prepare_text(torch.randn(1, 4, 64))
    with torch.no_grad():
        plain = model(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), 500.0, text)
        out = model(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), 500.0, text,
                    block_hook=lambda i, h: seen.append(i))
    assert seen == list(range(DEPTH + 1)) and torch.equal(out, plain)


@pytest.mark.parametrize("bad", [dict(delta_interval=1), dict(delta_blocks=1.0), dict(delta_boundary=1.5),
                                 dict(tgate_gate=0.0)])
def test_bad_options_are_refused(bad):
    with pytest.raises(PixArtError):
        StepCache(StepCacheOptions(delta_dit=True, **bad), [999, 500], depth=4)


# ------------------------------------------------------------------------------------------------ wired into sampling
# The same caching through GuidedEpsilon / generate_latents (what the CLI, PixArtPipeline and the sampler nodes run).
def pipeline_inputs(batch=1):
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(batch, 12, 64, generator=g)
    mask = torch.zeros(batch, 12, dtype=torch.long)
    mask[:, :7] = 1
    neg = torch.zeros(batch, 12, 64)
    neg_mask = torch.zeros(batch, 12, dtype=torch.long)
    neg_mask[:, 0] = 1
    return embeds, mask, neg, neg_mask


class ModelCalls:
    """Records, for every model call, the batch size and whether step-cache hooks were passed."""

    def __init__(self, model):
        self.model, self.batches, self.hooked = model, [], []

    def __enter__(self):
        forward = self.model.forward

        def spy(x, *args, **kwargs):
            self.batches.append(x.shape[0])
            self.hooked.append(sorted(k for k in ("block_hook", "cross_attn_hook") if k in kwargs))
            return forward(x, *args, **kwargs)

        self.model.forward = spy
        return self

    def __exit__(self, *exc):
        del self.model.forward  # back to the class method


def pipeline_latents(model, step_cache="off", *, steps=STEPS, guidance=4.5, batch=1, controls=None, calls=None):
    from pixart_core.pipeline import generate_latents

    embeds, mask, neg, neg_mask = pipeline_inputs(batch)
    kwargs = dict(width=128, height=128, binning=False, sampler="dpmpp_2m", steps=steps, guidance_scale=guidance,
                  seed=3, negative_embeds=neg, negative_mask=neg_mask, controls=controls)
    if step_cache != "default":
        kwargs["step_cache"] = step_cache
    if calls is None:
        return generate_latents(model, embeds, mask, **kwargs).latents
    with calls:
        return generate_latents(model, embeds, mask, **kwargs).latents


@pytest.fixture(scope="module")
def pipeline_uncached(model):
    return pipeline_latents(model, "default")


def test_pipeline_with_caching_off_is_the_uncached_run_bit_for_bit(model, pipeline_uncached):
    for off in ("off", None, StepCacheOptions()):
        calls = ModelCalls(model)
        assert torch.equal(pipeline_latents(model, off, calls=calls), pipeline_uncached), off
        assert calls.batches == [2] * STEPS and calls.hooked == [[]] * STEPS  # the model gets exactly the old call


@pytest.mark.parametrize("mode, hooks, batches", [
    ("delta-dit", ["block_hook"], [2] * STEPS),
    ("t-gate", ["cross_attn_hook"], [2] * (STEPS // 2) + [1] * (STEPS // 2)),
    ("both", ["block_hook", "cross_attn_hook"], [2] * (STEPS // 2) + [1] * (STEPS // 2)),
])
def test_pipeline_caching_stays_within_the_bound_and_drops_cfg_after_the_gate(model, pipeline_uncached, mode, hooks,
                                                                              batches):
    calls = ModelCalls(model)
    latent = pipeline_latents(model, mode, calls=calls)
    change = relative_change(latent, pipeline_uncached)
    assert 0 < change < MAX_RELATIVE_CHANGE, change
    assert calls.batches == batches  # after T-GATE's gate: the conditional batch alone, no CFG
    assert calls.hooked == [hooks] * STEPS


def test_after_the_gate_eps_is_the_conditional_prediction_and_the_caption_is_projected_once(model):
    from pixart_core.guidance import GuidedEpsilon

    embeds, mask, neg, neg_mask = pipeline_inputs(batch=2)
    timesteps = samplers.sampler_timesteps("dpmpp_2m", 4)
    projections = []
    handle = model.y_embedder.y_proj.register_forward_hook(lambda *a: projections.append(1))
    try:
        eps = GuidedEpsilon(model, embeds, mask, batch_size=2, size=(128, 128), negative_embeds=neg,
                            negative_mask=neg_mask, guidance_scale=4.5, timesteps=timesteps,
                            step_cache=StepCacheOptions(tgate=True))
        x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
        t_late = torch.full((2,), float(timesteps[3]))  # after the gate (step 2 of 4): nothing stored yet, so the
        got = eps(x, t_late)                            # cross-attention is computed on the conditional batch
        eps(x, t_late)
    finally:
        handle.remove()
    assert len(projections) == 1  # prepare_text once per generation, not per step
    with torch.no_grad():
        cond = model(x, t_late, model.prepare_text(embeds, mask))[:, :4]
        uncond = model(x, t_late, model.prepare_text(neg, neg_mask))[:, :4]
    assert torch.allclose(got, cond, atol=1e-5, rtol=1e-5)
    assert (got - (uncond + 4.5 * (cond - uncond))).abs().max() > 1e-2  # not the guided prediction


def tiny_controlnet(model, copies=3, seed=4):
    from pixart_core.controlnet import ControlNetInfo, PixArtControlNet

    c = model.config
    torch.manual_seed(seed)
    net = PixArtControlNet(ControlNetInfo(num_copies=copies, hidden_size=c.hidden_size, num_heads=c.num_heads,
                                          family=c.family)).eval().requires_grad_(False)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    return net


@pytest.mark.parametrize("mode", ["delta-dit", "t-gate", "both"])
def test_pipeline_caching_works_with_a_scheduled_controlnet(model, mode):
    net = tiny_controlnet(model)
    hint = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(6))
    run = lambda cache, start=0.0, end=1.0: pipeline_latents(  # noqa: E731
        model, cache, steps=10, batch=2, controls=[net.bind(model, hint, 1.0, start, end)])
    plain = pipeline_latents(model, "off", steps=10, batch=2)
    controlled, cached = run("off"), run(mode)
    assert (controlled - plain).abs().max() > 1e-3  # the ControlNet acts
    assert 0 < relative_change(cached, controlled) < MAX_RELATIVE_CHANGE
    # on for the middle of the schedule only: the control switches on and off while the cache runs
    windowed_plain, windowed = run("off", 0.3, 0.7), run(mode, 0.3, 0.7)
    assert 0 < relative_change(windowed, windowed_plain) < MAX_RELATIVE_CHANGE


def test_delta_dit_reuses_only_the_last_full_steps_change_when_a_controlnet_stops():
    """A ControlNet that stops mid-schedule changes which blocks may be skipped; the Δ reused afterwards must come
    from the last full step, never pair a token mark from it with one from an older step."""
    cache = StepCache(StepCacheOptions(delta_dit=True), list(range(999, 0, -100)), depth=8)  # 10 steps, front at 5+
    control = FakeControl()
    h = torch.zeros(1, 4, 8)

    def step(index, controls):
        hook = cache.model_kwargs(cache.timesteps[index], cfg=False, controls=controls)["block_hook"]
        return [hook(i, h + index) is None for i in range(9)]  # True where block i runs (or output is kept)

    runs = [step(index, None) for index in range(6)]  # no control: full steps mark blocks 0, 2, 6 and 8
    assert not all(runs[5])  # a cached step (front blocks 0-5 skipped, with the marks of step 4)
    assert step(6, [control]) == [True] * 9  # control on: blocks 1-3 protected, full step marking 4, 6 and 8
    assert step(7, None) == [True] * 9  # control off: block 0's mark is from step 4, stale, so a full step again
    assert not all(step(8, None))  # cached again, from step 7
