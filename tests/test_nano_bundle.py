"""Where PixArt-nano's files go (pixart_core/loading/bundled.py) and how the ComfyUI loaders offer them: tiny models
are written under the nano names in a temporary models/nano, as `build_nano` lays them out."""

from __future__ import annotations

import shutil

import pytest
import torch

from pixart_nodes import comfy_bridge as bridge
from pixart_core.loading import bundled
from pixart_core.loading.t5_loading import load_t5
from tests.test_cli import build_tiny_pipeline


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def nano_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("models") / "nano"
    pipe = build_tiny_pipeline(root / bundled.LCM_DIR)
    shutil.copy(pipe / "transformer" / "diffusion_pytorch_model.safetensors", root / bundled.BASE_FILE)
    return root


@pytest.fixture
def user_models(tmp_path, nano_root, monkeypatch):
    monkeypatch.setattr(bundled, "NANO_DIR", nano_root)
    models = tmp_path / "models"
    (models / "diffusion_models").mkdir(parents=True)
    (models / "diffusion_models" / "my_pixart.safetensors").write_bytes(b"")
    bridge.set_models_root(models)
    yield models
    bridge.set_models_root(None)


def test_loaders_list_the_bundled_models_after_the_users_files(user_models, nano_root):
    assert bridge.list_models("diffusion_models") == [
        "my_pixart.safetensors", "PixArt-nano-LCM (bundled)", "PixArt-nano-base (bundled)"]
    assert bridge.list_models("vae") == ["PixArt-nano-VAE (bundled)"]
    assert bridge.list_models("controlnet") == []  # no ControlNet file in this build: nothing offered
    assert bridge.list_models("controlnet", with_bundled=False) == []
    assert bridge.model_path("diffusion_models", "PixArt-nano-LCM (bundled)", "Transformer file") == str(
        nano_root / bundled.LCM_DIR / "transformer")
    assert bridge.model_path("text_encoders", "PixArt-nano-T5 (bundled)", "T5 encoder file") == str(
        nano_root / bundled.LCM_DIR)


def test_t5_loader_node_uses_the_pipelines_own_tokenizer(user_models, nano_root):
    from pixart_nodes import NODE_CLASS_MAPPINGS

    bridge.set_t5_tokenizer_dir(None)  # no fallback tokenizer: the bundled folder must bring its own
    [encoder] = NODE_CLASS_MAPPINGS["PixArtDeltaT5Loader"]().load("PixArt-nano-T5 (bundled)", "fp32", "cpu")
    reference = load_t5(nano_root / bundled.LCM_DIR, precision="fp32")
    a, mask_a = encoder.module.encode(["a red circle above a blue square"], 120)
    b, mask_b = reference.encode(["a red circle above a blue square"], 120)
    assert torch.equal(mask_a, mask_b) and torch.equal(a, b)


def test_t5_file_inside_a_pipeline_folder_finds_the_sibling_tokenizer(nano_root):
    # text_encoder/model.safetensors of a diffusers pipeline: its tokenizer is the sibling folder tokenizer/
    single = load_t5(nano_root / bundled.LCM_DIR / "text_encoder" / "model.safetensors", precision="fp32")
    folder = load_t5(nano_root / bundled.LCM_DIR, precision="fp32")
    a, mask_a = single.encode(["a red circle above a blue square"], 120)
    b, mask_b = folder.encode(["a red circle above a blue square"], 120)
    assert torch.equal(mask_a, mask_b) and torch.equal(a, b)
