"""Benchmark: one denoising step of the PixArt transformer, ours vs diffusers' PixArtTransformer2DModel, same weights.

Full run (default): the full-size XL-2 transformer (28 blocks, width 1152, α-1024-MS micro-conditions) with random
weights, a CFG batch of 2 ([uncond with 1 valid token, cond with 20 of 120]), at 512 and 1024 px, in bf16 and fp32.
Ours includes building the text conditioning (done once per generation in real use); diffusers gets the same
embeddings and masks. Printed: seconds per step (minimum over repeats, models alternating), the ratio ours/diffusers,
and the achieved fraction of the bf16 matrix-multiply peak measured in the same run (a big square bf16 matmul).
On a CPU shared with other work, wall times swing by 2x between runs (OpenMP threads wait on each other when one is
descheduled); `--threads 1 --clock cpu` measures the CPU time each implementation needs, which is stable.
Targets (issue 2): ratio <= 1.0 at 512 px and <= 0.8 at 1024 px in bf16.

    python bench/bench_transformer_step.py                      # bf16 512 + 1024, fp32 512 (~10 min, 2 busy cores)
    python bench/bench_transformer_step.py --sizes 1024 --dtypes fp32 --all --repeats 1     # fp32 at 1024 px
    python bench/bench_transformer_step.py --threads 1 --clock cpu   # the same work measured in CPU seconds
    python bench/bench_transformer_step.py --attention          # SDPA vs query-chunked matmul+softmax, 1024 px shape
    python bench/bench_transformer_step.py --quick              # tiny model, seconds (smoke test)
    python bench/bench_transformer_step.py --int8 --threads 1 --clock cpu --repeats 3    # int8-dynamic vs bf16
    python bench/bench_transformer_step.py --int8 --threads 1 --clock cpu --sizes 1024 --layers 7   # a subset

--int8 (issue 21): our bf16 model and its int8-dynamic copy (pixart_core.quantize, same random weights), no diffusers.
The two alternate step by step (A/B/A/B after one untimed call each) and the median of each is reported, so both see
the same background load; also the weights' bytes ratio and one step's output difference to bf16. --layers N builds
the model with N of the 28 blocks (every block has the same shape, so the ratio is the full model's minus the
embedders' and final layer's small share).
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (DTYPES, FULL, TINY, best_time, machine_line, matmul_peak_gflops,  # noqa: E402
                    our_transformer, ours_from_reference, print_table, reference_transformer, text_inputs)


def step_flops(shape: dict, size_px: int, batch: int, text_tokens: int) -> float:
    """Multiply-add FLOPs of one transformer call: the block matmuls and both attentions (embedders are ~0.1%)."""
    d = shape["num_attention_heads"] * 72
    n = (size_px // 16) ** 2  # tokens after the VAE (8x) and 2x2 patches
    linear = 2 * batch * n * d * (3 * d + d + d + d + 8 * d)  # qkv, proj, cross q, cross proj, MLP (4x)
    attn = 4 * batch * n * n * d + 4 * batch * n * text_tokens * d
    return shape["num_layers"] * (linear + attn)


def run_steps(shape: dict, sizes: list[int], dtypes: list[str], repeats: int, all_configs: bool,
              clock=time.perf_counter, valid=(1, 20)) -> list[list]:
    reference = reference_transformer(shape)
    y, mask = text_inputs(2, shape["caption_channels"], valid=valid)
    rows = []
    for name in dtypes:  # fp32 first if asked: the bf16 copies are made from the same fp32 weights
        dtype = DTYPES[name]
        ref = reference.to(dtype)
        ours = ours_from_reference(ref, dtype)
        for size in sizes:
            if name == "fp32" and size > 512 and not all_configs:
                continue
            lat = size // 8
            g = torch.Generator().manual_seed(2)
            x = torch.randn(1, 4, lat, lat, generator=g).to(dtype).repeat(2, 1, 1, 1)
            t = torch.tensor([500.0, 500.0])
            res = torch.tensor([[float(size), float(size)]] * 2)
            ar = torch.tensor([[1.0]] * 2)
            yd = y.to(dtype)

            def run_ours():
                text = ours.prepare_text(yd, mask)
                return ours(x, t, text, resolution=res, aspect_ratio=ar)

            def run_ref():
                added = {"resolution": None, "aspect_ratio": None}
                if shape["use_additional_conditions"]:
                    added = {"resolution": res.to(dtype), "aspect_ratio": ar.to(dtype)}
                return ref(x, encoder_hidden_states=yd, timestep=t, added_cond_kwargs=added,
                           encoder_attention_mask=mask, return_dict=False)[0]

            with torch.no_grad():
                t_ours = t_ref = float("inf")
                for r in range(repeats):  # alternate, so both see the same background load
                    start = clock()
                    out_ours = run_ours()
                    t_ours = min(t_ours, clock() - start)
                    start = clock()
                    out_ref = run_ref()
                    t_ref = min(t_ref, clock() - start)
                    if r == 0:
                        diff = (out_ours.float() - out_ref.float()).abs().max().item()
                    del out_ours, out_ref
            flops = step_flops(shape, size, 2, max(valid))
            rows.append([f"{size} px", name, t_ours, t_ref, t_ours / t_ref, flops / t_ours / 1e9, diff])
            print(f"  {size} px {name}: ours {t_ours:.3f} s, diffusers {t_ref:.3f} s, ratio {t_ours / t_ref:.3f}",
                  flush=True)
        del ours
    return rows


def alternating_medians(fns: list, repeats: int, clock) -> list[float]:
    """Median time of each function, called in turn A/B/A/B... so that all see the same background load."""
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            start = clock()
            fn()
            ts.append(clock() - start)
    return [statistics.median(ts) for ts in times]


def run_int8(shape: dict, sizes: list[int], repeats: int, clock) -> list[list]:
    """Our bf16 transformer against its int8-dynamic copy: step time, weight bytes, output difference."""
    from pixart_core.quantize import quantize_transformer, weight_bytes

    bf16 = our_transformer(shape, torch.bfloat16)
    int8 = quantize_transformer(copy.deepcopy(bf16), "int8-dynamic")
    bytes_ratio = weight_bytes(int8) / weight_bytes(bf16)
    y, mask = text_inputs(2, shape["caption_channels"])
    rows = []
    for size in sizes:
        x = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(2))
        x = x.to(torch.bfloat16).repeat(2, 1, 1, 1)
        t, res, ar = torch.tensor([500.0] * 2), torch.tensor([[float(size)] * 2] * 2), torch.tensor([[1.0]] * 2)
        text = bf16.prepare_text(y.to(torch.bfloat16), mask)
        steps = [lambda m=m: m(x, t, text, resolution=res, aspect_ratio=ar) for m in (bf16, int8)]
        with torch.no_grad():
            ref, out = (step().float() for step in steps)  # untimed first calls (allocator, oneDNN primitives)
            t_bf16, t_int8 = alternating_medians(steps, repeats, clock)
        rel = ((out - ref).norm() / ref.norm()).item()
        cos = F.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item()
        rows.append([f"{size} px", shape["num_layers"], t_bf16, t_int8, t_int8 / t_bf16, bytes_ratio, rel, cos])
        print(f"  {size} px: bf16 {t_bf16:.2f} s, int8-dynamic {t_int8:.2f} s, ratio {t_int8 / t_bf16:.3f}",
              flush=True)
    return rows


def chunked_attention(q, k, v, chunk: int):
    """Query-chunked matmul + softmax attention, one head at a time so a (chunk x tokens) score tile stays in cache:
    the fastest alternative to SDPA we found with torch ops (batched 4-D matmuls over all heads were 3-5x slower)."""
    b, h, n, d = q.shape
    qs = (q * (1.0 / math.sqrt(d))).reshape(b * h, n, d)
    kt = k.transpose(-1, -2).reshape(b * h, d, k.shape[-2])  # contiguous K^T per head
    vs = v.reshape(b * h, v.shape[-2], d)
    out = torch.empty(b * h, n, d, dtype=q.dtype)
    for i in range(b * h):
        for s in range(0, n, chunk):
            scores = torch.mm(qs[i, s:s + chunk], kt[i])
            torch.mm(scores.softmax(-1), vs[i], out=out[i, s:s + chunk])
    return out.view(b, h, n, d)


def run_attention(tokens: int, repeats: int, clock=time.perf_counter) -> None:
    heads, hd, batch = 16, 72, 2
    flops = 4 * batch * heads * tokens * tokens * hd
    rows = []
    for name in ("bf16", "fp32"):
        dtype = DTYPES[name]
        qkv = torch.randn(batch, tokens, 3 * heads * hd).to(dtype)  # the layout the model produces (views of qkv)
        q, k, v = (p.view(batch, tokens, heads, hd).transpose(1, 2) for p in qkv.chunk(3, dim=-1))
        ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
        cands = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v)}
        for c in (256, 1024):
            cands[f"chunked q{c}"] = lambda c=c: chunked_attention(q, k, v, c)
        with torch.no_grad():
            for label, fn in cands.items():
                err = (fn().double() - ref).abs().max().item()
                t = best_time(fn, repeats, warmup=1, clock=clock)
                rows.append([name, label, t, flops / t / 1e9, err])
    print(f"\nSelf-attention, batch {batch}, {heads} heads, {tokens} tokens, head width {hd}:")
    print_table(["dtype", "kernel", "s", "GFLOP/s", "max err vs fp64"], rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model at 64/128 px (smoke test)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["bf16", "fp32"])
    ap.add_argument("--repeats", type=int, default=2, help="runs per model and configuration (minimum reported)")
    ap.add_argument("--all", action="store_true", help="also fp32 above 512 px (~15-20 min on 2 busy cores)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: process CPU time; with --threads 1 it is robust to other processes on a shared CPU")
    ap.add_argument("--attention", action="store_true", help="only the attention kernel comparison")
    ap.add_argument("--int8", action="store_true", help="our int8-dynamic against our bf16 (no diffusers)")
    ap.add_argument("--layers", type=int, default=None, help="--int8: blocks in the model (default: all 28)")
    args = ap.parse_args(argv)
    if args.threads or args.quick:
        torch.set_num_threads(args.threads or 1)  # tiny models: one thread is fastest
    if args.attention:
        print(machine_line())
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        run_attention(256 if args.quick else 4096, 1 if args.quick else args.repeats, clock)
        return
    shape, sizes = (TINY, [64, 128]) if args.quick else (FULL, args.sizes)
    print(machine_line())
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.int8:
        print_int8(dict(shape, num_layers=args.layers or shape["num_layers"]), sizes, args, clock)
        return
    peak = matmul_peak_gflops(n=1024 if args.quick else 4096, clock=clock)
    print(f"bf16 matmul peak (4096^2, best of 5, {args.clock} clock): {peak:.0f} GFLOP/s", flush=True)
    rows = run_steps(shape, sizes, args.dtypes, 3 if args.quick else args.repeats, args.all or args.quick, clock)
    for r in rows:
        r.insert(6, r[5] / peak)
    print(f"\nOne transformer step, {'tiny' if args.quick else 'XL-2 (28 x 1152)'}, CFG batch 2, "
          f"{'CPU' if args.clock == 'cpu' else 'wall'} seconds, {torch.get_num_threads()} thread(s):")
    print_table(["size", "dtype", "ours s", "diffusers s", "ours/diffusers", "ours GFLOP/s",
                 "of bf16 peak", "max |diff|"], rows)
    if args.quick:  # the smoke test covers the int8 comparison too
        print_int8(shape, sizes, args, clock)


def print_int8(shape: dict, sizes: list[int], args, clock) -> None:
    rows = run_int8(shape, sizes, 3 if args.quick else args.repeats, clock)
    print(f"\nOne transformer step, int8-dynamic vs bf16, {'tiny' if args.quick else 'XL-2 width 1152'}, CFG "
          f"batch 2, median {args.clock} seconds, {torch.get_num_threads()} thread(s):")
    print_table(["size", "blocks", "bf16 s", "int8-dynamic s", "time ratio", "weight bytes ratio",
                 "output rel. diff", "cosine"], rows)


if __name__ == "__main__":
    main()
