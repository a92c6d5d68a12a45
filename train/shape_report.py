"""Why PixArt-nano draws shapes poorly: measurements on a build (`python -m train.shape_report`, issue #18 item 3).

Prints, for the build in --dir (default models/nano):
- per-shape confusion (asked shape -> shape the caption checker sees, "none" when the colour's region is missing or
  too small) for the LCM student and the teacher at several step counts / guidance scales, split by object size;
- object size in pixels and in latent cells (VAE factor 8), and the fraction of latent cells the objects cover
  (how much of the per-cell diffusion MSE is about objects at all);
- the checker on VAE reconstructions per size, from the posterior mean and from posterior samples (what the
  transformer is trained on);
- how much of a latent tells the shapes apart: |z(square) - z(circle)|² against |z(circle) - z(nothing)|² for the
  same colour, place and size, and the same ratio in pixels.
Only inference on the shipped files; a few minutes on one core.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from pixart_core.loading.bundled import BASE_FILE, LCM_DIR, NANO_DIR
from . import caption_checker, data
from .data import SHAPES, SceneObject
from .evaluate import decode, encode, generate

LATENT_FACTOR = 8


def size_class(o: SceneObject) -> str:
    return "small" if o.size < (data.SIZES["small"] + data.SIZES["big"]) / 2 else "big"


def confusion(images: np.ndarray, scenes: list[data.Scene]) -> dict:
    """{size: {asked: Counter(drawn)}} over every object of every prompt (the checker's own shape decision)."""
    out: dict = {"all": {s: Counter() for s in SHAPES}, "small": {s: Counter() for s in SHAPES},
                 "big": {s: Counter() for s in SHAPES}}
    for img, sc in zip(images, scenes):
        res = caption_checker.check(img, sc.caption)
        for want, got in zip(caption_checker.parse_caption(sc.caption).objects, res.found):
            # the scene's object of that colour carries the size it was drawn at in the ground truth
            truth = next(o for o in sc.objects if o.colour == want.colour)
            drawn = got.shape if got.area >= caption_checker.MIN_AREA else "none"
            for key in ("all", size_class(truth)):
                out[key][want.shape][drawn] += 1
    return out


def accuracy(conf: dict) -> float:
    right = sum(c[s] for s, c in conf.items())
    total = sum(sum(c.values()) for c in conf.values())
    return right / max(1, total)


def format_confusion(name: str, conf: dict) -> str:
    lines = [f"{name}: per-object shape accuracy all {accuracy(conf['all']):.2f}, small "
             f"{accuracy(conf['small']):.2f}, big {accuracy(conf['big']):.2f}",
             "  asked \\ drawn   " + "  ".join(f"{s:>8}" for s in (*SHAPES, "none"))]
    for s in SHAPES:
        row = conf["all"][s]
        lines.append(f"  {s:<15} " + "  ".join(f"{row[d]:>8}" for d in (*SHAPES, "none")))
    return "\n".join(lines)


def object_geometry(scenes: list[data.Scene]) -> dict:
    """Object sizes in pixels and latent cells; fraction of the 8x8 latent cells an object touches / mostly covers."""
    sizes = {"small": [], "big": []}
    touched, covered = [], []
    for sc in scenes:
        cov = np.zeros((data.IMAGE_SIZE, data.IMAGE_SIZE), np.float32)
        for o in sc.objects:
            sizes[size_class(o)].append(o.size)
            cov = np.maximum(cov, data.object_mask(o))
        cells = cov.reshape(8, LATENT_FACTOR, 8, LATENT_FACTOR).mean(axis=(1, 3))
        touched.append(float((cells > 0).mean()))
        covered.append(float((cells > 0.5).mean()))
    return {
        "bbox_px": {k: [float(np.min(v)), float(np.max(v))] for k, v in sizes.items() if v},
        "bbox_latent_cells": {k: [float(np.min(v)) / LATENT_FACTOR, float(np.max(v)) / LATENT_FACTOR]
                              for k, v in sizes.items() if v},
        "fraction_of_latent_cells_touched_by_objects": float(np.mean(touched)),
        "fraction_of_latent_cells_mostly_object": float(np.mean(covered)),
    }


def shape_signal(vae, seed: int = 5, count: int = 60) -> dict:
    """For random single objects: squared latent distance square vs circle (and triangle vs circle), relative to
    circle vs empty background, with the same colour, centre and size; plus the posterior variance for scale."""
    rng = np.random.default_rng(seed)
    out = {}
    for size_word, size in data.SIZES.items():
        objs = []
        for _ in range(count):
            half = size / 2 + 2
            cx, cy = (float(v) for v in rng.uniform(half, data.IMAGE_SIZE - half, 2))
            objs.append((str(rng.choice(list(data.COLOURS))), cx, cy))
        latents, pixels = {}, {}
        for shape in SHAPES:
            scenes = [data.Scene([SceneObject(shape, c, cx, cy, size)]) for c, cx, cy in objs]
            pixels[shape] = data.batch(scenes)[0]
            latents[shape] = encode(vae, pixels[shape])
        background = data.batch([data.Scene([])])[0]
        empty = encode(vae, background)
        pixel_energy = (pixels["circle"] - background).pow(2).sum(dim=(1, 2, 3))
        dist = vae.model.encode(pixels["circle"]).latent_dist
        obj_energy = (latents["circle"] - empty).pow(2).sum(dim=(1, 2, 3))
        out[size_word] = {
            "square_vs_circle": float(((latents["square"] - latents["circle"]).pow(2).sum(dim=(1, 2, 3))
                                       / obj_energy).mean()),
            "triangle_vs_circle": float(((latents["triangle"] - latents["circle"]).pow(2).sum(dim=(1, 2, 3))
                                         / obj_energy).mean()),
            "pixels_square_vs_circle": float(((pixels["square"] - pixels["circle"]).pow(2).sum(dim=(1, 2, 3))
                                              / pixel_energy).mean()),
            "pixels_triangle_vs_circle": float(((pixels["triangle"] - pixels["circle"]).pow(2).sum(dim=(1, 2, 3))
                                                / pixel_energy).mean()),
            "posterior_var_vs_object": float(((dist.std * vae.scaling_factor).pow(2).sum(dim=(1, 2, 3))
                                              / obj_energy).mean()),
        }
    return out


def vae_ceiling(vae, scenes: list[data.Scene], seed: int = 3) -> dict:
    images, captions = data.batch(scenes)
    dist = vae.model.encode(images).latent_dist
    g = torch.Generator().manual_seed(seed)
    sampled = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g)
    out = {}
    for name, z in (("posterior_mean", dist.mean), ("posterior_sample", sampled)):
        rec = decode(vae, z * vae.scaling_factor).permute(0, 2, 3, 1).numpy()
        conf = confusion(rec, scenes)
        out[name] = {"checker": caption_checker.score(rec, captions),
                     "object_shape_accuracy": {k: accuracy(conf[k]) for k in ("all", "small", "big")}}
    gt = np.stack([data.render(s) for s in scenes])
    conf = confusion(gt, scenes)
    out["ground_truth_object_shape_accuracy"] = {k: accuracy(conf[k]) for k in ("all", "small", "big")}
    return out


