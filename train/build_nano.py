"""Build PixArt-nano from scratch: `python -m train.build_nano --out models/nano`.

Trains, in order, with the recipes of this package and nothing pre-trained:
  1. the tokenizer (word level, built from the dataset's vocabulary);
  2. the tiny T5 as a text-to-text model (caption in any phrasing -> canonical scene description, text_pretrain.py),
     whose encoder is then frozen, as PixArt's T5 is; a linear probe checks that its colour tokens carry their
     object's place (scores.json "text_encoder_probe");
  3. the VAE (diffusers AutoencoderKL, 8x down, 4 latent channels) on nano scenes and edge maps, with a hinge that
     keeps the three shapes of one object apart in its latent (vae_train.shape_separation_loss);
  4. the transformer (PixArt-α shaped, 64x64 px) with the PixArt objective in v-prediction, on the frozen T5
     encoder's states, with captions in varied phrasings (data.phrasings), learning rate decayed (cosine) to 0.1;
  5. the LCM student (PixArt-δ consistency distillation, 4-step sampling without CFG; a v model like its teacher);
  6. the ControlNet-Transformer on edge maps, on the frozen base;
then writes them in the loaders' layouts, reloads them through the project's loaders and scores them with the caption
checker (printed and written to scores.json, with a PNG grid of outputs).

Output (models/nano):
  PixArt-nano-LCM/                 diffusers pipeline folder (LCMScheduler, prediction_type v_prediction): the default
                                   model
  PixArt-nano-base.safetensors     the teacher, original PixArt key layout (with y_embedding, pos_embed); metadata
                                   prediction_type = v_prediction
  PixArt-nano-ControlNet.safetensors  PixArt-δ ControlNet key layout, for the base (and the LCM)
  scores.json, nano_grid.png, build_log.txt

All randomness is seeded; `--scale` multiplies every step count (e.g. 0.5 for a quicker, weaker build).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from pixart_core.loading.bundled import BASE_FILE, CONTROLNET_FILE, LCM_DIR, NANO_DIR
from . import caption_checker, data, shape_report
from .common import encode_pool, init_pixart_weights, nano_transformer_config
from .controlnet_train import ControlNetTrainConfig, HintPool, train_controlnet
from .evaluate import control_scenes, controlnet_iou, decode, encode, guard_scores, save_grid, score_model
from .export import folder_size, save_controlnet, save_original_transformer, save_pipeline
from .lcm_distill import LCMConfig, lcm_distill
from .pretrain import PretrainConfig, pretrain
from .text_pretrain import TextPretrainConfig, binding_probe, build_text_model, encoder_of, pretrain_text
from .tokenizer import build_tokenizer, load_hf_tokenizer, save_tokenizer
from .vae_train import VAETrainConfig, train_vae

# The nano models predict v, not ε (pretrain.py explains why); the LCM student and the ControlNet follow their base.
# The files record it (the LCM pipeline's scheduler config, the teacher's safetensors metadata) and the loaders read
# it back into config.prediction_type.
PREDICTION = "v"
# Step counts at --scale 1 and the recipe's choices that differ from the configs' defaults (build 7 on).
TEXT_STEPS, VAE_STEPS, PRETRAIN_STEPS, LCM_STEPS, CONTROLNET_STEPS = 800, 800, 4500, 400, 500
VAE_SHAPE_WEIGHT = 1.0
PRETRAIN_FINAL_LR_FRACTION = 0.1


class Logger:
    def __init__(self, path: Path):
        self.file = open(path, "a")
        self.start = time.time()

    def __call__(self, msg: str) -> None:
        line = f"[{time.time() - self.start:7.1f}s] {msg}"
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()


def _steps(n: int, scale: float) -> int:
    return max(1, int(round(n * scale)))


def train_all(out: Path, scale: float, seed: int, log: Logger, pool_size: int) -> dict:
    """Returns what the training measured on the way (text pre-training, probe) for scores.json."""
    work = out / "_build"
    work.mkdir(parents=True, exist_ok=True)
    facts: dict = {}
    # 1. tokenizer
    tok_dir = save_tokenizer(build_tokenizer(data.VOCABULARY), work / "tokenizer")
    tokenizer = load_hf_tokenizer(tok_dir)
    log(f"tokenizer: {len(tokenizer)} tokens")

    # 2. text pre-training of the T5 (caption -> canonical description); only its encoder is kept, frozen
    text_model = build_text_model(len(tokenizer), seed)
    tres = pretrain_text(text_model, tokenizer, TextPretrainConfig(steps=_steps(TEXT_STEPS, scale), seed=seed),
                         log=log)
    t5 = encoder_of(text_model)
    probe = binding_probe(t5, tokenizer, seed=seed + 30)
    probe_original = binding_probe(t5, tokenizer, seed=seed + 31, varied=False)
    facts["text_pretraining"] = {"steps": len(tres.losses), "seconds": tres.seconds,
                                 "first_loss": tres.losses[0], "final_loss": float(np.mean(tres.losses[-20:])),
                                 "final_tagging_loss": float(np.mean(tres.tagging_losses[-20:])),
                                 "held_out_exact_match": tres.held_out_exact}
    facts["text_encoder_probe"] = {"varied_phrasings": probe, "original_grammar": probe_original}
    log(f"text pre-training done in {tres.seconds:.0f}s: {facts['text_pretraining']}")
    log(f"linear probe on the frozen encoder's colour tokens (held-out captions): order {probe['order']:.4f}, "
        f"place {probe['place']:.4f}; original grammar only: order {probe_original['order']:.4f}, "
        f"place {probe_original['place']:.4f}")

    # 3. VAE
    vres = train_vae(VAETrainConfig(steps=_steps(VAE_STEPS, scale), shape_weight=VAE_SHAPE_WEIGHT, seed=seed),
                     log=log)
    vae = vres.vae
    log(f"VAE trained in {vres.seconds:.0f}s")
    facts["stage_seconds"] = {"text_pretraining": tres.seconds, "vae": vres.seconds}

    # latents of the training scenes (posterior mean/std; sampled every step)
    scenes = data.make_scenes(seed + 10, pool_size, varied=True)
    images, captions = data.batch(scenes)
    pool = encode_pool(vae, images, captions, vae.config.scaling_factor)
    log(f"latent pool: {len(pool)} scenes, scaled latent std {float(pool.mean.std() * pool.scale):.3f}")

    # 4. pre-training of the transformer on the frozen T5 encoder
    model_cfg = nano_transformer_config(t5.config.d_model)
    from pixart_core.transformer import PixArtTransformer

    torch.manual_seed(seed)
    model = PixArtTransformer(model_cfg)
    init_pixart_weights(model, seed)
    log(f"transformer: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, T5 "
        f"{sum(p.numel() for p in t5.parameters()) / 1e6:.2f} M, VAE {sum(p.numel() for p in vae.parameters()) / 1e6:.2f} M")
    pres = pretrain(model, t5, tokenizer, pool,
                    PretrainConfig(steps=_steps(PRETRAIN_STEPS, scale), seed=seed, prediction=PREDICTION,
                                   final_lr_fraction=PRETRAIN_FINAL_LR_FRACTION, train_text_encoder=False), log=log)
    teacher = pres.model
    log(f"pre-training done in {pres.seconds:.0f}s")
    facts["stage_seconds"]["pretraining"] = pres.seconds
    save_original_transformer(teacher, out / BASE_FILE)

    # 5. LCM distillation
    lres = lcm_distill(teacher, t5, tokenizer, pool, LCMConfig(steps=_steps(LCM_STEPS, scale), seed=seed),
                       log=log)
    log(f"LCM distillation done in {lres.seconds:.0f}s")
    facts["stage_seconds"]["lcm_distillation"] = lres.seconds
    save_pipeline(out / LCM_DIR, lres.student, t5, tok_dir, vae, scheduler="lcm")

    # 6. ControlNet on edge maps of scenes placed anywhere (plus ordinary scenes), captions in varied phrasings
    cres = train_controlnet_stage(teacher, t5, tokenizer, vae, seed, pool_size, _steps(CONTROLNET_STEPS, scale),
                                  log)
    save_controlnet(cres.controlnet, out / CONTROLNET_FILE)
    facts["stage_seconds"]["controlnet"] = cres.seconds
    return facts


def train_controlnet_stage(teacher, t5, tokenizer, vae, seed: int, pool_size: int, steps: int, log: Logger):
    """Step 6: the ControlNet on edge maps of scenes placed anywhere (60 %) and ordinary scenes, varied phrasings."""
    rng = np.random.default_rng(seed + 20)
    cscenes = [data.random_single(rng, free_placement=True) if rng.random() < 0.6 else data.random_scene(rng)
               for _ in range(pool_size // 2)]
    vrng = np.random.default_rng(seed + 21)
    for sc in cscenes:
        data.vary_caption(sc, vrng)
    cimages, ccaptions = data.batch(cscenes)
    edges, _ = data.batch(cscenes, edges=True)
    scale_f = vae.config.scaling_factor
    hpool = HintPool(encode_pool(vae, cimages, ccaptions, scale_f), encode_pool(vae, edges, ccaptions, scale_f))
    cres = train_controlnet(teacher, t5, tokenizer, hpool, ControlNetTrainConfig(steps=steps, seed=seed), log=log)
    log(f"ControlNet training done in {cres.seconds:.0f}s")
    return cres


def _load_vae(folder: Path, latent_scale: float, log: Logger):
    """The project's VAE loader; if it cannot build this VAE's shape, diffusers' own from_pretrained (same weights,
    same PixArtVAE wrapper), and the fallback is logged."""
    from diffusers import AutoencoderKL

    from pixart_core.errors import PixArtError
    from pixart_core.loading.vae_files import load_vae
    from pixart_core.vae import PixArtVAE

    try:
        return load_vae(str(folder), latent_scale=latent_scale)
    except PixArtError as e:
        log(f"NOTE: load_vae failed on the nano VAE ({str(e)[:160]}...); "
            "using AutoencoderKL.from_pretrained for the evaluation")
        return PixArtVAE(AutoencoderKL.from_pretrained(str(folder)), "sd", latent_scale)


def evaluate(out: Path, log: Logger, prompts: int, control_cases: int, seed: int = 777) -> dict:
    """Reload everything through the project's loaders and score it."""
    from pixart_core.loading.checkpoint import load_transformer
    from pixart_core.loading.controlnet_files import load_controlnet
    from pixart_core.loading.t5_loading import load_t5

    lcm = load_transformer(out / LCM_DIR, dtype=torch.float32)
    base = load_transformer(out / BASE_FILE, dtype=torch.float32)
    t5 = load_t5(out / LCM_DIR, precision="fp32")
    vae = _load_vae(out / LCM_DIR / "vae", lcm.config.latent_scale, log)
    cn = load_controlnet(out / CONTROLNET_FILE, dtype=torch.float32)
    scores: dict = {"checker_on_ground_truth": caption_checker.validate_on_ground_truth()}
    scenes = caption_checker.evaluation_scenes(seed, prompts)
    edges_scenes = control_scenes(seed + 1, control_cases)

    # the VAE's ceiling: the checker on VAE reconstructions of the ground truth
    gt, caps = data.batch(scenes)
    rec = decode(vae, encode(vae, gt)).permute(0, 2, 3, 1).numpy()
    scores["checker_on_vae_reconstructions"] = caption_checker.score(rec, caps)
    log(f"checker on ground truth: {scores['checker_on_ground_truth']}")
    log(f"checker on VAE reconstructions: {scores['checker_on_vae_reconstructions']}")
    with torch.no_grad():
        scores["shape_signal_in_latent"] = shape_report.shape_signal(vae)
    log(f"shape signal in the latent (distance between shapes / object's own): {scores['shape_signal_in_latent']}")

    t = time.time()
    scores["lcm_4_steps_no_cfg"], lcm_images = score_model(lcm, t5, vae, scenes, sampler="lcm", steps=4, guidance=0.0,
                                                           seed=seed)
    log(f"LCM 4 steps, no CFG ({time.time() - t:.1f}s): {scores['lcm_4_steps_no_cfg']}")
    scores["lcm_4_steps_shape_confusion"] = shape_confusion(lcm_images, scenes)
    log(f"LCM 4 steps, asked shape -> seen shape: {scores['lcm_4_steps_shape_confusion']}")
    varied = caption_checker.evaluation_scenes(seed, prompts, varied=True)  # the same scenes, varied phrasings
    scores["lcm_4_steps_no_cfg_varied_phrasings"], _ = score_model(lcm, t5, vae, varied, sampler="lcm", steps=4,
                                                                   guidance=0.0, seed=seed)
    log(f"LCM 4 steps, no CFG, varied phrasings: {scores['lcm_4_steps_no_cfg_varied_phrasings']}")
    for steps in (2, 1):
        scores[f"lcm_{steps}_steps_no_cfg"], _ = score_model(lcm, t5, vae, scenes, sampler="lcm", steps=steps,
                                                             guidance=0.0, seed=seed)
        log(f"LCM {steps} steps, no CFG: {scores[f'lcm_{steps}_steps_no_cfg']}")
    t = time.time()
    scores["teacher_dpmpp_20_steps_cfg4.5"], teacher_images = score_model(
        base, t5, vae, scenes, sampler="dpmpp_2m", steps=20, guidance=4.5, seed=seed)
    log(f"teacher DPM-Solver++ 20 steps, CFG 4.5 ({time.time() - t:.1f}s): {scores['teacher_dpmpp_20_steps_cfg4.5']}")
    scores["teacher_shape_confusion"] = shape_confusion(teacher_images, scenes)
    log(f"teacher, asked shape -> seen shape: {scores['teacher_shape_confusion']}")
    scores["teacher_dpmpp_20_steps_cfg4.5_empty_uncond"], _ = score_model(
        base, t5, vae, scenes, sampler="dpmpp_2m", steps=20, guidance=4.5, seed=seed, unconditional="empty")
    log(f"teacher, empty-prompt uncond: {scores['teacher_dpmpp_20_steps_cfg4.5_empty_uncond']}")

    iou, cn_images = controlnet_iou(base, cn, t5, vae, edges_scenes, sampler="dpmpp_2m", steps=20, guidance=4.5,
                                    seed=seed)
    scores["controlnet_mask_iou_base_dpmpp20_cfg4.5"] = {"cases": len(edges_scenes), "mean_iou": iou}
    iou_lcm, _ = controlnet_iou(lcm, cn, t5, vae, edges_scenes, sampler="lcm", steps=4, guidance=0.0, seed=seed)
    scores["controlnet_mask_iou_lcm4"] = {"cases": len(edges_scenes), "mean_iou": iou_lcm}
    iou_none, plain = controlnet_iou(base, cn, t5, vae, edges_scenes, sampler="dpmpp_2m", steps=20, guidance=4.5,
                                     seed=seed, strength=0.0)
    plain_ref = score_model(base, t5, vae, edges_scenes, sampler="dpmpp_2m", steps=20, guidance=4.5, seed=seed)[1]
    scores["controlnet_strength_0"] = {"mean_iou": iou_none,
                                       "max_abs_diff_vs_base": float(np.abs(plain - plain_ref).max())}
    log(f"ControlNet IoU (base, 20 steps): {iou:.3f}; with LCM 4 steps: {iou_lcm:.3f}; strength 0: "
        f"{scores['controlnet_strength_0']}")

    scores["ci_guard"] = guard_scores(lcm, cn, t5, vae)
    log(f"CI guard set: {scores['ci_guard']}")

    edges_img, _ = data.batch(edges_scenes[:8], edges=True)
    grid = np.concatenate([lcm_images[:16], teacher_images[:8],
                           (edges_img.permute(0, 2, 3, 1).numpy() + 1) / 2, cn_images[:8]])
    save_grid(grid, out / "nano_grid.png")
    (out / "nano_grid_captions.txt").write_text(
        "rows 1-2: LCM 4 steps; row 3: teacher 20 steps; row 4: edge maps; row 5: ControlNet outputs\n"
        + "\n".join(s.caption for s in scenes[:24]) + "\n" + "\n".join(s.caption for s in edges_scenes[:8]) + "\n")
    return scores


