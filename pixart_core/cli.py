"""Command line: `python -m pixart_core generate "prompt" -o out.png` and `python -m pixart_core describe PATH`.

Models come from local paths (`--model` for a diffusers pipeline folder, or `--transformer/--t5/--vae` in any layout
the core reads), or by name (`--model nano`, `--model official`); with none, the official PixArt-δ LCM pipeline when it
is in the Hugging Face cache, else the bundled PixArt-nano, and one line says which (loading/hub.py). User errors
(PixArtError) print as one message, exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from .errors import PixArtError

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _build_parser() -> argparse.ArgumentParser:
    from .samplers import SAMPLERS
    from .loading.t5_loading import PRECISIONS as T5_PRECISIONS
    from .quantize import MODES as QUANTIZE_MODES
    from .step_cache import MODES as STEP_CACHE_MODES

    parser = argparse.ArgumentParser(prog="python -m pixart_core", description="PixArt-α/Σ/δ without ComfyUI.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="text to image (img2img with --init-image, inpainting with --mask)")
    gen.add_argument("prompt")
    gen.add_argument("-o", "--output", default="out.png",
                     help="PNG path; with several images, _0, _1, ... are added before the suffix")
    gen.add_argument("--negative", default="", help="negative prompt (used only with guidance > 1)")
    gen.add_argument("--model", help="diffusers pipeline folder (transformer/, text_encoder/, tokenizer/, vae/); "
                                     "'nano': the bundled PixArt-nano; 'official': PixArt-LCM-XL-2-1024-MS from the "
                                     "Hugging Face cache (downloaded when online). Default: official when cached, "
                                     "else nano")
    gen.add_argument("--transformer", help="transformer checkpoint (.safetensors, .pth or diffusers folder)")
    gen.add_argument("--t5", help="T5 encoder (diffusers/HF folder or one .safetensors)")
    gen.add_argument("--vae", help="VAE (diffusers folder or one file)")
    gen.add_argument("--width", type=int, help="pixels (default: the model's training size)")
    gen.add_argument("--height", type=int)
    gen.add_argument("--sampler", choices=list(SAMPLERS), help="default: lcm for LCM checkpoints, else dpmpp_2m")
    gen.add_argument("--steps", type=int, help="default: the sampler's (lcm 4, dpmpp_2m 20, sa_solver 25)")
    gen.add_argument("--guidance", type=float, help="CFG scale; <= 1 turns CFG off (default: lcm 0, others 4.5 / 3)")
    gen.add_argument("--lcm-table", choices=["diffusers", "original"], default="diffusers",
                     help="LCM timesteps: diffusers' LCMScheduler (999,759,499,259) or the original repo's")
    gen.add_argument("--seed", type=int, default=0, help="image k of the batch uses seed + k")
    gen.add_argument("--batch", type=int, default=1, help="images to generate")
    gen.add_argument("--no-binning", action="store_true", help="generate at exactly --width x --height")
    gen.add_argument("--init-image", help="start from this image (img2img)")
    gen.add_argument("--denoise", type=float, default=1.0, help="img2img strength, 0..1")
    gen.add_argument("--mask", help="inpainting: a mask image for --init-image, white = repaint, black = keep "
                                    "(grey blends; another size is stretched to the image's)")
    gen.add_argument("--cache", choices=list(STEP_CACHE_MODES), default="off",
                     help="step caching for multi-step samplers (faster, slightly different image): Δ-DiT reuses "
                          "block work on every second step, T-GATE freezes cross-attention and drops CFG for the "
                          "second half of the steps")
    gen.add_argument("--lora", action="append", default=[], type=_lora_argument, metavar="FILE[:STRENGTH]",
                     help="apply a LoRA (diffusers, PEFT or kohya .safetensors) with a strength (default 1); repeat "
                          "to stack several")
    gen.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="transformer precision")
    gen.add_argument("--quantize", choices=list(QUANTIZE_MODES), default="none",
                     help="8-bit transformer block weights (pixart_core.quantize): int8-dynamic is the fast one")
    gen.add_argument("--t5-precision", choices=list(T5_PRECISIONS), default="bf16")
    gen.add_argument("--vae-dtype", choices=list(DTYPES), default="fp32")
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--no-progress", action="store_true")

    desc = sub.add_parser("describe", help="what a transformer checkpoint is, without loading its weights")
    desc.add_argument("path")
    return parser


def _lora_argument(text: str) -> tuple[str, float]:
    """FILE or FILE:STRENGTH (the last ':' counts only when a number follows, so C:\\ paths work)."""
    path, _, strength = text.rpartition(":")
    try:
        return (path, float(strength)) if path else (text, 1.0)
    except ValueError:
        return text, 1.0


def _output_paths(output: str, count: int) -> list[Path]:
    out = Path(output)
    if out.suffix.lower() != ".png":
        raise PixArtError(f"The output must be a .png file; got {output!r}.")
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{k}{out.suffix}") for k in range(count)]


def _load_init_image(path: str):
    import numpy as np
    import torch
    from PIL import Image

    try:
        img = Image.open(path).convert("RGB")
    except (OSError, ValueError) as e:
        raise PixArtError(f"Cannot read the init image {path!r}: {e}") from e
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
    return arr.permute(2, 0, 1)[None]


def _load_mask(path: str):
    """A greyscale mask image as (1, H, W) in [0, 1] (white = 1 = repaint, as ComfyUI's masks)."""
    import numpy as np
    import torch
    from PIL import Image

    try:
        img = Image.open(path).convert("L")
    except (OSError, ValueError) as e:
        raise PixArtError(f"Cannot read the mask {path!r}: {e}") from e
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]


