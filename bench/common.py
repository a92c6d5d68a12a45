"""Shared helpers of the speed benchmarks: model shapes, random full-size weights, timing, peak memory, tables.

Every benchmark runs ours and the reference (diffusers) on the same weights in the same run. Timings are wall-clock
minima over repeats: other processes share this machine, and the minimum is the least disturbed run. Peak memory is
measured in a fresh subprocess (its own ru_maxrss), so one measurement never inherits another's high-water mark.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# diffusers PixArtTransformer2DModel arguments: the released XL-2 (α-1024-MS, micro-conditions) and a tiny one.
FULL = dict(num_attention_heads=16, attention_head_dim=72, num_layers=28, caption_channels=4096, sample_size=128,
            use_additional_conditions=True)
TINY = dict(num_attention_heads=2, attention_head_dim=72, num_layers=2, caption_channels=64, sample_size=32,
            use_additional_conditions=False)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def reference_transformer(shape: dict, seed: int = 0):
    """A diffusers PixArtTransformer2DModel (fp32) with random weights, non-zero everywhere (std 0.02)."""
    from diffusers import PixArtTransformer2DModel
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # its advice on casting with .to() does not apply to a benchmark

    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(
        in_channels=4, out_channels=8, patch_size=2, cross_attention_dim=shape["num_attention_heads"] * 72,
        norm_type="ada_norm_single", num_embeds_ada_norm=1000, interpolation_scale=max(shape["sample_size"] // 64, 1),
        **shape)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model.eval().requires_grad_(False)


def ours_from_reference(reference, dtype: torch.dtype):
    """Our PixArtTransformer with the reference's weights (renamed by our loader, in memory)."""
    from pixart_core.loading.checkpoint import load_transformer
    from pixart_core.loading.checkpoint_formats import StateDictSource

    tensors = {k: v.detach() for k, v in reference.state_dict().items()}
    return load_transformer(StateDictSource("<memory>", tensors=tensors, config=dict(reference.config)), dtype=dtype)


def write_checkpoint(shape: dict, folder: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Save random weights as a diffusers `transformer/` folder (config.json + safetensors) and return it."""
    model = reference_transformer(shape).to(dtype)
    out = Path(folder) / "transformer"
    model.save_pretrained(out, safe_serialization=True, max_shard_size="20GB")
    return out


def text_inputs(batch: int, caption_channels: int, tokens: int = 120, valid: Sequence[int] = (1, 20), seed: int = 1):
    """CFG-style T5 embeddings: (batch, tokens, C) and a 0/1 mask with `valid` tokens per row (cycled)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(batch, tokens, caption_channels, generator=g)
    mask = torch.zeros(batch, tokens, dtype=torch.long)
    for i in range(batch):
        mask[i, : valid[i % len(valid)]] = 1
    return y, mask


def best_time(fn: Callable[[], object], repeats: int, warmup: int = 0, clock=time.perf_counter) -> float:
    """Minimum time of `repeats` calls after `warmup` untimed calls (wall clock unless told otherwise)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        fn()
        best = min(best, clock() - start)
    return best


def matmul_peak_gflops(dtype: torch.dtype = torch.bfloat16, n: int = 4096, repeats: int = 5,
                       clock=time.perf_counter) -> float:
    """The machine's practical matrix-multiply peak: the best of a few square n x n products."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    t = best_time(lambda: a @ b, repeats, warmup=1, clock=clock)
    return 2 * n**3 / t / 1e9


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            line = next(ln for ln in f if ln.startswith(field + ":"))
        return int(line.split()[1]) / 1024  # kB
    except (OSError, StopIteration):
        return None


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM; not ru_maxrss, which on Linux keeps the parent's high-water mark
    across fork + exec)."""
    hwm = _status_mb("VmHWM")
    if hwm is not None:
        return hwm
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 / (1024 if sys.platform == "darwin" else 1)


def reset_peak_rss() -> None:
    """Start a new peak measurement from the current RSS (Linux >= 4.0); elsewhere the peak keeps counting."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def current_rss_mb() -> float:
    rss = _status_mb("VmRSS")
    return rss if rss is not None else peak_rss_mb()


def run_child(script: Path, args: Sequence[str], timeout: float = 900) -> dict:
    """Run `python script --child ...args` in a fresh process; it prints one JSON line last, which is returned."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(script), "--child", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=str(ROOT))
    if proc.returncode != 0:
        raise RuntimeError(f"{script.name} {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1])


def child_result(**values) -> None:
    """What a --child process prints as its last line for run_child."""
    print(json.dumps(values), flush=True)


def temp_dir(prefix: str) -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix=prefix)


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        load = "load average %.1f" % os.getloadavg()[0]
    except OSError:
        load = ""
    return (f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"
            + (f", {load}" if load else ""))


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A Markdown table (pasteable into the README)."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    print(line(cells[0]))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells[1:]:
        print(line(r))
    sys.stdout.flush()


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def our_transformer(shape: dict, dtype: torch.dtype, seed: int = 0):
    """Our PixArtTransformer of a benchmark shape with random weights (std 0.02), no diffusers needed."""
    from pixart_core.config import PixArtConfig
    from pixart_core.transformer import PixArtTransformer

    heads = shape["num_attention_heads"]
    config = PixArtConfig(family="alpha" if shape["use_additional_conditions"] else "sigma", depth=shape["num_layers"],
                          hidden_size=heads * 72, num_heads=heads, caption_channels=shape["caption_channels"],
                          micro_conditions=shape["use_additional_conditions"], sample_size=shape["sample_size"],
                          pe_interpolation=float(max(shape["sample_size"] // 64, 1)), has_null_embedding=False)
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = PixArtTransformer(config)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model.to(dtype).eval().requires_grad_(False)


class CachedGuidance:
    """eps_fn(x, t) for the samplers with CFG ([uncond, cond] in one batch) and an optional StepCache: the calls a
    guidance wrapper makes (T-GATE: the conditional batch alone, unguided, after the gate step)."""

    def __init__(self, model, y, mask, scale: float, size_px: int, cache=None):
        self.model, self.scale, self.cache = model, scale, cache
        self.cfg = scale > 1.0
        self.text = model.prepare_text(y.to(model.dtype), mask)  # y/mask rows: [uncond, cond] when cfg
        self.cond_text = model.prepare_text(y[-1:].to(model.dtype), mask[-1:]) if self.cfg else self.text
        self.res = torch.tensor([[float(size_px), float(size_px)]])
        self.ar = torch.tensor([[1.0]])

    def __call__(self, x, t):
        cfg = self.cfg and (self.cache is None or self.cache.guidance_needed(t))
        kwargs = self.cache.model_kwargs(t, cfg=cfg) if self.cache is not None else {}
        xm = x.to(self.model.dtype)
        if cfg:
            out = self.model(torch.cat([xm, xm]), torch.cat([t, t]), self.text, resolution=self.res,
                             aspect_ratio=self.ar, **kwargs).float()
            uncond, cond = out.chunk(2)
            out = uncond + self.scale * (cond - uncond)
        else:
            out = self.model(xm, t, self.cond_text if self.cfg else self.text, resolution=self.res,
                             aspect_ratio=self.ar, **kwargs).float()
        return out[:, :4]
