"""Fine-tune a PixArt-nano build for shapes (issue #18 item 3): `python -m train.finetune_shapes --out DIR`.

Starts from the build in --src (default models/nano): its teacher is trained further with the PixArt objective plus
the pixel-space x0 loss (losses.pixel_x0_loss, through the build's frozen VAE), then the LCM student is distilled
again from the new teacher (recipe 2, student initialised from it) and the ControlNet trained again on it (recipe 3,
build_nano's step 6). T5, tokenizer and VAE are the source build's, unchanged. Writes the build layout to --out;
score it with `python -m train.build_nano --out DIR --eval-only`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from pixart_core.loading.bundled import BASE_FILE, CONTROLNET_FILE, LCM_DIR, NANO_DIR
from . import data
from .build_nano import PREDICTION, Logger, train_controlnet_stage
from .common import encode_pool
from .export import save_controlnet, save_original_transformer, save_pipeline
from .lcm_distill import LCMConfig, lcm_distill
from .pretrain import PretrainConfig, pretrain
from .tokenizer import load_hf_tokenizer


def load_source(src: Path):
    """The source build's teacher (fp32), frozen T5 encoder, tokenizer and VAE (diffusers AutoencoderKL)."""
    from diffusers import AutoencoderKL
    from transformers import T5EncoderModel

    from pixart_core.loading.checkpoint import load_transformer

    teacher = load_transformer(src / BASE_FILE, dtype=torch.float32)
    t5 = T5EncoderModel.from_pretrained(str(src / LCM_DIR / "text_encoder")).eval().requires_grad_(False)
    tokenizer = load_hf_tokenizer(src / LCM_DIR / "tokenizer")
    vae = AutoencoderKL.from_pretrained(str(src / LCM_DIR / "vae")).eval().requires_grad_(False)
    return teacher, t5, tokenizer, vae


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src", default=str(NANO_DIR))
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=800, help="teacher fine-tuning steps")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--pixel-weight", type=float, default=1.0, help="0: the plain PixArt loss (the control run)")
    ap.add_argument("--lcm-steps", type=int, default=400, help="0: stop after the teacher")
    ap.add_argument("--controlnet-steps", type=int, default=500, help="0: copy the source build's ControlNet")
    ap.add_argument("--pool", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    src, out = Path(args.src), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = Logger(out / "build_log.txt")
    log(f"finetune_shapes {vars(args)}; torch threads {torch.get_num_threads()}")
    start = time.time()
    teacher, t5, tokenizer, vae = load_source(src)
    scenes = data.make_scenes(args.seed + 10, args.pool, varied=True)  # build_nano's pool
    images, captions = data.batch(scenes)
    pool = encode_pool(vae, images, captions, vae.config.scaling_factor)
    log(f"latent pool: {len(pool)} scenes ({time.time() - start:.0f}s)")

    cfg = PretrainConfig(steps=args.steps, lr=args.lr, warmup=20, seed=args.seed + 40, prediction=PREDICTION,
                         train_text_encoder=False, pixel_weight=args.pixel_weight)
    teacher = pretrain(teacher, t5, tokenizer, pool, cfg, log=log, decoder=vae).model
    save_original_transformer(teacher, out / BASE_FILE)
    log(f"teacher fine-tuned ({time.time() - start:.0f}s)")
    if args.lcm_steps:
        student = lcm_distill(teacher, t5, tokenizer, pool, LCMConfig(steps=args.lcm_steps, seed=args.seed),
                              log=log).student
    else:  # the teacher in the pipeline folder, so the build's evaluation can still load it
        student = teacher
    save_pipeline(out / LCM_DIR, student, t5, src / LCM_DIR / "tokenizer", vae, scheduler="lcm")
    log(f"LCM written ({time.time() - start:.0f}s)")
    if args.controlnet_steps:
        cres = train_controlnet_stage(teacher, t5, tokenizer, vae, args.seed, args.pool, args.controlnet_steps, log)
        save_controlnet(cres.controlnet, out / CONTROLNET_FILE)
    else:
        shutil.copy(src / CONTROLNET_FILE, out / CONTROLNET_FILE)
    recorded = json.loads((src / "scores.json").read_text())
    facts = {k: recorded[k] for k in ("text_pretraining", "text_encoder_probe") if k in recorded}
    facts["train_seconds"] = time.time() - start
    facts["train_note"] = f"fine-tuned from {src} by train.finetune_shapes {vars(args)}"
    (out / "scores.json").write_text(json.dumps(facts, indent=2))
    log(f"done in {time.time() - start:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
