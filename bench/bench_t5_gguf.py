"""Resident memory and load time of T5-XXL read from a GGUF file, per GGUF type and precision.

For each type a real-shape T5 v1.1 XXL GGUF (llama.cpp names and metadata, 4.7B parameters) is written to a scratch
folder, loaded with `load_t5` in a fresh process (dequantised tensor by tensor into the precision), measured, and
deleted. Weights are random: F16/BF16 random normals; quantised types random codes with fixed fp16 block scales (the
gguf package has no K-quant quantiser; memory and time do not depend on the values). One random block of bytes per
tensor shape is reused for every layer, so writing costs disk time, not quantisation time.

    python bench/bench_t5_gguf.py                      # F16 Q8_0 Q6_K Q5_K Q4_K Q3_K into bf16 (~2.5 GB-9.5 GB each)
    python bench/bench_t5_gguf.py --types Q8_0 --precisions int8 nf4
    python bench/bench_t5_gguf.py --quick              # a small T5 in this process (smoke test)

"resident" is the process RSS growth over the load (the memory-mapped file is closed by then); "peak" the high-water
mark, which includes the file pages mapped while reading. "kept quantised" is what the weights would occupy if they
stayed in the file's format (the file's tensor bytes), and "dequantise all" the numpy time to dequantise every weight
once: the extra time per encode that dequantising layer by layer on the fly would cost.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_t5 import GIB, PROMPT, SIZES as T5_SIZES, memory_bytes  # noqa: E402

DEFAULT_TOKENIZER = REPO / "tests" / "data" / "t5-v1_1-xxl"
VOCAB = 32128
# T5-v1.1-XXL, and for --quick a small T5 whose rows still hold whole 256-value K-quant blocks
SIZES = {"xxl": T5_SIZES["xxl"], "quick": dict(d_model=256, d_ff=512, num_layers=1, num_heads=4, d_kv=64)}
# quantised types: where each block keeps its fp16 scale(s) (byte offsets), and a scale giving weights of ~0.01
SCALES = {"Q8_0": ((0,), 1.5e-4), "Q6_K": ((208,), 3e-6), "Q5_K": ((0, 2), 2e-5), "Q4_K": ((0, 2), 4e-5),
          "Q3_K": ((108,), 1e-4), "Q2_K": ((80, 82), 1e-3), "Q4_0": ((0,), 1.5e-3), "Q5_0": ((0,), 7e-4)}


def tensor_list(size: str) -> list[tuple[str, tuple[int, ...]]]:
    """(llama.cpp name, numpy shape) of every tensor of the encoder, in the converter's order."""
    s = SIZES[size]
    d, ff, inner, layers = s["d_model"], s["d_ff"], s["num_heads"] * s["d_kv"], s["num_layers"]
    out = [("token_embd.weight", (VOCAB, d))]
    for i in range(layers):
        b = f"enc.blk.{i}."
        out += [(b + "attn_q.weight", (inner, d)), (b + "attn_k.weight", (inner, d)), (b + "attn_v.weight", (inner, d)),
                (b + "attn_o.weight", (d, inner))]
        if i == 0:
            out.append((b + "attn_rel_b.weight", (32, s["num_heads"])))
        out += [(b + "attn_norm.weight", (d,)), (b + "ffn_gate.weight", (ff, d)), (b + "ffn_up.weight", (ff, d)),
                (b + "ffn_down.weight", (d, ff)), (b + "ffn_norm.weight", (d,))]
    return out + [("enc.output_norm.weight", (d,))]


