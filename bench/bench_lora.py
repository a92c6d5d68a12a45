"""Benchmark: applying a LoRA to the full-size transformer, and what the runtime adapter costs per step.

Full run (default): our full-size XL-2 transformer (28 blocks, width 1152, micro-conditions) with random weights in
bf16, and a random rank-32 LoRA in diffusers' save_lora_weights format (.safetensors, bf16) on every layer diffusers'
PixArt LoRA training targets and more: self- and cross-attention q/k/v/out, both MLP layers, adaLN and the caption
projection (226 layers). Printed: reading the file, applying it (strength 1), re-applying at another strength (no
file read), removing it, the memory the adapter adds, and one denoising step at --size px (batch 2, as with CFG)
without and with the LoRA. Single thread by default (--threads), wall clock or --clock cpu.

    python bench/bench_lora.py                       # rank 32, step at 256 px, ~2 min on one thread
    python bench/bench_lora.py --rank 64 --size 1024
    python bench/bench_lora.py --clock cpu           # CPU seconds: stable on a shared machine
    python bench/bench_lora.py --quick               # tiny model, rank 4, seconds (smoke test)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FULL, TINY, best_time, machine_line, our_transformer, print_table, temp_dir, text_inputs  # noqa: E402

from pixart_core.loading.lora_files import load_lora  # noqa: E402
from pixart_core.lora import LoraLinear, apply_loras, remove_loras  # noqa: E402

BLOCK_LAYERS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
OTHER_LAYERS = ("adaln_single.linear", "caption_projection.linear_1", "caption_projection.linear_2")


def write_lora(path: Path, depth: int, width: int, caption: int, rank: int) -> int:
    """A random LoRA with the shapes of the model's layers, as transformer.<diffusers key>.lora_A/B; its layers."""
    from safetensors.torch import save_file

    shapes = {f"transformer_blocks.{i}.{name}": (4 * width if name == "ff.net.2" else width,
                                                 4 * width if name == "ff.net.0.proj" else width)
              for i in range(depth) for name in BLOCK_LAYERS}
    shapes.update({"adaln_single.linear": (width, 6 * width), "caption_projection.linear_1": (caption, width),
                   "caption_projection.linear_2": (width, width)})
    g = torch.Generator().manual_seed(0)
    state = {}
    for name, (fan_in, fan_out) in shapes.items():
        state[f"transformer.{name}.lora_A.weight"] = (torch.randn(rank, fan_in, generator=g) * 0.01).bfloat16()
        state[f"transformer.{name}.lora_B.weight"] = (torch.randn(fan_out, rank, generator=g) * 0.01).bfloat16()
    save_file(state, str(path))
    return len(shapes)


def step(model, size: int):
    """One transformer call on a CFG-sized batch (2) at size px."""
    y, mask = text_inputs(2, model.config.caption_channels)
    text = model.prepare_text(y.to(model.dtype), mask)
    x = torch.randn(2, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0)).to(model.dtype)
    res, ar = torch.tensor([[float(size)] * 2]), torch.tensor([[1.0]])
    with torch.no_grad():
        return model(x, torch.tensor([500.0, 500.0]), text, resolution=res, aspect_ratio=ar)


def adapter_bytes(model) -> int:
    return sum(b.numel() * b.element_size() for m in model.modules() if isinstance(m, LoraLinear)
               for b in m.buffers(recurse=False))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--size", type=int, default=256, help="px of the timed denoising step")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    ap.add_argument("--quick", action="store_true", help="tiny model, rank 4 (smoke test)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    shape, rank, size, repeats = (TINY, 4, 64, 1) if args.quick else (FULL, args.rank, args.size, args.repeats)
    model = our_transformer(shape, torch.bfloat16)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    c = model.config
    with temp_dir("pixart_lora_bench_") as tmp:
        path = Path(tmp) / "lora.safetensors"
        layers = write_lora(path, c.depth, c.hidden_size, c.caption_channels, rank)
        file_mib = path.stat().st_size / 2**20
        read = best_time(lambda: load_lora(path), repeats, clock=clock)
        lora = load_lora(path)
    apply = best_time(lambda: apply_loras(model, [(lora, 1.0)], warn=False), repeats, clock=clock)
    reapply = best_time(lambda: apply_loras(model, [(lora, 0.6)], warn=False), repeats, clock=clock)
    extra = adapter_bytes(model)
    with_lora = best_time(lambda: step(model, size), repeats, warmup=1, clock=clock)
    remove = best_time(lambda: remove_loras(model), repeats, clock=clock)
    base = best_time(lambda: step(model, size), repeats, warmup=1, clock=clock)
    print(machine_line())
    print(f"\n{'tiny' if args.quick else 'XL-2 (28 blocks, width 1152)'} bf16 transformer "
          f"({weights / 2**20:.0f} MiB of weights), rank-{rank} LoRA on {layers} layers, "
          f"{args.clock} clock, best of {repeats}")
    print_table(["what", "seconds", "note"], [
        ["read the LoRA file (load_lora)", read, f"{file_mib:.1f} MiB file"],
        ["apply (apply_loras, strength 1)", apply, f"adapter adds {extra / 2**20:.1f} MiB "
                                                   f"({100 * extra / weights:.1f}% of the weights)"],
        ["re-apply at strength 0.6 (no file read)", reapply, ""],
        ["remove (remove_loras)", remove, "the base layers back, exactly"],
        [f"one step, {size} px, batch 2, base", base, ""],
        [f"one step, {size} px, batch 2, with the LoRA", with_lora, f"{100 * (with_lora / base - 1):+.1f}%"],
    ])
    return 0


if __name__ == "__main__":
    sys.exit(main())