RUNS = {  # name: (model, sampler, steps, guidance)
    "lcm_4_steps_no_cfg": ("lcm", "lcm", 4, 0.0),
    "teacher_dpmpp_20_cfg4.5": ("base", "dpmpp_2m", 20, 4.5),
    "teacher_dpmpp_50_cfg4.5": ("base", "dpmpp_2m", 50, 4.5),
    "teacher_dpmpp_20_no_cfg": ("base", "dpmpp_2m", 20, 0.0),
    "teacher_dpmpp_50_cfg7": ("base", "dpmpp_2m", 50, 7.0),
}


def main(argv=None) -> int:
    from pixart_core.loading.checkpoint import load_transformer
    from pixart_core.loading.t5_loading import load_t5
    from pixart_core.loading.vae_files import load_vae

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default=str(NANO_DIR))
    ap.add_argument("--prompts", type=int, default=120)
    ap.add_argument("--seed", type=int, default=777, help="the build's evaluation seed (build_nano.evaluate)")
    ap.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of " + ", ".join(RUNS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = Path(args.dir)
    models = {"lcm": load_transformer(root / LCM_DIR, dtype=torch.float32),
              "base": load_transformer(root / BASE_FILE, dtype=torch.float32)}
    t5 = load_t5(root / LCM_DIR, precision="fp32")
    vae = load_vae(str(root / LCM_DIR / "vae"), latent_scale=models["lcm"].config.latent_scale)
    scenes = caption_checker.evaluation_scenes(args.seed, args.prompts)
    report: dict = {"geometry": object_geometry(scenes)}
    print("geometry:", json.dumps(report["geometry"]))
    with torch.no_grad():
        report["shape_signal_in_latent"] = shape_signal(vae)
        print("shape signal in the latent:", json.dumps(report["shape_signal_in_latent"]))
        report["vae"] = vae_ceiling(vae, scenes)
    print("VAE:", json.dumps(report["vae"]))
    for name in args.runs.split(","):
        model, sampler, steps, guidance = RUNS[name]
        images = generate(models[model], t5, vae, [s.caption for s in scenes], sampler=sampler, steps=steps,
                          guidance=guidance, seed=args.seed)
        conf = confusion(images, scenes)
        report[name] = {"checker": caption_checker.score(images, [s.caption for s in scenes]),
                        "confusion": {k: {s: dict(c) for s, c in v.items()} for k, v in conf.items()},
                        "object_shape_accuracy": {k: accuracy(conf[k]) for k in ("all", "small", "big")}}
        print(format_confusion(name, conf), "| prompt-level shape", round(report[name]["checker"]["shape"], 3),
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
