"""The CLI end to end on tiny local models, the hub fallback through a fake cache, and the fast offline failure.

Tiny pipeline: a diffusers-layout folder with a tiny PixArt transformer, a tiny T5 (real T5 v1.1 tokenizer copied
from tests/data), a tiny AutoencoderKL and an LCM scheduler config. Never the network: HF_HUB_OFFLINE=1 and an
empty HF_HOME, or a hub endpoint on a closed local port.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from pixart_core import cli
from pixart_core.loading import hub
from tests.conftest import ROOT, T5_TOKENIZER, record_keyword
from tests.factories import tiny_diffusers_transformer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")


def build_tiny_pipeline(root: Path) -> Path:
    from diffusers import AutoencoderKL, LCMScheduler
    from transformers import T5Config, T5EncoderModel

    tiny_diffusers_transformer(family="alpha", sample_size=32, caption_channels=64, seed=2).save_pretrained(
        root / "transformer")
    torch.manual_seed(0)
    T5EncoderModel(T5Config(vocab_size=32128, d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16,
                             is_gated_act=True, dense_act_fn="gelu_pytorch_tanh")).save_pretrained(root / "text_encoder")
    (root / "tokenizer").mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(T5_TOKENIZER / name, root / "tokenizer" / name)
    AutoencoderKL(latent_channels=4, block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1,
                  norm_num_groups=4).save_pretrained(root / "vae")
    LCMScheduler(beta_start=1e-4, beta_end=0.02, beta_schedule="linear").save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline",
                                                       "scheduler": ["diffusers", "LCMScheduler"]}))
    return root


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory) -> Path:
    return build_tiny_pipeline(tmp_path_factory.mktemp("pipe") / "PixArt-tiny")


@pytest.fixture
def no_hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache, offline."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf_home"


def fake_cache(hf_home: Path, pipeline: Path) -> Path:
    repo = hf_home / "hub" / ("models--" + hub.OFFICIAL_LCM_REPO.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(pipeline, repo / "snapshots" / COMMIT)
    return repo / "snapshots" / COMMIT


def test_generate_png_from_local_folder_with_progress(tiny_pipeline, tmp_path, capsys, no_hub):
    out = tmp_path / "out.png"
    code = cli.main(["generate", "a red cube on a table", "-o", str(out), "--model", str(tiny_pipeline),
                     "--width", "320", "--height", "192", "--dtype", "fp32", "--t5-precision", "fp32", "--seed", "3"])
    err = capsys.readouterr().err
    assert code == 0, err
    img = Image.open(out)
    assert img.format == "PNG" and img.size == (320, 192)  # generated at the 0.6 bin (192x320 at 256 px), same size
    assert "sampler lcm" in err  # the scheduler config marks it as an LCM pipeline
    assert "4/4" in err  # tqdm bar over the 4 LCM steps


def test_generate_batch_uses_the_hub_cache_when_no_path_is_given(tiny_pipeline, tmp_path, capsys, no_hub):
    fake_cache(no_hub, tiny_pipeline)
    out = tmp_path / "cat.png"
    code = cli.main(["generate", "a cat", "-o", str(out), "--batch", "2", "--width", "256", "--height", "256",
                     "--dtype", "fp32", "--t5-precision", "fp32", "--seed", "5", "--steps", "2", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    paths = [tmp_path / "cat_0.png", tmp_path / "cat_1.png"]
    assert all(p.is_file() for p in paths)
    assert "seed 5" in captured.out and "seed 6" in captured.out
    # Per-image seed rule: image 1 of the batch equals a batch of one with seed + 1.
    alone = tmp_path / "alone.png"
    assert cli.main(["generate", "a cat", "-o", str(alone), "--width", "256", "--height", "256", "--dtype", "fp32",
                     "--t5-precision", "fp32", "--seed", "6", "--steps", "2", "--no-progress"]) == 0
    a = torch.tensor(list(Image.open(alone).getdata()), dtype=torch.float32)
    b = torch.tensor(list(Image.open(paths[1]).getdata()), dtype=torch.float32)
    assert (a - b).abs().max().item() <= 1.0  # equal up to one 8-bit level of rounding


def test_offline_without_cache_fails_fast_with_instructions(tmp_path, capsys, no_hub):
    start = time.perf_counter()
    code = cli.main(["generate", "a cat", "-o", str(tmp_path / "x.png"), "--model", "official"])
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    assert code == 2 and elapsed < 5
    assert err.startswith("error: ") and "Traceback" not in err
    assert hub.OFFICIAL_LCM_REPO in err and "HF_HUB_OFFLINE" in err
    assert "transformer/" in err and "text_encoder/" in err and "--model" in err
    assert str(no_hub / "hub") in err  # where to put it


def test_unreachable_hub_fails_fast(tmp_path, monkeypatch, no_hub):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: refused at once, never the internet
    start = time.perf_counter()
    with pytest.raises(hub.PixArtError, match="unreachable") as e:
        hub.resolve_official_lcm()
    assert time.perf_counter() - start < hub.PROBE_TIMEOUT_S + 2
    assert "hf download" in str(e.value)


def test_incomplete_cache_names_the_missing_parts(tiny_pipeline, no_hub):
    snap = fake_cache(no_hub, tiny_pipeline)
    shutil.rmtree(snap / "vae")
    with pytest.raises(hub.PixArtError, match="incomplete; missing: vae/"):
        hub.resolve_official_lcm()


def test_describe_and_errors_through_python_m(tiny_pipeline, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(ROOT))
    ok = subprocess.run([sys.executable, "-m", "pixart_core", "describe", str(tiny_pipeline)], env=env, cwd=tmp_path,
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    info = json.loads(ok.stdout)
    assert info["family"] == "alpha" and info["resolution"] == 256
    bad = subprocess.run([sys.executable, "-m", "pixart_core", "describe", str(tmp_path / "missing.safetensors")],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr


def test_bad_arguments_are_messages(tiny_pipeline, tmp_path, capsys):
    assert cli.main(["generate", "x", "-o", str(tmp_path / "x.jpg"), "--model", str(tiny_pipeline)]) == 2
    assert ".png" in capsys.readouterr().err
    code = cli.main(["generate", "x", "-o", str(tmp_path / "x.png"), "--model", str(tiny_pipeline), "--dtype", "fp32",
                     "--t5-precision", "fp32", "--width", "200", "--height", "200", "--no-binning"])
    assert code == 2 and "multiples of 16" in capsys.readouterr().err


def test_bench_quick_runs(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_lcm", ROOT / "bench" / "bench_lcm.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "ratio" in out


def test_cache_option_reaches_the_sampling_loop(tiny_pipeline, tmp_path, capsys, no_hub, monkeypatch):
    from pixart_core import pipeline
    from pixart_core.step_cache import StepCacheOptions

    seen = record_keyword(monkeypatch, pipeline, "generate_latents", "step_cache")
    common = ["--model", str(tiny_pipeline), "--width", "256", "--height", "256", "--dtype", "fp32",
              "--t5-precision", "fp32", "--steps", "2", "--no-progress"]
    for mode in ("both", "off"):
        code = cli.main(["generate", "a cat", "-o", str(tmp_path / f"{mode}.png"), "--cache", mode, *common])
        assert code == 0, capsys.readouterr().err
    assert seen == ["both", "off"]
    assert pipeline.step_cache_options("both") == StepCacheOptions(delta_dit=True, tgate=True)
    assert pipeline.step_cache_options("off") is None
    with pytest.raises(SystemExit):
        cli.main(["generate", "a cat", "--cache", "fast", *common])
    assert "invalid choice: 'fast'" in capsys.readouterr().err


def test_lora_option_applies_stacked_loras(tiny_pipeline, tmp_path, capsys, no_hub):
    """--lora FILE[:STRENGTH], repeatable: strength 0 is the base image exactly, +s then -s cancel, a LoRA for
    another model is one message (exit 2)."""
    import numpy as np
    from safetensors.torch import save_file

    from tests.comfy_harness import _tiny_lora

    lora = tmp_path / "style.safetensors"
    save_file(_tiny_lora(depth=2, seed=5, scale=0.5), str(lora))
    common = ["--model", str(tiny_pipeline), "--width", "128", "--height", "128", "--no-binning", "--dtype", "fp32",
              "--t5-precision", "fp32", "--steps", "1", "--no-progress"]

    def pixels(name, *loras):
        options = [a for path in loras for a in ("--lora", path)]
        code = cli.main(["generate", "a cat", "-o", str(tmp_path / name), *common, *options])
        assert code == 0, capsys.readouterr().err
        return torch.tensor(np.array(Image.open(tmp_path / name)), dtype=torch.float32)

    base = pixels("base.png")
    assert torch.equal(pixels("zero.png", f"{lora}:0"), base)
    assert (pixels("one.png", str(lora)) - base).abs().max() > 10  # 8-bit pixel values
    assert (pixels("cancel.png", f"{lora}:0.7", f"{lora}:-0.7") - base).abs().max() <= 1  # rounding to 8 bits
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4)}, str(sdxl))
    assert cli.main(["generate", "a cat", "-o", str(tmp_path / "x.png"), *common, "--lora", str(sdxl)]) == 2
    assert "sdxl.safetensors is a Stable Diffusion / SDXL UNet LoRA" in capsys.readouterr().err


def test_quantize_option_reaches_the_transformer(tiny_pipeline, tmp_path, capsys, no_hub, monkeypatch):
    from pixart_core.loading import checkpoint

    seen = []
    core = checkpoint.quantize_transformer  # the one load call quantises (load_transformer(weights=...))
    monkeypatch.setattr(checkpoint, "quantize_transformer", lambda model, mode: seen.append(mode) or core(model, mode))
    code = cli.main(["generate", "a cat", "-o", str(tmp_path / "q.png"), "--model", str(tiny_pipeline), "--width",
                     "256", "--height", "256", "--dtype", "bf16", "--t5-precision", "fp32", "--steps", "2",
                     "--no-progress", "--quantize", "int8-dynamic"])
    assert code == 0, capsys.readouterr().err
    assert seen == ["int8-dynamic"] and (tmp_path / "q.png").exists()
