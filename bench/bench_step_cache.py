"""Benchmark: training-free step caching (Δ-DiT, T-GATE) against the same generation without it.

Full run (default): our full-size XL-2 transformer (28 blocks, width 1152) with random weights in bf16, 512x512,
20 DPM-Solver++(2M) steps with CFG 4.5 (batch [uncond, cond]), one image. The same seed and inputs for every variant;
T5 and the VAE are left out (identical for all variants). Printed per variant: seconds for the 20 steps, speed-up over
the uncached run, and how much the final latent changed (relative L2 and cosine similarity to the uncached latent).
Target (issue 7): >= 1.4x at 20 steps. Random weights: the change says how far caching moves the trajectory, not how
an image from trained weights looks.

    python bench/bench_step_cache.py                 # 20 steps at 512 px: off / delta-dit / t-gate / both
    python bench/bench_step_cache.py --lcm           # the 4-step LCM case (no CFG)
    python bench/bench_step_cache.py --threads 1 --clock cpu     # CPU seconds: stable on a shared machine
    python bench/bench_step_cache.py --size 1024 --variants off delta-dit
    python bench/bench_step_cache.py --quick         # tiny model, seconds (smoke test)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FULL, TINY, CachedGuidance, machine_line, our_transformer, print_table, text_inputs  # noqa: E402

from pixart_core import samplers  # noqa: E402
from pixart_core.schedule import ddpm_schedule  # noqa: E402
from pixart_core.step_cache import MODES, StepCacheOptions, make_step_cache  # noqa: E402

VARIANTS = {name: options or StepCacheOptions() for name, options in MODES.items()}  # off, delta-dit, t-gate, both


def generate(model, sampler: str, steps: int, scale: float, size: int, options: StepCacheOptions, seed: int = 0,
             clock=time.perf_counter):
    y, mask = text_inputs(2 if scale > 1 else 1, model.config.caption_channels, valid=(1, 20) if scale > 1 else (20,))
    timesteps = samplers.sampler_timesteps(sampler, steps)
    cache = make_step_cache(options, timesteps, model)
    eps = CachedGuidance(model, y, mask, scale, size, cache)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, 4, size // 8, size // 8, generator=g)
    noise_fn = lambda like: torch.randn(like.shape, generator=g)  # noqa: E731
    start = clock()
    with torch.no_grad():
        latent = samplers.sample(sampler, eps, noise, ddpm_schedule(), timesteps, noise_fn=noise_fn)
    return clock() - start, latent


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--lcm", action="store_true", help="LCM sampler, 4 steps, no guidance")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: process CPU time; with --threads 1 it is robust to other processes on a shared CPU")
    args = ap.parse_args(argv)
    if args.threads or args.quick:
        torch.set_num_threads(args.threads or 1)  # tiny models: one thread is fastest
    shape, size = (TINY, 64) if args.quick else (FULL, args.size)
    sampler, scale = ("lcm", 0.0) if args.lcm else ("dpmpp_2m", 4.5)
    steps = args.steps or (4 if args.lcm else (8 if args.quick else 20))
    print(machine_line(), flush=True)
    model = our_transformer(shape, torch.bfloat16)
    variants = ["off"] + [v for v in args.variants if v != "off"]
    results = {}
    for name in variants:
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        results[name] = generate(model, sampler, steps, scale, size, VARIANTS[name], clock=clock)
        print(f"  {name}: {results[name][0]:.1f} s", flush=True)
    base_t, base = results["off"]
    rows = []
    for name, (t, latent) in results.items():
        rel = ((latent - base).norm() / base.norm()).item()
        cos = F.cosine_similarity(latent.flatten(), base.flatten(), dim=0).item()
        rows.append([name, t, base_t / t, rel, cos])
    kind = "tiny" if args.quick else "XL-2 (28 x 1152)"
    print(f"\n{steps} {sampler} steps, {kind}, bf16, {size}x{size}, guidance {scale:g}, "
          f"{'CPU' if args.clock == 'cpu' else 'wall'} seconds, {torch.get_num_threads()} thread(s):")
    print_table(["caching", "s", "speed-up", "latent change (rel. L2)", "cosine to uncached"], rows)


if __name__ == "__main__":
    main()
