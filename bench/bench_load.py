"""Benchmark: loading a full-size transformer checkpoint to bf16, ours vs diffusers' from_pretrained, same file.

Full run (default): random XL-2 weights saved once as a diffusers `transformer/` folder in fp32 (config.json + one
2.4 GB safetensors file, as the official PixArt-XL-2-1024-MS repository ships it), then loaded to bf16 by
  ours:      pixart_core.loading.checkpoint.load_transformer(folder, dtype=torch.bfloat16)
  reference: diffusers PixArtTransformer2DModel.from_pretrained(folder, torch_dtype=torch.bfloat16)
each in a fresh subprocess, alternating, twice (the file is in the page cache after the first read; the minimum time
is reported). Peak memory is the child's peak RSS minus its RSS before the load (imports done), next to the size of
the bf16 weights. Also printed: ours from the same weights in the original layout (.safetensors).

    python bench/bench_load.py                       # writes ~3.6 GB to a temporary folder, a few minutes
    python bench/bench_load.py --checkpoint DIR      # an existing diffusers transformer folder or any file we load
    python bench/bench_load.py --threads 1           # one torch thread per load: CPU seconds repeat on a busy CPU
    python bench/bench_load.py --quick               # tiny model (smoke test)

Times are wall clock and the process's CPU seconds (user + system: reading the page cache counts as system time);
on a shared CPU the wall time mostly measures the other processes, the CPU time with --threads 1 does not.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (FULL, TINY, child_result, current_rss_mb, machine_line, peak_rss_mb, print_table,  # noqa: E402
                    reset_peak_rss, run_child, temp_dir, write_checkpoint)

SCRIPT = Path(__file__).resolve()


def child(which: str, path: str, threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
    # Each child imports its library before the baseline (our loader imports nothing more while loading).
    if which == "ours":
        from pixart_core.loading.checkpoint import load_transformer as load

        kwargs = dict(dtype=torch.bfloat16)
    else:
        from diffusers import PixArtTransformer2DModel

        load, kwargs = PixArtTransformer2DModel.from_pretrained, dict(torch_dtype=torch.bfloat16)
    before = current_rss_mb()
    reset_peak_rss()
    start, cpu_start = time.perf_counter(), time.process_time()
    model = load(path, **kwargs)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    child_result(seconds=seconds, cpu_s=cpu, peak_mb=peak_rss_mb() - before, weights_mb=weights)


def write_original_layout(folder: Path, out: Path) -> Path:
    """The same weights in the original PixArt key layout (single .safetensors), via our own reader."""
    from safetensors.torch import save_file

    from pixart_core.loading.checkpoint import read_state_dict

    sd = read_state_dict(folder)
    save_file({k: v.contiguous() for k, v in sd.items()}, out)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--checkpoint", type=Path, default=None, help="an existing diffusers transformer folder")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads in each load (default: torch's)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("which", nargs="?", help=argparse.SUPPRESS)
    ap.add_argument("path", nargs="?", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.which, args.path, args.threads)
        return
    print(machine_line(), flush=True)
    with temp_dir("pixart_bench_load_") as tmp:
        folder = args.checkpoint
        if folder is None:
            start = time.perf_counter()
            folder = write_checkpoint(TINY if args.quick else FULL, Path(tmp), torch.float32)
            print(f"wrote {folder} in {time.perf_counter() - start:.0f} s", flush=True)
        runs = [("ours, diffusers folder", "ours", folder), ("diffusers from_pretrained", "diffusers", folder)]
        if args.checkpoint is None and not args.quick:
            original = write_original_layout(folder, Path(tmp) / "original.safetensors")
            runs.append(("ours, original .safetensors", "ours", original))
        best: dict[str, dict] = {}
        for _ in range(1 if args.quick else args.repeats):
            for label, which, path in runs:
                r = run_child(SCRIPT, [which, str(path)] + (["--threads", str(args.threads)] if args.threads else []))
                old = best.get(label)
                best[label] = r if old is None else {**r, **{k: min(r[k], old[k]) for k in ("seconds", "cpu_s",
                                                                                           "peak_mb")}}
                print(f"  {label}: {r['seconds']:.2f} s, {r['cpu_s']:.2f} CPU s, +{r['peak_mb']:.0f} MB", flush=True)
    ref = best["diffusers from_pretrained"]
    rows = [[label, r["seconds"], r["seconds"] / ref["seconds"], r["cpu_s"], r["cpu_s"] / ref["cpu_s"], r["peak_mb"],
             r["peak_mb"] / r["weights_mb"]] for label, r in best.items()]
    print(f"\nLoad to bf16 ({ref['weights_mb']:.0f} MB of bf16 weights), fresh process each, best of "
          f"{1 if args.quick else args.repeats}, {args.threads or 'default'} torch thread(s):")
    print_table(["loader", "wall s", "wall vs diffusers", "CPU s", "CPU vs diffusers", "peak MB over baseline",
                 "peak / weights"], rows)


if __name__ == "__main__":
    main()
