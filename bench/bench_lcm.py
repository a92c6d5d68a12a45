"""Benchmark: PixArt-δ LCM text-to-image, ours vs diffusers, same weights, same run.

Full run (default): the full-size PixArt-XL-2-1024-MS transformer (28 blocks, width 1152, micro-conditions) with random
weights in bf16, 1024x1024, LCM 4 steps, no guidance, VAE decode included (SD VAE architecture, random weights, same
module for both), T5 excluded (the same random prompt embeddings, 20 valid tokens of 120, go to both).
  ours:      pixart_core.pipeline.generate_latents + latents_to_images
  reference: diffusers PixArtAlphaPipeline + LCMScheduler, output_type="pt" (decode and postprocess included)
Target: ours / reference <= 0.8. Takes several minutes on a 2-core CPU (one 1024 px step is ~45 s in diffusers).

--quick: tiny models at 128x128, a few seconds (smoke test; its ratio means little).
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pixart_core import pipeline as pl  # noqa: E402
from pixart_core.loading.checkpoint import load_transformer  # noqa: E402
from pixart_core.vae import PixArtVAE  # noqa: E402

FULL = dict(num_attention_heads=16, attention_head_dim=72, num_layers=28, caption_channels=4096, sample_size=128)
TINY = dict(num_attention_heads=2, attention_head_dim=72, num_layers=2, caption_channels=64, sample_size=32)
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)
TINY_VAE = dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)


def build_reference(shape: dict, vae_shape: dict, dtype: torch.dtype):
    from diffusers import AutoencoderKL, PixArtTransformer2DModel

    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        in_channels=4, out_channels=8, patch_size=2, cross_attention_dim=shape["num_attention_heads"] * 72,
        norm_type="ada_norm_single", num_embeds_ada_norm=1000,
        use_additional_conditions=shape["sample_size"] == 128, **shape)
    with torch.no_grad():
        for p in transformer.parameters():  # random, non-zero everywhere (zero-init layers would be unrealistic)
            p.normal_(0, 0.02)
    vae = AutoencoderKL(latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, **vae_shape)
    return transformer.to(dtype).eval(), vae.to(dtype).eval()


def run_ours(transformer, vae, embeds, mask, size: int, steps: int, seed: int,
             binning: bool = True, clock=time.perf_counter) -> tuple[float, torch.Tensor]:
    start = clock()
    result = pl.generate_latents(transformer, embeds, mask, width=size, height=size, sampler="lcm", steps=steps,
                                 guidance_scale=0.0, seed=seed, binning=binning)
    images = pl.latents_to_images(vae, result.latents.to(vae.dtype), result.plan)
    return clock() - start, images


def run_reference(pipe, embeds, mask, size: int, steps: int, seed: int,
                  binning: bool = True, clock=time.perf_counter) -> tuple[float, torch.Tensor]:
    start = clock()
    images = pipe(prompt=None, negative_prompt=None, prompt_embeds=embeds, prompt_attention_mask=mask,
                  num_inference_steps=steps, guidance_scale=0.0, height=size, width=size,
                  generator=[torch.Generator().manual_seed(seed)], output_type="pt",
                  use_resolution_binning=binning).images
    return clock() - start, images


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models, seconds")
    parser.add_argument("--size", type=int, default=None, help="pixels (default 1024, quick 256)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=None, help="timed runs each, best kept (default 1)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: process CPU time; with --threads 1 it is robust to other processes on a shared CPU")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    from diffusers import LCMScheduler, PixArtAlphaPipeline

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    size = args.size or (128 if args.quick else 1024)
    repeats = args.repeats or 1
    shape, vae_shape = (TINY, TINY_VAE) if args.quick else (FULL, SD_VAE)

    t0 = time.perf_counter()
    ref_transformer, vae = build_reference(shape, vae_shape, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        ref_transformer.save_pretrained(Path(tmp) / "transformer")
        ours = load_transformer(tmp, dtype=dtype)
    gc.collect()
    # Ours gets its own copy of the same weights: PixArtVAE may change a module's memory format for speed, and the
    # reference must run diffusers' module exactly as a diffusers user has it.
    our_vae = PixArtVAE(copy.deepcopy(vae), "sd", vae.config.scaling_factor)
    pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=ref_transformer,
                               scheduler=LCMScheduler(beta_start=1e-4, beta_end=0.02, beta_schedule="linear"))
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(1)
    embeds = torch.randn(1, 120, shape["caption_channels"], generator=g).to(dtype)
    mask = torch.zeros(1, 120, dtype=torch.long)
    mask[:, :20] = 1  # a typical prompt: 20 tokens of 120
    print(f"setup {time.perf_counter() - t0:.1f} s; {'tiny' if args.quick else 'full-size'} models, {size}x{size}, "
          f"LCM {args.steps} steps, {args.dtype}, {torch.get_num_threads()} threads", flush=True)

    # Warm-up at a small size so one-time kernel setup is not timed.
    run_ours(ours, our_vae, embeds, mask, 128, 1, 0, binning=False)
    run_reference(pipe, embeds, mask, 128, 1, 0, binning=False)

    ours_times, ref_times = [], []
    for _ in range(repeats):
        t, ours_img = run_ours(ours, our_vae, embeds, mask, size, args.steps, 42, clock=clock)
        ours_times.append(t)
        print(f"  ours      {t:8.2f} s", flush=True)
        t, ref_img = run_reference(pipe, embeds, mask, size, args.steps, 42, clock=clock)
        ref_times.append(t)
        print(f"  diffusers {t:8.2f} s", flush=True)
    ours_best, ref_best = min(ours_times), min(ref_times)
    diff = (ours_img.float() - ref_img.float()).abs().max().item()
    print(f"ours {ours_best:.2f} s, diffusers {ref_best:.2f} s ({args.clock} clock), ratio {ours_best / ref_best:.3f} "
          f"(target <= 0.8); max abs image difference {diff:.3g} ({args.dtype})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