def _generate(args: argparse.Namespace) -> int:
    import torch

    from .loading.hub import resolve_model
    from .pipeline import PixArtPipeline

    if args.batch < 1:
        raise PixArtError(f"--batch must be at least 1; got {args.batch}.")
    paths = _output_paths(args.output, args.batch)
    if args.mask and not args.init_image:
        raise PixArtError("--mask says which part of --init-image to repaint; give --init-image too.")
    inpaint_mask = _load_mask(args.mask) if args.mask else None  # before the models: a bad file fails fast
    t0 = time.perf_counter()
    model, note = resolve_model(args.model, parts_given=None not in (args.transformer, args.t5, args.vae))
    if note:
        print(note, file=sys.stderr)
    pipe = PixArtPipeline.from_paths(
        model, transformer=args.transformer, t5=args.t5, vae=args.vae,
        dtype=getattr(torch, DTYPES[args.dtype]), t5_precision=args.t5_precision,
        vae_dtype=getattr(torch, DTYPES[args.vae_dtype]), device=args.device, weights=args.quantize,
    )
    if args.lora:
        from .loading.lora_files import load_lora
        from .lora import apply_loras

        apply_loras(pipe.transformer, [(load_lora(path), strength) for path, strength in args.lora])
    print(f"loaded models in {time.perf_counter() - t0:.1f} s; sampler {args.sampler or pipe.default_sampler}",
          file=sys.stderr)

    bar = None
    callback = None
    if not args.no_progress:
        from tqdm import tqdm

        def callback(step: int, total: int, x, denoised) -> None:
            nonlocal bar
            if bar is None:
                bar = tqdm(total=total, desc="sampling", unit="step", file=sys.stderr)
            bar.update(1)

    init = _load_init_image(args.init_image) if args.init_image else None
    try:
        images = pipe(
            args.prompt, args.negative, width=args.width, height=args.height, num_images_per_prompt=args.batch,
            sampler=args.sampler, steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
            binning=not args.no_binning, lcm_table=args.lcm_table, init_image=init, denoise=args.denoise,
            inpaint_mask=inpaint_mask, callback=callback, step_cache=args.cache,
        )
    finally:
        if bar is not None:
            bar.close()
    for k, (img, path) in enumerate(zip(images, paths)):
        save_png_atomically(img, path)
        print(f"{path} (seed {args.seed + k}, {img.width}x{img.height})")
    return 0


def save_png_atomically(img, path: Path) -> None:
    """Write to a temporary file beside the target, then rename: a failure (disk full, Ctrl-C) never leaves a
    half-written PNG under the output name, and an existing file is replaced only by a complete one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    try:
        img.save(partial, format="PNG")
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _describe(args: argparse.Namespace) -> int:
    from .loading.checkpoint import describe

    print(json.dumps(describe(args.path), indent=2, default=str))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        return _generate(args) if args.command == "generate" else _describe(args)
    except PixArtError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
