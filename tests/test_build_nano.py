"""`python -m train.build_nano` end to end at a tiny scale: every stage runs, the files it writes load through the
public loaders and get scored, and the same seed writes the same bytes again (a build is reproducible from its seed,
issue #18)."""

from __future__ import annotations

import json

import pytest

from pixart_core.loading import bundled
from train import build_nano

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["--scale", "0.002", "--pool", "128", "--prompts", "6", "--control-cases", "2", "--threads", "1"]
SHIPPED = [bundled.BASE_FILE, bundled.CONTROLNET_FILE,
           *(f"{bundled.LCM_DIR}/{part}" for part in ("transformer/diffusion_pytorch_model.safetensors",
                                                       "text_encoder/model.safetensors",
                                                       "vae/diffusion_pytorch_model.safetensors"))]


def test_tiny_build_runs_every_stage_and_is_reproducible_from_its_seed(tmp_path, capsys):
    first, second = tmp_path / "a", tmp_path / "b"
    for out in (first, second):
        assert build_nano.main(["--out", str(out), *TINY]) == 0
    capsys.readouterr()
    scores = json.loads((first / "scores.json").read_text())
    assert set(scores["stage_seconds"]) == {"text_pretraining", "vae", "pretraining", "lcm_distillation", "controlnet"}
    assert set(scores["shape_signal_in_latent"]) == {"small", "big"}
    assert set(scores["lcm_4_steps_shape_confusion"]) == {"circle", "square", "triangle"}
    assert scores["lcm_4_steps_no_cfg"]["prompts"] == 6
    assert scores["controlnet_strength_0"]["max_abs_diff_vs_base"] == 0.0
    for name in SHIPPED:
        assert (first / name).read_bytes() == (second / name).read_bytes(), f"{name} differs between two builds"