def shape_confusion(images: np.ndarray, scenes: list) -> dict:
    """Per asked shape, how often the checker sees each shape (all objects of the prompts)."""
    conf = shape_report.confusion(images, scenes)["all"]
    return {asked: dict(seen) for asked, seen in conf.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(NANO_DIR), help="default: models/nano of this project, where the loaders look")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every training step count")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pool", type=int, default=20000, help="training scenes (latents computed once)")
    ap.add_argument("--prompts", type=int, default=120, help="prompts scored by the caption checker")
    ap.add_argument("--control-cases", type=int, default=50)
    ap.add_argument("--eval-only", action="store_true", help="score an existing build")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = Logger(out / "build_log.txt")
    log(f"build_nano {vars(args)}")
    start = time.time()
    if args.eval_only:  # keep what the build recorded: its training time and what it measured while training
        recorded = json.loads((out / "scores.json").read_text()) if (out / "scores.json").is_file() else {}
        facts = {k: recorded[k] for k in ("text_pretraining", "text_encoder_probe", "train_note", "stage_seconds")
                 if k in recorded}
        train_seconds = recorded.get("train_seconds")
    else:
        facts = train_all(out, args.scale, args.seed, log, args.pool)
        train_seconds = time.time() - start
    eval_start = time.time()
    scores = evaluate(out, log, args.prompts, args.control_cases)
    scores.update(facts)
    scores["train_seconds"] = train_seconds
    scores["total_seconds"] = (train_seconds or 0) + time.time() - eval_start
    shipped = [out / LCM_DIR, out / BASE_FILE, out / CONTROLNET_FILE]
    scores["shipped_bytes"] = sum(folder_size(p) for p in shipped)
    (out / "scores.json").write_text(json.dumps(scores, indent=2))
    log(f"shipped files: {scores['shipped_bytes'] / 1e6:.2f} MB; total time {scores['total_seconds'] / 60:.1f} min")
    print(json.dumps(scores, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