def random_data(kind: str, shape: tuple[int, ...], rng: np.random.Generator):
    """(array to write, raw_dtype or None) for one tensor: norms F32 ones, the relative bias F32, the rest `kind`."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
    from gguf.quants import quant_shape_to_byte_shape

    if len(shape) == 1:
        return np.ones(shape, np.float32), None
    if shape[-1] % 256:  # attn_rel_b (rows of head-count length): llama.cpp's quantiser never quantises it
        return rng.normal(0, 0.1, shape).astype(np.float32), None
    if kind in ("F16", "BF16"):
        values = rng.normal(0, 0.01, shape).astype(np.float32)
        if kind == "F16":
            return values.astype(np.float16), None
        return (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(shape[0], -1), Q.BF16
    qtype = Q[kind]
    data = rng.integers(0, 256, quant_shape_to_byte_shape(shape, qtype), dtype=np.uint8)
    blocks = data.reshape(-1, GGML_QUANT_SIZES[qtype][1])
    offsets, scale = SCALES[kind]
    for offset in offsets:
        blocks[:, offset:offset + 2] = np.frombuffer(np.float16(scale).tobytes(), np.uint8)
    return data, qtype


def write_gguf(path: Path, size: str, kind: str) -> tuple[int, float]:
    """Write the file tensor by tensor (one array per distinct shape, reused); returns (tensor bytes, the numpy time to
    dequantise every tensor once)."""
    import gguf

    s = SIZES[size]
    rng = np.random.default_rng(0)
    tensors = tensor_list(size)
    cache = {shape: random_data(kind, shape, rng) for shape in {shape for _, shape in tensors}}
    dequant_s = {}
    for shape, (data, qtype) in cache.items():
        start = time.perf_counter()
        if qtype is not None:
            gguf.quants.dequantize(data, qtype)
        dequant_s[shape] = time.perf_counter() - start
    writer = gguf.GGUFWriter(str(path), "t5encoder")
    writer.add_context_length(512)
    writer.add_embedding_length(s["d_model"])
    writer.add_feed_forward_length(s["d_ff"])
    writer.add_block_count(s["num_layers"])
    writer.add_head_count(s["num_heads"])
    writer.add_key_length(s["d_kv"])
    writer.add_value_length(s["d_kv"])
    writer.add_relative_attn_buckets_count(32)
    writer.add_layer_norm_rms_eps(1e-6)
    for name, shape in tensors:
        data, qtype = cache[shape]
        writer.add_tensor_info(name, data.shape, data.dtype, data.nbytes, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, shape in tensors:
        writer.write_tensor_data(cache[shape][0])
    writer.close()
    return sum(cache[shape][0].nbytes for _, shape in tensors), sum(dequant_s[shape] for _, shape in tensors)


def measure(path: Path, precision: str, max_length: int, tokenizer_dir: Path) -> dict:
    """Load the file with the loader the node uses, in this (fresh) process."""
    from pixart_core.loading.t5_loading import load_t5

    import gguf  # noqa: F401  (imported before measuring, like bitsandbytes)
    if precision in ("int8", "nf4"):
        import bitsandbytes  # noqa: F401
    rss_before, _ = memory_bytes()
    start = time.perf_counter()
    encoder = load_t5(path, precision=precision, tokenizer_path=tokenizer_dir)
    load_s = time.perf_counter() - start
    rss_after, peak = memory_bytes()
    start = time.perf_counter()
    embeds, _ = encoder.encode([PROMPT], max_length)
    encode_s = time.perf_counter() - start
    assert torch.isfinite(embeds).all()
    return {"precision": precision, "resident_gib": (rss_after - rss_before) / GIB,
            "peak_gib": (peak - rss_before) / GIB, "load_s": load_s, "encode_s": encode_s,
            "threads": torch.get_num_threads()}


def print_table(rows: list[dict], size: str) -> None:
    print(f"T5 size {size}, loaded with load_t5, {rows[0]['threads']} CPU threads")
    print("| GGUF type | file (GiB) | precision | resident (GiB) | peak while loading (GiB) | load (s) | encode (s) | "
          "kept quantised (GiB) | dequantise all (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} | {r['file_gib']:.2f} | {r['precision']} | {r['resident_gib']:.2f} | "
              f"{r['peak_gib']:.2f} | {r['load_s']:.1f} | {r['encode_s']:.2f} | {r['tensor_gib']:.2f} | "
              f"{r['dequant_s']:.1f} |")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small T5, in this process (smoke test)")
    parser.add_argument("--types", nargs="+", default=["F16", "Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K"])
    parser.add_argument("--precisions", nargs="+", default=["bf16"])
    parser.add_argument("--max-length", type=int, default=120)
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder for the files (default: a temp dir)")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # one measurement of this file, JSON out
    args = parser.parse_args(argv)
    size = "quick" if args.quick else "xxl"
    if args.worker:
        print(json.dumps(measure(args.worker, args.precisions[0], args.max_length, args.tokenizer)))
        return []

    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        for kind in args.types:
            path = Path(scratch) / f"t5-{size}-encoder-{kind}.gguf"
            tensor_bytes, dequant_s = write_gguf(path, size, kind)
            file_gib = path.stat().st_size / GIB
            for precision in args.precisions:
                if args.quick:  # in-process: memory figures are rough, the point is that every path runs
                    row = measure(path, precision, args.max_length, args.tokenizer)
                else:  # a fresh process per load, so one load's freed memory does not hide the next one's growth
                    cmd = [sys.executable, __file__, "--worker", str(path), "--precisions", precision,
                           "--max-length", str(args.max_length), "--tokenizer", str(args.tokenizer)]
                    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
                    if done.returncode != 0:
                        sys.exit(f"{kind} / {precision} failed:\n{done.stderr[-3000:]}")
                    row = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append({**row, "kind": kind, "file_gib": file_gib, "tensor_gib": tensor_bytes / GIB,
                             "dequant_s": dequant_s})
                print(json.dumps(rows[-1]), flush=True)
            path.unlink()
    print_table(rows, size)
    return rows


if __name__ == "__main__":
    main()
