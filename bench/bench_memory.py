"""Benchmark: memory of the transformer in fp32 / bf16 / int8 / fp8, and what 8-bit weights do to one step's output.

Full run (default): random XL-2 weights (28 blocks, width 1152) saved once as a diffusers `transformer/` folder in bf16;
each configuration runs in a fresh subprocess: load (+ quantize_transformer for int8 / fp8), then one denoising step at
512x512 with a CFG batch of 2. Printed per configuration: the weights' memory (parameters + buffers + int8 scales), the
RSS after loading and the peak RSS over load + step (both over the process's RSS before loading; diffusers memory-maps
a bf16 file, so its weights are paged in during the step, not the load), the step time, and the step's output
compared with our bf16 output (relative L2 difference and cosine similarity; same weights, same inputs). diffusers
(from_pretrained, fp32 and bf16) is measured the same way as the reference.
Target (issue 7): int8 weights <= 55% of the bf16 weights' memory.

    python bench/bench_memory.py                    # ~1.2 GB temporary file, a few minutes
    python bench/bench_memory.py --size 1024
    python bench/bench_memory.py --quick            # tiny model built in each child, seconds (smoke test)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (FULL, TINY, child_result, current_rss_mb, machine_line, our_transformer,  # noqa: E402
                    peak_rss_mb, print_table, reset_peak_rss, run_child, temp_dir, text_inputs, write_checkpoint)

SCRIPT = Path(__file__).resolve()
CONFIGS = [("ours", "fp32"), ("ours", "bf16"), ("ours", "int8"), ("ours", "fp8"),
           ("diffusers", "fp32"), ("diffusers", "bf16")]


def _load(impl: str, mode: str, path: str | None, quick: bool):
    dtype = torch.float32 if mode == "fp32" else torch.bfloat16
    if impl == "diffusers":
        from diffusers import PixArtTransformer2DModel

        return PixArtTransformer2DModel.from_pretrained(path, torch_dtype=dtype)
    from pixart_core.loading.checkpoint import load_transformer
    from pixart_core.quantize import quantize_transformer

    model = our_transformer(TINY, dtype) if quick else load_transformer(path, dtype=dtype)
    return quantize_transformer(model, mode if mode in ("int8", "fp8") else "none")


def child(impl: str, mode: str, path: str, size: int, out_file: str, quick: bool) -> None:
    if impl == "diffusers":
        import diffusers  # noqa: F401  (imported before the baseline, like ours below)
    else:
        import pixart_core.loading.checkpoint  # noqa: F401
        import pixart_core.quantize  # noqa: F401
        if mode == "int8":
            import bitsandbytes  # noqa: F401
    before = current_rss_mb()
    reset_peak_rss()
    start = time.perf_counter()
    model = _load(impl, mode, None if quick else path, quick)
    load_s = time.perf_counter() - start
    after_load = current_rss_mb() - before
    if impl == "ours":
        from pixart_core.quantize import weight_bytes

        weights = weight_bytes(model)
    else:
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
    dtype = torch.float32 if mode == "fp32" else torch.bfloat16
    caption = TINY["caption_channels"] if quick else FULL["caption_channels"]
    y, mask = text_inputs(2, caption)
    lat = size // 8
    x = torch.randn(1, 4, lat, lat, generator=torch.Generator().manual_seed(2)).repeat(2, 1, 1, 1).to(dtype)
    t = torch.tensor([500.0, 500.0])
    res, ar = torch.tensor([[float(size)] * 2] * 2), torch.tensor([[1.0]] * 2)
    start = time.perf_counter()
    with torch.no_grad():
        if impl == "ours":
            out = model(x, t, model.prepare_text(y.to(dtype), mask), resolution=res, aspect_ratio=ar)
        else:
            added = {"resolution": res.to(dtype), "aspect_ratio": ar.to(dtype)}
            out = model(x, encoder_hidden_states=y.to(dtype), timestep=t, added_cond_kwargs=added,
                        encoder_attention_mask=mask, return_dict=False)[0]
    step_s = time.perf_counter() - start
    torch.save(out.float(), out_file)
    child_result(weights_mb=weights / 2**20, load_s=load_s, after_load_mb=after_load,
                 peak_mb=peak_rss_mb() - before, step_s=step_s)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--checkpoint", type=Path, default=None, help="an existing diffusers transformer folder")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("child_args", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        impl, mode, path, size, out_file = args.child_args
        child(impl, mode, path, int(size), out_file, args.quick)
        return
    print(machine_line(), flush=True)
    size = 64 if args.quick else args.size
    configs = [c for c in CONFIGS if c[0] == "ours"] if args.quick else CONFIGS
    results = {}
    with temp_dir("pixart_bench_memory_") as tmp:
        folder = args.checkpoint
        if folder is None and not args.quick:
            folder = write_checkpoint(FULL, Path(tmp), torch.bfloat16)
        for impl, mode in configs:
            out_file = Path(tmp) / f"{impl}_{mode}.pt"
            extra = ["--quick"] if args.quick else []
            r = run_child(SCRIPT, [*extra, impl, mode, str(folder), str(size), str(out_file)])
            r["out"] = torch.load(out_file, weights_only=True)
            results[(impl, mode)] = r
            print(f"  {impl} {mode}: {r['weights_mb']:.0f} MB weights, step {r['step_s']:.1f} s", flush=True)
    base = results[("ours", "bf16")]
    rows = []
    for (impl, mode), r in results.items():
        diff = ((r["out"] - base["out"]).norm() / base["out"].norm()).item()
        cos = F.cosine_similarity(r["out"].flatten(), base["out"].flatten(), dim=0).item()
        rows.append([impl, mode, r["weights_mb"], r["weights_mb"] / base["weights_mb"], r["after_load_mb"],
                     r["peak_mb"], r["step_s"], diff, cos])
    print(f"\nTransformer memory, {'tiny' if args.quick else 'XL-2 (28 x 1152)'}; one step at {size}x{size}, "
          "CFG batch 2; output compared with ours bf16:")
    print_table(["impl", "weights", "weights MB", "vs bf16", "RSS after load MB", "peak RSS load+step MB",
                 "step s", "output rel. diff", "cosine"], rows)


if __name__ == "__main__":
    main()
