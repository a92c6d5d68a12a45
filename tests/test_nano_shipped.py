"""The PixArt-nano files that ship in models/nano: they load through the public loaders, still score what their build
recorded (so a change of the code around them cannot silently break them), and the CLI runs them on a fresh clone
with no Hugging Face cache, no network and no environment variables of ours."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from pixart_core import cli
from pixart_core.loading import bundled
from pixart_core.loading.checkpoint import load_transformer
from pixart_core.loading.controlnet_files import load_controlnet
from pixart_core.loading.t5_loading import load_t5
from train import caption_checker
from train.evaluate import GUARD_CONTROL_CASES, GUARD_PROMPTS, guard_scores
from pixart_core.loading.vae_files import load_vae
from tests.conftest import ROOT
from tests.test_cli import build_tiny_pipeline, fake_cache

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCORES = json.loads((bundled.NANO_DIR / "scores.json").read_text())
# One image of the guard set whose checker verdict flips (a borderline pixel count after a last-bit change of the
# arithmetic on another CPU) moves a rate by 1/count; allow one such flip per metric, nothing more.
FLIPS_ALLOWED = 1


@pytest.fixture(scope="module")
def shipped():
    lcm_dir = bundled.NANO_DIR / bundled.LCM_DIR
    lcm = load_transformer(lcm_dir, dtype=torch.float32)
    t5 = load_t5(lcm_dir, precision="fp32")
    vae = load_vae(str(lcm_dir / "vae"), latent_scale=lcm.config.latent_scale)
    controlnet = load_controlnet(bundled.NANO_DIR / bundled.CONTROLNET_FILE, dtype=torch.float32)
    return lcm, controlnet, t5, vae


def test_shipped_files_fit_the_size_budget():
    shipped = [bundled.NANO_DIR / bundled.LCM_DIR, bundled.NANO_DIR / bundled.BASE_FILE,
               bundled.NANO_DIR / bundled.CONTROLNET_FILE]
    size = sum(f.stat().st_size for p in shipped for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())
    assert size < 20e6, f"PixArt-nano ships {size / 1e6:.1f} MB; the budget is 20 MB"


def test_shipped_model_still_scores_what_its_build_recorded(shipped):
    recorded = SCORES["ci_guard"]
    now = guard_scores(*shipped)
    ran, want = now["lcm_4_steps_no_cfg"], recorded["lcm_4_steps_no_cfg"]
    assert ran["prompts"] == want["prompts"] == GUARD_PROMPTS
    pairs = want["two_object_prompts"]
    denominators = {"colour": GUARD_PROMPTS, "shape": GUARD_PROMPTS, "single_position": GUARD_PROMPTS - pairs,
                    "pair_relation": pairs, "two_object_both": pairs}
    for metric, count in denominators.items():
        assert abs(ran[metric] - want[metric]) <= FLIPS_ALLOWED / count + 1e-9, (metric, ran, want)
    # mask IoU is a mean over GUARD_CONTROL_CASES images; one image's IoU moves by at most 1 if its object flips
    assert abs(now["controlnet_mask_iou_lcm4"] - recorded["controlnet_mask_iou_lcm4"]) <= (
        FLIPS_ALLOWED / GUARD_CONTROL_CASES), now


def _clean_env(tmp_path) -> dict:
    """No Hugging Face cache, offline, none of the project's variables: what a fresh clone has."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PIXART_", "HUGGINGFACE"))}
    env.update(HF_HOME=str(tmp_path / "empty_hf_home"), HF_HUB_OFFLINE="1")
    return env


def test_main_command_works_with_no_cache_and_no_network(tmp_path):
    out = tmp_path / "cactus.png"
    run = subprocess.run([sys.executable, "-m", "pixart_core", "generate",
                          "a small cactus with a happy face in the Sahara desert", "-o", str(out)],
                         cwd=ROOT, env=_clean_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    notes = [line for line in run.stderr.splitlines() if line.startswith("model: ")]
    assert len(notes) == 1 and "PixArt-nano" in notes[0] and "hf download" in notes[0], run.stderr
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (64, 64)


def test_model_nano_draws_the_prompted_colours(tmp_path, capsys):
    out = tmp_path / "pair.png"
    assert cli.main(["generate", "a big red circle on the left", "-o", str(out), "--model", "nano", "--seed", "3",
                     "--no-progress"]) == 0
    assert "PixArt-nano" in capsys.readouterr().err
    with Image.open(out) as img:
        pixels = torch.tensor(list(img.getdata()), dtype=torch.float32).view(1, 64, 64, 3).numpy() / 255
    result = caption_checker.check(pixels[0], "a big red circle on the left")
    assert result.colour, "the bundled model lost the colour it was asked for"


def test_official_pipeline_in_the_cache_wins_over_nano(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = fake_cache(tmp_path / "hf_home", build_tiny_pipeline(tmp_path / "PixArt-tiny"))
    out = tmp_path / "official.png"
    assert cli.main(["generate", "a cat", "-o", str(out), "--width", "256", "--height", "256", "--dtype", "fp32",
                     "--t5-precision", "fp32", "--steps", "1", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "model: PixArt-alpha/PixArt-LCM-XL-2-1024-MS (Hugging Face cache)" in err and "nano" not in err
    with Image.open(out) as img:
        assert img.size == (256, 256)  # the stand-in's size, not nano's 64 px
    assert snapshot.is_dir()
