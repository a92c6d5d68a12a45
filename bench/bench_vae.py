"""Benchmark: seam-free tiled VAE decode (exact and fast) against diffusers' enable_tiling.

Full mode: the full-size SD VAE (random weights, same seed everywhere) decodes smooth random latents at 2048x2048 and
4096x4096 on this machine. Every configuration runs in its own subprocess so its peak resident memory (ru_maxrss, which
includes Python, torch and the model) is its own; time is the decode call alone. The outputs are compared with our exact
decode (which equals the untiled decode up to float rounding; the untiled decode itself does not fit at these sizes).

    python bench/bench_vae.py            # full: several minutes per configuration on a 2-core CPU
    python bench/bench_vae.py --quick    # tiny VAE at 128x128, in-process, a few seconds (smoke test)

Targets (issue 6): fast at 4096 within 3 GB peak; exact at 2048 within 10 GB; fast time <= 1.5x diffusers tiling.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pixart_core.vae import SD_VAE_CONFIG, PixArtVAE  # noqa: E402

TINY = dict(block_out_channels=[32, 32, 64, 64], down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, latent_channels=4, norm_num_groups=8)
DIFFUSERS_TILE = 512  # pixels; diffusers' default overlap 0.25


def build_vae(tiny: bool) -> PixArtVAE:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    config = TINY if tiny else {k: v for k, v in SD_VAE_CONFIG.items() if k != "force_upcast"}
    return PixArtVAE(AutoencoderKL(**config), "sd", 0.18215)


def smooth_latents(h: int, w: int, seed: int = 1) -> torch.Tensor:
    """Scaled latents with structure at several scales (random weights give meaningless images either way; smooth
    latents with a global gradient make tiles differ in their statistics, as real images do)."""
    g = torch.Generator().manual_seed(seed)
    low = F.interpolate(torch.randn(1, 4, h // 16 + 2, w // 16 + 2, generator=g), size=(h, w), mode="bicubic",
                        align_corners=True)
    yy, xx = torch.linspace(-1, 1, h)[:, None], torch.linspace(-1, 1, w)[None]
    return low + 1.5 * yy * xx + 0.3 * torch.randn(1, 4, h, w, generator=g)


def vm_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def decode(vae: PixArtVAE, z: torch.Tensor, method: str, budget: int | None,
           diffusers_tile: int = DIFFUSERS_TILE) -> tuple[torch.Tensor, str]:
    if method == "diffusers":
        model = vae.model
        model.enable_tiling()
        model.tile_sample_min_size = diffusers_tile
        model.tile_latent_min_size = diffusers_tile // 8
        with torch.inference_mode():
            out = model.decode(z / vae.scaling_factor).sample
        model.disable_tiling()
        return out, f"tile {diffusers_tile}px overlap 0.25"
    mode = method
    from pixart_core.vae_tiling import decoder_steps

    plan = vae.plan(decoder_steps(vae.model), tuple(z.shape), tuple(z.shape[2:]), mode, None, budget)
    out = vae.decode(z, mode=mode, memory_budget=budget, output="signed")
    detail = f"{plan.mode}, work {plan.work_bytes >> 20} MiB" + (f", tile {plan.tile * 8}px" if plan.tile else "")
    return out, detail


def child(spec: dict) -> None:
    torch.set_num_threads(spec.get("threads", 2))
    vae = build_vae(spec.get("tiny", False))
    lat = spec["size"] // 8
    z = smooth_latents(lat, lat)
    before = vm_rss()
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    out, detail = decode(vae, z, spec["method"], spec.get("budget"))
    seconds = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime - usage0.ru_utime - usage0.ru_stime
    peak = usage.ru_maxrss * 1024
    if spec.get("save"):
        np.save(spec["save"], out[0].float().numpy())
    print(json.dumps(dict(spec, seconds=seconds, cpu_seconds=cpu, peak_bytes=peak, rss_before=before, detail=detail,
                          load_average=os.getloadavg()[0])))


def run_child(spec: dict) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
    print(f"... {spec['method']} at {spec['size']}", file=sys.stderr, flush=True)
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        return dict(spec, error=res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"rc {res.returncode}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    lines = ["| size | method | plan | wall (s) | CPU (s) | peak RSS (GB) | max abs diff vs exact "
             "| mean abs diff vs exact |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['size']} | {r['method']} | failed: {r['error']} | | | | | |")
            continue
        cpu = f"{r['cpu_seconds']:.0f}" if "cpu_seconds" in r else ""
        lines.append(f"| {r['size']} | {r['method']} | {r['detail']} | {r['seconds']:.1f} | {cpu} | "
                     f"{r['peak_bytes'] / 1e9:.2f} | {r.get('max_diff', '')} | {r.get('mean_diff', '')} |")
    return "\n".join(lines)


def full(args) -> None:
    fast_budget = int(args.fast_budget * 1e9)
    configs = [(2048, "exact", None), (2048, "fast", fast_budget), (2048, "diffusers", None),
               (4096, "fast", fast_budget), (4096, "diffusers", None)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size, method, budget in configs:
            if args.sizes and size not in args.sizes:
                continue
            save = os.path.join(tmp, f"{method}_{size}.npy")
            rows.append(run_child(dict(size=size, method=method, budget=budget, save=save, threads=args.threads)))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "save"}), flush=True)
        for r in rows:
            ref_path = os.path.join(tmp, f"exact_{r['size']}.npy")
            if "error" in r or r["method"] == "exact" or not os.path.exists(ref_path):
                continue
            diff = np.abs(np.load(r["save"]) - np.load(ref_path))
            r["max_diff"], r["mean_diff"] = f"{diff.max():.3f}", f"{diff.mean():.4f}"
    print(table(rows))
    by = {(r["size"], r["method"]): r for r in rows if "error" not in r}
    for size in (2048, 4096):
        if (size, "fast") in by and (size, "diffusers") in by:
            fast, theirs = by[(size, "fast")], by[(size, "diffusers")]
            line = f"fast / diffusers at {size}: wall {fast['seconds'] / theirs['seconds']:.2f}"
            if "cpu_seconds" in fast and "cpu_seconds" in theirs:
                line += f", CPU {fast['cpu_seconds'] / theirs['cpu_seconds']:.2f}"
            print(line)


def quick() -> None:
    """Tiny VAE at 128x128, in-process: every method runs and the tiled ones are compared with the untiled one.
    One thread: tiny convolutions gain nothing from two, and lose a lot on a busy machine."""
    torch.set_num_threads(1)
    vae = build_vae(tiny=True)
    z = smooth_latents(16, 16)
    results = {}
    for method in ("whole", "exact", "fast", "diffusers"):
        t0 = time.perf_counter()
        if method in ("exact", "fast"):
            out = vae.decode(z, mode=method, tile_size=64, output="signed")
        else:
            out, _ = decode(vae, z, method, None, diffusers_tile=64)
        results[method] = (out, time.perf_counter() - t0)
    ref = results["whole"][0]
    print("| method | time (s) | max abs diff vs whole | mean abs diff vs whole |\n|---|---|---|---|")
    for method, (out, seconds) in results.items():
        d = (out - ref).abs()
        print(f"| {method} | {seconds:.2f} | {d.max().item():.2e} | {d.mean().item():.2e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny VAE, in-process, seconds")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", type=int, nargs="*", help="only these output sizes (2048, 4096)")
    parser.add_argument("--fast-budget", type=float, default=2.2, help="memory_budget for fast mode, GB")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
    elif args.quick:
        quick()
    else:
        full(args)


if __name__ == "__main__":
    main()
