"""Memory and speed of the T5 text encoder per precision (bf16, int8, nf4) on this machine.

The encoder is built with random weights directly in the target dtype (quantised layer by layer for int8/nf4), through
the same builder the loader uses, so the resident memory is what a real checkpoint costs; the time is one prompt's
encode (tokenize + T5), the first call and the second.

    python bench/bench_t5.py            # T5-v1.1-XXL shape (4.7B parameters); each precision in its own process
    python bench/bench_t5.py --precisions int8 nf4 int8-wo-bf16 nf4-wo-bf16 --threads 1
    python bench/bench_t5.py --quick    # a small T5 in this process, for a smoke test (seconds)

Resident memory is the process RSS growth while building (Linux /proc/self/status); "peak" is the high-water mark.
The accuracy table is the encode's cosine similarity to fp32 (valid tokens of two prompts) on a small T5 (2 and 4
layers, random weights as transformers initialises them): a 4.7B fp32 reference does not fit this machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pixart_core.loading.t5_loading import QUANTISED, build_t5_encoder, load_tokenizer  # noqa: E402
from pixart_core.text_encoder import T5TextEncoder  # noqa: E402

DEFAULT_TOKENIZER = REPO.parent / "shared" / "data" / "t5-v1_1-xxl"
SIZES = {  # T5-v1.1-XXL, and a small one for --quick
    "xxl": dict(d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64),
    "quick": dict(d_model=128, d_ff=256, num_layers=2, num_heads=4, d_kv=32),
}
PROMPT = "A small cactus with a happy face in the Sahara desert, photorealistic, soft morning light"
GIB = 1024**3


def t5_config(size: str):
    from transformers import T5Config

    return T5Config(vocab_size=32128, is_gated_act=True, dense_act_fn="gelu_pytorch_tanh", **SIZES[size])


def random_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Plausible random weights, made directly in the dtype the builder stores them in."""
    t = torch.empty(shape, dtype=dtype)
    if "layer_norm" in name:
        return t.fill_(1.0)
    if name == "shared.weight":
        return t.normal_(0.0, 1.0)
    if "relative_attention_bias" in name:
        return t.normal_(0.0, 0.1)
    return t.normal_(0.0, shape[1] ** -0.5)


def memory_bytes() -> tuple[int, int]:
    """(current RSS, peak RSS) of this process, from /proc (Linux); (0, 0) elsewhere."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 0, 0


def measure(size: str, precision: str, max_length: int, tokenizer_dir: Path) -> dict:
    tokenizer = load_tokenizer(tokenizer_dir)
    if precision in QUANTISED:
        import bitsandbytes  # noqa: F401  (imported before measuring: its import alone is ~100 MB)
    torch.manual_seed(0)
    rss_before, _ = memory_bytes()
    start = time.perf_counter()
    model = build_t5_encoder(t5_config(size), random_tensor, precision, "cpu")
    build_s = time.perf_counter() - start
    rss_after, peak = memory_bytes()
    encoder = T5TextEncoder(model, tokenizer, precision)  # no prompt cache: each call runs T5
    times = []
    for _ in range(2):
        start = time.perf_counter()
        embeds, _ = encoder.encode([PROMPT], max_length)
        times.append(time.perf_counter() - start)
    assert torch.isfinite(embeds).all()
    return {
        "size": size,
        "precision": precision,
        "max_length": max_length,
        "resident_gib": (rss_after - rss_before) / GIB,
        "peak_gib": (peak - rss_before) / GIB,
        "build_s": build_s,
        "encode_s": times[0],
        "encode_again_s": times[1],
        "threads": torch.get_num_threads(),
    }


def accuracy_rows(precisions: list[str], tokenizer_dir: Path) -> list[list]:
    """Cosine of each precision's encode to fp32, on small T5s whose weights are shared by all precisions."""
    import torch.nn.functional as F
    from transformers import T5EncoderModel

    prompts = [PROMPT, "two red apples on a wooden table, a blue cup behind them"]
    tokenizer = load_tokenizer(tokenizer_dir)
    rows = []
    for layers in (2, 4):
        config = t5_config("quick")
        config.num_layers = layers
        torch.manual_seed(0)
        state = T5EncoderModel(config).state_dict()

        def encode(precision: str) -> tuple[torch.Tensor, torch.Tensor]:
            model = build_t5_encoder(config, lambda name, shape, dtype: state[name], precision, "cpu")
            embeds, mask = T5TextEncoder(model, tokenizer, precision).encode(prompts, 120)
            return embeds.float()[mask.bool()], mask

        reference, _ = encode("fp32")
        rows += [[layers, p, F.cosine_similarity(encode(p)[0].flatten(), reference.flatten(), dim=0).item()]
                 for p in precisions]
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"T5 size {rows[0]['size']}, one prompt at max_length {rows[0]['max_length']}, "
          f"{rows[0]['threads']} CPU threads")
    print("| precision | resident (GiB) | peak while building (GiB) | build (s) | encode, 1st (s) | encode, 2nd (s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['precision']} | {r['resident_gib']:.2f} | {r['peak_gib']:.2f} | {r['build_s']:.1f} | "
              f"{r['encode_s']:.2f} | {r['encode_again_s']:.2f} |")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small T5, in this process (smoke test)")
    parser.add_argument("--precisions", nargs="+", default=["bf16", "int8", "nf4", "int8-wo-bf16", "nf4-wo-bf16"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads in each measurement")
    parser.add_argument("--max-length", type=int, default=120, help="120 (PixArt-α) or 300 (Σ)")
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one measurement, JSON out
    args = parser.parse_args(argv)
    size = "quick" if args.quick else "xxl"
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.worker:
        print(json.dumps(measure(size, args.precisions[0], args.max_length, args.tokenizer)))
        return []
    rows = []
    for precision in args.precisions:
        if args.quick:  # in-process: memory figures are rough, the point is that every path runs
            rows.append(measure(size, precision, args.max_length, args.tokenizer))
            continue
        # a fresh process per precision, so one precision's freed memory does not hide the next one's growth
        cmd = [sys.executable, __file__, "--worker", "--precisions", precision,
               "--max-length", str(args.max_length), "--tokenizer", str(args.tokenizer)]
        cmd += ["--threads", str(args.threads)] if args.threads else []
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.exit(f"{precision} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print_table(rows)
    print("\nEncode cosine similarity to fp32, small T5 (d_model 128), two prompts:")
    print("| layers | precision | cosine to fp32 |\n|---|---|---|")
    for layers, precision, cos in accuracy_rows([r["precision"] for r in rows], args.tokenizer):
        print(f"| {layers} | {precision} | {cos:.5f} |")
    return rows


if __name__ == "__main__":
    main()
