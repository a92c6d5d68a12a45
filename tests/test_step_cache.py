"""Step caching (step_cache.py): which blocks run on which step, T-GATE's gate, and the change it makes to images."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pixart_core import samplers
from pixart_core.checkpoint import load_transformer
from pixart_core.errors import PixArtError
from pixart_core.schedule import ddpm_schedule
from pixart_core.step_cache import StepCache, StepCacheOptions, make_step_cache
from tests.factories import tiny_diffusers_transformer, write_all_layouts


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and on a shared, busy CPU two OpenMP threads wait on each other for
    every small op (measured: this file 408 s with 2 threads under load, 16 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
