"""Benchmark: seam-free tiled VAE decode (exact and fast) against diffusers' enable_tiling.

Full mode: the full-size SD VAE (random weights, same seed everywhere) decodes smooth random latents at one output
size per run, in bf16 by default (this CPU has AMX-BF16; fp32 at 4096 takes over 20 minutes per method). Every
configuration runs in its own subprocess so its peak resident memory (ru_maxrss, which includes Python, torch and the
model) is its own; time is the decode call alone. The baseline is diffusers' enable_tiling on the same weights with
the model and latent in channels-last memory format (2.5x faster on this CPU than its default layout, so the stronger
baseline; `--methods diffusers` runs the default layout). Outputs are compared with our exact decode where it runs
(it equals the untiled decode up to float rounding; the untiled decode itself does not fit at these sizes).

    python bench/bench_vae.py --size 2048   # exact, fast, diffusers: under 10 minutes on this 2-core CPU
    python bench/bench_vae.py --size 4096   # fast, diffusers (exact would need ~32 GB)
    python bench/bench_vae.py --quick       # tiny VAE at 128x128, in-process, a few seconds (smoke test)

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


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
SIZE_METHODS = {2048: ("exact", "fast", "diffusers_cl"), 4096: ("fast", "diffusers_cl")}


def build_vae(tiny: bool, dtype: torch.dtype = torch.float32) -> PixArtVAE:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    config = TINY if tiny else {k: v for k, v in SD_VAE_CONFIG.items() if k != "force_upcast"}
    return PixArtVAE(AutoencoderKL(**config), "sd", 0.18215).to(dtype=dtype)


def smooth_latents(h: int, w: int, seed: int = 1) -> torch.Tensor:
    """Scaled latents with structure at several scales (random weights give meaningless images either way; smooth
    latents with a global gradient make tiles differ in their statistics, as real images do)."""
    g = torch.Generator().manual_seed(seed)
    low = F.interpolate(torch.randn(1, 4, h // 16 + 2, w // 16 + 2, generator=g), size=(h, w), mode="bicubic",
                        align_corners=True)
    yy, xx = torch.linspace(-1, 1, h)[:, None], torch.linspace(-1, 1, w)[None]
    return low + 1.5 * yy * xx + 0.3 * torch.randn(1, 4, h, w, generator=g)


def vm_status(field: str) -> int:
    """A /proc/self/status memory field (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def decode(vae: PixArtVAE, z: torch.Tensor, method: str, budget: int | None,
           diffusers_tile: int = DIFFUSERS_TILE) -> tuple[torch.Tensor, str]:
    if method in ("diffusers", "diffusers_cl"):
        model = vae.model
        if method == "diffusers_cl":
            model.to(memory_format=torch.channels_last)
            z = z.contiguous(memory_format=torch.channels_last)
        model.enable_tiling()
        model.tile_sample_min_size = diffusers_tile
        model.tile_latent_min_size = diffusers_tile // 8
        with torch.inference_mode():
            out = model.decode((z / vae.scaling_factor).to(model.dtype)).sample
        model.disable_tiling()
        layout = ", channels-last" if method == "diffusers_cl" else ""
        return out, f"tile {diffusers_tile}px overlap 0.25{layout}"
    mode = method
    from pixart_core.vae_tiling import decoder_steps

    plan = vae.plan(decoder_steps(vae.model), tuple(z.shape), tuple(z.shape[2:]), mode, None, budget)
    out = vae.decode(z, mode=mode, memory_budget=budget, output="signed")
    detail = f"{plan.mode}, work {plan.work_bytes >> 20} MiB" + (f", tile {plan.tile * 8}px" if plan.tile else "")
    return out, detail


def child(spec: dict) -> None:
    torch.set_num_threads(spec.get("threads", 2))
    vae = build_vae(spec.get("tiny", False), DTYPES[spec.get("dtype", "fp32")])
    lat = spec["size"] // 8
    z = smooth_latents(lat, lat)
    before = vm_status("VmRSS")
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    out, detail = decode(vae, z, spec["method"], spec.get("budget"))
    seconds = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime - usage0.ru_utime - usage0.ru_stime
    peak = max(usage.ru_maxrss * 1024, vm_status("VmHWM"))
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
    methods = args.methods or SIZE_METHODS[args.size]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            save = os.path.join(tmp, f"{method}.npy")
            spec = dict(size=args.size, method=method, budget=fast_budget if method == "fast" else None, save=save,
                        threads=args.threads, dtype=args.dtype)
            rows.append(run_child(spec))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "save"}), flush=True)
        ref_path = os.path.join(tmp, "exact.npy")
        for r in rows:
            if "error" in r or r["method"] == "exact" or not os.path.exists(ref_path):
                continue
            diff = np.abs(np.load(r["save"]) - np.load(ref_path))
            r["max_diff"], r["mean_diff"] = f"{diff.max():.3f}", f"{diff.mean():.4f}"
    print(f"{args.dtype}, {args.threads} thread(s)")
    print(table(rows))
    by = {r["method"]: r for r in rows if "error" not in r}
    for baseline in ("diffusers_cl", "diffusers"):
        if "fast" in by and baseline in by:
            fast, theirs = by["fast"], by[baseline]
            print(f"fast / {baseline} at {args.size}: wall {fast['seconds'] / theirs['seconds']:.2f}, "
                  f"CPU {fast['cpu_seconds'] / theirs['cpu_seconds']:.2f}")


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
    parser.add_argument("--size", type=int, choices=sorted(SIZE_METHODS), default=2048, help="output size (px)")
    parser.add_argument("--methods", nargs="*", choices=("exact", "fast", "diffusers", "diffusers_cl"),
                        help="default: exact, fast, diffusers_cl at 2048; fast, diffusers_cl at 4096")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
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
