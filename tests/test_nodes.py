"""The node classes as ComfyUI sees them: the V1 contract, loading the pack the way ComfyUI does, ComfyUI's LATENT and
IMAGE conventions, the model cache, Cancel, and the messages a user gets for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pixart_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from pixart_nodes import comfy_bridge as bridge
from pixart_nodes import model_cache
from pixart_core.errors import PixArtError
from tests import comfy_harness as harness
from tests.conftest import record_keyword

ROOT = Path(__file__).resolve().parents[1]
CLASSES = {**NODE_CLASS_MAPPINGS, **harness.NATIVE_NODES}
FILES = {k: Path(v).name for k, v in harness.TINY_FILES.items()}

# Node names other packs (and ComfyUI itself) already use for PixArt: ComfyUI drops a clashing name silently.
TAKEN = {"PixArtCheckpointLoader", "PixArtCheckpointLoaderSimple", "PixArtResolutionSelect", "PixArtT5TextEncode",
         "PixArtResolutionCond", "PixArtControlNetCond", "PixArtLoraLoader", "PixArtT5FromSD3CLIP", "T5v11Loader",
         "CLIPTextEncodePixArtAlpha"}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    models = harness.write_tiny_models(tmp_path_factory.getbasetemp() / "tiny_models")
    with harness.comfy_session(models, tmp_path_factory.mktemp("comfy_dirs_nodes"), 64):
        yield models


def text_to_image(model=FILES["lcm"], sampler="lcm", width=64, height=64, vae=FILES["sd_vae"], control=False) -> dict:
    """A minimal API prompt: loader, T5, encode, sampler, tiled decode, save."""
    p = {
        "1": {"class_type": "PixArtDeltaTransformerLoader", "inputs": {"model_name": model, "precision": "auto",
              "family": "auto", "train_resolution": "auto", "text_len": "auto"}},
        "2": {"class_type": "PixArtDeltaT5Loader", "inputs": {"t5_name": FILES["t5"], "precision": "fp32",
                                                              "device": "auto"}},
        "3": {"class_type": "PixArtDeltaT5TextEncode", "inputs": {"t5": ["2", 0], "model": ["1", 0],
              "prompt": "a red fox", "negative_prompt": "", "max_length": 0}},
        "5": {"class_type": "PixArtDeltaVAELoader", "inputs": {"vae_name": vae, "kind": "auto", "precision": "auto"}},
        "6": {"class_type": "PixArtDeltaVAEDecodeTiled", "inputs": {"samples": ["4", 0], "vae": ["5", 0],
                                                                    "mode": "auto", "tile_size": 0}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "t"}},
    }
    if sampler == "lcm":
        p["4"] = {"class_type": "PixArtDeltaLCMSampler", "inputs": {"model": ["1", 0], "conditioning": ["3", 0],
                  "seed": 1, "steps": 2, "width": width, "height": height, "batch_size": 1, "denoise": 1.0}}
    else:
        p["8"] = {"class_type": "PixArtDeltaEmptyLatent", "inputs": {"width": width, "height": height,
                                                                     "batch_size": 1}}
        p["4"] = {"class_type": "PixArtDeltaSampler", "inputs": {"model": ["1", 0], "conditioning": ["3", 0],
                  "latent": ["8", 0], "seed": 1, "steps": 2, "cfg": 4.5, "sampler_name": sampler, "denoise": 1.0}}
    if control:
        p["9"] = {"class_type": "LoadImage", "inputs": {"image": "pixart_delta_example.png"}}
        p["10"] = {"class_type": "PixArtDeltaControlNetLoader", "inputs": {"controlnet_name": FILES["controlnet"]}}
        p["11"] = {"class_type": "PixArtDeltaControlNetApply", "inputs": {"controlnet": ["10", 0], "vae": ["5", 0],
                   "image": ["9", 0], "strength": 1.0, "start": 0.0, "end": 1.0}}
        p["4"]["inputs"]["control"] = ["11", 0]
    return p


def run(prompt: dict):
    executor = harness.Executor(CLASSES)
    ui = executor.run(prompt)
    return executor, ui


# ------------------------------------------------------------------------------------------------ the V1 contract
@pytest.mark.parametrize("name", sorted(NODE_CLASS_MAPPINGS))
def test_every_node_follows_the_contract(name):
    cls = NODE_CLASS_MAPPINGS[name]
    assert name.startswith("PixArtDelta") and name not in TAKEN
    delta_only = ("LCMSampler", "ControlNet", "HED")  # "PixArt-δ" only where δ is meant, "PixArt" elsewhere
    prefix = "PixArt-δ " if any(part in name for part in delta_only) else "PixArt "
    assert NODE_DISPLAY_NAME_MAPPINGS[name].startswith(prefix)
    assert cls.CATEGORY in ("PixArt/loaders", "PixArt/conditioning", "PixArt/latent", "PixArt/sampling",
                            "PixArt/controlnet")  # one menu; the display name marks what is δ only
    assert isinstance(cls.DESCRIPTION, str) and len(cls.DESCRIPTION) > 40
    assert callable(getattr(cls, cls.FUNCTION))
    assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES)
    inputs = cls.INPUT_TYPES()
    assert set(inputs) <= {"required", "optional", "hidden"}
    for category in ("required", "optional"):
        for input_name, spec in inputs.get(category, {}).items():
            options = spec[1] if len(spec) > 1 else {}
            assert options.get("tooltip"), f"{name}.{input_name} has no tooltip"
            if isinstance(spec[0], list) and "default" in options:
                assert options["default"] in spec[0]
            if spec[0] in ("INT", "FLOAT"):
                assert options["min"] <= options["default"] <= options["max"]
    for kind in cls.RETURN_TYPES:
        assert kind in ("LATENT", "IMAGE", "INT", "STRING") or kind.startswith("PIXART_")


def test_pack_loads_the_way_comfyui_loads_it():
    """spec_from_file_location on the folder's __init__.py, under ComfyUI's module name, while a top-level `nodes`
    module (ComfyUI's own nodes.py) already exists: our package must not import or shadow it."""
    code = textwrap.dedent(f"""
        import importlib.util, sys, types
        comfy_nodes = types.ModuleType("nodes"); comfy_nodes.COMFY = True
        sys.modules["nodes"] = comfy_nodes
        path = {str(ROOT)!r}
        name = path.replace(".", "_x_")
        spec = importlib.util.spec_from_file_location(name, path + "/__init__.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        assert sys.modules["nodes"] is comfy_nodes
        print(sorted(module.NODE_CLASS_MAPPINGS), sorted(module.NODE_DISPLAY_NAME_MAPPINGS))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert str(sorted(NODE_CLASS_MAPPINGS)) in out.stdout


def test_layout_run_time_packages_import_no_training_code_and_only_the_bridge_imports_comfyui():
    """pixart_core and pixart_nodes run without train/ (the packaging need not ship it), and ComfyUI is imported in
    pixart_nodes/comfy_bridge.py only."""
    import re

    sources = sorted((ROOT / "pixart_core").rglob("*.py")) + sorted((ROOT / "pixart_nodes").rglob("*.py"))
    imports_train = re.compile(r"^\s*(from\s+train\b|import\s+train\b)", re.M)
    imports_comfy = re.compile(r"^\s*(from\s+comfy(\.|\s)|import\s+comfy(\.|\s|$)|from\s+(folder_paths|"
                               r"latent_preview|nodes|comfy_api|comfy_execution|node_helpers)\b|import\s+"
                               r"(folder_paths|latent_preview|nodes|comfy_api|comfy_execution|node_helpers)\b)", re.M)
    assert [p for p in sources if imports_train.search(p.read_text())] == []
    assert [p.relative_to(ROOT).as_posix() for p in sources if imports_comfy.search(p.read_text())] == \
        ["pixart_nodes/comfy_bridge.py"]


def test_layout_models_never_import_the_loaders():
    """pixart_core/loading/ reads files into the models; the modules that make an image (and the model modules the
    loaders fill) never import it, not even through another module (a fresh interpreter checks)."""
    models = ["config", "transformer", "controlnet", "hed", "text_encoder", "vae", "vae_tiling", "schedule", "samplers",
              "guidance", "step_cache", "resolution", "quantize"]
    code = ("import sys\n" + "".join(f"import pixart_core.{m}\n" for m in models)
            + "print(sorted(m for m in sys.modules if m.startswith('pixart_core.loading')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------------ ComfyUI's types
def test_latent_and_image_are_comfyuis_own(env):
    """LATENT holds the VAE's raw latent (ComfyUI scales inside its models): the sampler's latent decoded the way
    ComfyUI's native VAEDecode does (the diffusers VAE on the raw latent) equals our tiled decode; our encode equals
    the VAE's posterior mean; IMAGE is [B, H, W, 3] float32 in 0..1 on the CPU."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    executor, _ = run(text_to_image())
    latent = executor.last_results["4"][0]
    image = executor.last_results["6"][0]
    assert set(latent) == {"samples"} and latent["samples"].shape == (1, 4, 8, 8)
    assert latent["samples"].dtype == torch.float32 and latent["samples"].device.type == "cpu"
    assert image.shape == (1, 64, 64, 3) and image.dtype == torch.float32 and image.device.type == "cpu"
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0

    vae = AutoencoderKL(block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=32)
    vae.load_state_dict(load_file(str(env / harness.TINY_FILES["sd_vae"])))
    with torch.no_grad():
        native = (vae.decode(latent["samples"]).sample / 2 + 0.5).clamp(0, 1).movedim(1, -1)
        assert torch.allclose(image, native, atol=2e-4)
        encoder = NODE_CLASS_MAPPINGS["PixArtDeltaVAEEncodeTiled"]()
        ours = encoder.encode(image, executor.last_results["5"][0], 0)[0]["samples"]
        assert torch.allclose(ours, vae.encode(image.movedim(-1, 1) * 2 - 1).latent_dist.mean, atol=2e-4)


def test_sampler_takes_a_native_empty_latent_and_keeps_its_extra_keys(env):
    prompt = text_to_image(sampler="dpmpp_2m")
    executor, _ = run(prompt)
    model, cond = executor.last_results["1"][0], executor.last_results["3"][0]
    native_empty = {"samples": torch.zeros(2, 4, 8, 12), "batch_index": [3, 4]}  # EmptyLatentImage 96x64, batch 2
    out = NODE_CLASS_MAPPINGS["PixArtDeltaSampler"]().sample(model, cond, native_empty, 5, 2, 4.5, "euler", 1.0)[0]
    assert out["samples"].shape == (2, 4, 8, 12) and out["batch_index"] == [3, 4]
    # image k of a batch uses seed + k: the second image alone with seed 6 is the same
    single = NODE_CLASS_MAPPINGS["PixArtDeltaSampler"]().sample(model, cond, {"samples": torch.zeros(1, 4, 8, 12)},
                                                                 6, 2, 4.5, "euler", 1.0)[0]
    difference = (out["samples"][1:] - single["samples"]).abs().max()
    assert difference <= 1e-5 * single["samples"].abs().max()  # float rounding of a batch of 2 vs 1


# ------------------------------------------------------------------------------------------------ loading, cache
def test_loader_reports_what_it_detected_and_second_run_reuses_models(env):
    model_cache.clear_all()
    before = (model_cache.TRANSFORMERS.loads, model_cache.TEXT_ENCODERS.loads, model_cache.VAES.loads)
    executor, ui = run(text_to_image(model=FILES["alpha"], sampler="dpmpp_2m"))
    info = executor.last_results["1"][1]
    assert "PixArt-α" in info and "256 px" in info and "text length 120" in info and "micro-conditions: yes" in info
    loads = (model_cache.TRANSFORMERS.loads, model_cache.TEXT_ENCODERS.loads, model_cache.VAES.loads)
    assert [a - b for a, b in zip(loads, before)] == [1, 1, 1]
    run(text_to_image(model=FILES["alpha"], sampler="dpmpp_2m"))
    assert (model_cache.TRANSFORMERS.loads, model_cache.TEXT_ENCODERS.loads, model_cache.VAES.loads) == loads
    # a different setting is a different model
    prompt = text_to_image(model=FILES["alpha"], sampler="dpmpp_2m")
    prompt["1"]["inputs"]["precision"] = "bf16"
    executor, _ = run(prompt)
    assert model_cache.TRANSFORMERS.loads == loads[0] + 1
    assert "precision bf16 (bfloat16)" in executor.last_results["1"][1]
    assert executor.last_results["1"][0].module.dtype == torch.bfloat16


def test_text_encode_keeps_no_embedding_behind_comfyuis_back(env):
    """ComfyUI's executor keeps the encode node's output; the core keeps nothing more: the node's T5 has no prompt
    cache, so encoding the same prompt again runs T5 again (nothing was kept), and what it returned is freed once
    the caller drops it."""
    import gc
    import weakref

    executor, _ = run(text_to_image(model=FILES["alpha"], sampler="dpmpp_2m"))
    t5, model = executor.last_results["2"][0], executor.last_results["1"][0]
    assert t5.module.cache is None
    runs, forward = [], t5.module.model.forward
    t5.module.model.forward = lambda *a, **k: runs.append(1) or forward(*a, **k)
    node = NODE_CLASS_MAPPINGS["PixArtDeltaT5TextEncode"]()
    try:
        first = node.encode(t5, "a cat", "", 0, model)[0]
        again = node.encode(t5, "a cat", "", 0, model)[0]
    finally:
        t5.module.model.forward = forward
    assert len(runs) == 4 and torch.equal(first.embeds, again.embeds)  # prompt and negative, twice
    gone = [weakref.ref(t) for t in (first.embeds, first.negative_embeds)]
    del first
    gc.collect()
    assert [ref() for ref in gone] == [None, None]


def test_resolution_node_gives_the_models_own_bins(env):
    executor, _ = run(text_to_image(model=FILES["alpha"], sampler="dpmpp_2m"))
    model = executor.last_results["1"][0]
    select = NODE_CLASS_MAPPINGS["PixArtDeltaResolutionSelect"]()
    assert select.select(model, "1:1") == (256, 256)
    assert select.select(model, "16:9") == (336, 192)  # a quarter of the 1024 bin "0.57": [h 768, w 1344]
    assert select.select(model, "9:16") == (192, 336)
    assert select.select(model, "1:4") == select.select(model, "4.0")  # the closest bin
    # workflows saved before the W:H labels hold height / width decimals: they still pass validation and select
    assert select.select(model, "1.0") == (256, 256) and select.select(model, "0.57") == (336, 192)
    assert type(select).VALIDATE_INPUTS(aspect_ratio="0.57") is True
    assert type(select).VALIDATE_INPUTS(aspect_ratio="16:9") is True
    assert "pick one" in type(select).VALIDATE_INPUTS(aspect_ratio="wide")


# ------------------------------------------------------------------------------------------------ Cancel, progress
def test_cancel_stops_sampling_at_the_next_model_evaluation(env, monkeypatch):
    executor, _ = run(text_to_image())
    model, cond = executor.last_results["1"][0], executor.last_results["3"][0]
    calls = []
    original = type(model.module).forward

    def forward(self, *args, **kwargs):
        calls.append(1)
        bridge.request_interrupt()  # the user presses Cancel while step 1 runs
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(model.module), "forward", forward)
    with pytest.raises(bridge.Interrupted):
        NODE_CLASS_MAPPINGS["PixArtDeltaLCMSampler"]().sample(model, cond, 1, 4, 64, 64, 1, 1.0)
    assert len(calls) == 1
    bridge.request_interrupt(False)


def test_progress_reaches_the_number_of_steps(env, monkeypatch):
    bars = []

    class Bar:
        def __init__(self, total):
            self.total, self.values = total, []
            bars.append(self)

        def update_absolute(self, value, total=None, preview=None):
            self.values.append((value, total))

    monkeypatch.setattr(bridge, "progress_bar", Bar)
    run(text_to_image(sampler="dpmpp_2m"))
    sampler_bar = next(b for b in bars if b.total == 2)
    assert sampler_bar.values == [(1, 2), (2, 2)]


# ------------------------------------------------------------------------------------------------ bad input
def test_missing_file_says_where_to_put_it(env):
    prompt = text_to_image(model="PixArt-Sigma-XL-2-1024-MS-missing.pth")
    with pytest.raises(harness.PromptRejected) as err:
        harness.Executor(CLASSES).run(prompt)
    [error] = err.value.node_errors["1"]["errors"]
    assert error["type"] == "custom_validation_failed"
    assert "models/diffusion_models or models/checkpoints" in error["details"]
    assert "PixArt-Sigma-XL-2-1024-MS-missing.pth" in error["details"] and "refresh" in error["details"]
    # the same message when a prompt skips validation (e.g. a file deleted after queuing)
    with pytest.raises(PixArtError, match="was not found in models/diffusion_models"):
        NODE_CLASS_MAPPINGS["PixArtDeltaTransformerLoader"]().load("gone.pth", "auto", "auto", "auto", "auto")


def test_validate_inputs_keeps_comfyuis_other_checks(env):
    """VALIDATE_INPUTS names only the file input, so ComfyUI still checks the other combos and ranges."""
    prompt = text_to_image()
    prompt["1"]["inputs"]["precision"] = "int9"
    prompt["4"]["inputs"]["steps"] = 0
    with pytest.raises(harness.PromptRejected) as err:
        harness.Executor(CLASSES).run(prompt)
    kinds = {n: [e["type"] for e in v["errors"]] for n, v in err.value.node_errors.items()}
    assert kinds == {"1": ["value_not_in_list"], "4": ["value_smaller_than_min"]}


def test_size_off_the_16_px_grid_is_explained(env):
    with pytest.raises(harness.ExecutionError) as err:
        run(text_to_image(width=1000, height=64))
    assert isinstance(err.value.exception, PixArtError)
    message = err.value.exception_message
    assert "multiples of 16" in message and "1000x64" in message and "992" in message
    with pytest.raises(PixArtError, match="multiples of 16"):
        NODE_CLASS_MAPPINGS["PixArtDeltaEmptyLatent"]().make(1000, 1024, 1)


def test_alpha_controlnet_on_a_sigma_model_is_refused_with_the_reason(env):
    with pytest.raises(harness.ExecutionError) as err:
        run(text_to_image(model=FILES["sigma"], sampler="dpmpp_2m", vae=FILES["sdxl_vae"], control=True))
    message = err.value.exception_message
    assert err.value.node_type == "PixArtDeltaSampler" and isinstance(err.value.exception, PixArtError)
    assert "PixArt-α" in message and "PixArt-Σ" in message and "latent" in message


def test_controlnet_runs_on_an_alpha_model_as_the_core_does(env):
    """The node graph gives exactly what the core gives for the same control image bound by hand, and strength 0
    gives exactly the uncontrolled image."""
    from pixart_core.controlnet import prepare_control_image
    from pixart_core.pipeline import generate_latents

    plain, _ = run(text_to_image(model=FILES["alpha"], sampler="dpmpp_2m"))
    controlled, _ = run(text_to_image(model=FILES["alpha"], sampler="dpmpp_2m", control=True))
    model, cond = controlled.last_results["1"][0], controlled.last_results["3"][0]
    control = controlled.last_results["11"][0][0]
    image = prepare_control_image(control.image[..., :3].movedim(-1, 1), 64, 64)
    hint = control.controlnet.module.bind(model.module, control.vae.module.encode(image, input="signed"))
    expected = generate_latents(model.module, cond.embeds, cond.mask, negative_embeds=cond.negative_embeds,
                                negative_mask=cond.negative_mask, width=64, height=64, sampler="dpmpp_2m", steps=2,
                                guidance_scale=4.5, seed=1, binning=False, controls=[hint]).latents
    got = controlled.last_results["4"][0]["samples"]
    assert torch.equal(got, expected / model.config.latent_scale)
    off = text_to_image(model=FILES["alpha"], sampler="dpmpp_2m", control=True)
    off["11"]["inputs"]["strength"] = 0.0
    assert torch.equal(run(off)[0].last_results["4"][0]["samples"], plain.last_results["4"][0]["samples"])
    assert not torch.equal(got, plain.last_results["4"][0]["samples"])


def test_start_after_end_is_explained(env):
    with pytest.raises(PixArtError, match="start"):
        NODE_CLASS_MAPPINGS["PixArtDeltaControlNetApply"]().apply(None, None, torch.zeros(1, 8, 8, 3), 1.0, 0.8, 0.2)


def test_tiny_models_have_the_official_names_and_layouts(env):
    """What the real-ComfyUI test and the workflows load: each file as it is released, heads 72 wide as in XL-2."""
    from safetensors.torch import load_file

    def pth(key):
        return torch.load(env / harness.TINY_FILES[key], map_location="cpu", weights_only=True)

    for key in ("alpha", "sigma", "sigma_2k"):  # original .pth: {"state_dict": ...}, fused qkv, y_embedding
        state = pth(key)["state_dict"]
        width = state["blocks.0.attn.proj.weight"].shape[0]
        assert state["blocks.0.attn.qkv.weight"].shape == (3 * width, width) and "y_embedder.y_embedding" in state
        assert width == 2 * 72, width  # two heads of 72
    lcm = load_file(env / harness.TINY_FILES["lcm"])  # diffusers' transformer file, renamed
    assert lcm["transformer_blocks.0.attn1.to_q.weight"].shape == (144, 144) and "adaln_single.linear.weight" in lcm
    controlnet = pth("controlnet")["state_dict"]  # α base + controlnet.N.copied_block / before_proj / after_proj
    assert "base_model.blocks.0.attn.qkv.weight" in controlnet and "controlnet.0.after_proj.weight" in controlnet
    assert {k for k in pth("hed")} >= {"norm", "block1.convs.0.weight", "block5.projection.weight"}
    t5 = load_file(env / harness.TINY_FILES["t5"])  # ComfyUI's t5xxl_fp16: transformers keys, fp16, shared.weight
    assert "shared.weight" in t5 and "encoder.block.0.layer.0.SelfAttention.q.weight" in t5
    assert "encoder.embed_tokens.weight" not in t5 and t5["shared.weight"].dtype == torch.float16
    sd_vae, sdxl_vae = (load_file(env / harness.TINY_FILES[k]) for k in ("sd_vae", "sdxl_vae"))
    assert "decoder.up_blocks.0.resnets.0.conv1.weight" in sd_vae  # diffusers' file renamed, as README says
    assert "decoder.up.0.block.0.conv1.weight" in sdxl_vae and sdxl_vae["encoder.mid.attn_1.q.weight"].ndim == 4
    assert {Path(v).name for v in harness.TINY_FILES.values()} >= {
        "PixArt-XL-2-1024-MS.pth", "PixArt-LCM-XL-2-1024-MS.safetensors", "PixArt-Sigma-XL-2-1024-MS.pth",
        "PixArt-XL-2-1024-ControlNet.pth", "ControlNetHED.pth", "t5xxl_fp16.safetensors", "sdxl_vae.safetensors"}


@pytest.mark.parametrize("start,end,words", [(0.8, 0.2, "start must be at most end"), (1.5, 1.0, "from 0 to 1"),
                                             (0.0, -0.1, "from 0 to 1")])
def test_controlnet_range_is_refused_at_queue_with_our_message(env, start, end, words):
    prompt = text_to_image(model=FILES["alpha"], sampler="dpmpp_2m", control=True)
    prompt["11"]["inputs"].update(start=start, end=end)
    with pytest.raises(harness.PromptRejected) as err:
        harness.Executor(CLASSES).validate(prompt)
    errors = err.value.node_errors["11"]["errors"]
    assert errors and all(e["type"] == "custom_validation_failed" and words in e["details"] for e in errors)


def test_wrong_file_in_a_loader_says_what_it_is(env):
    bad = NODE_CLASS_MAPPINGS["PixArtDeltaTransformerLoader"]()
    with pytest.raises(PixArtError, match="T5"):
        bridge_path = Path(env) / "diffusion_models" / "t5_in_the_wrong_folder.safetensors"
        bridge_path.write_bytes((Path(env) / harness.TINY_FILES["t5"]).read_bytes())
        try:
            bad.load(bridge_path.name, "auto", "auto", "auto", "auto")
        finally:
            bridge_path.unlink()


# ------------------------------------------------------------------------------------------------ the harness itself
def test_harness_rejects_what_comfyui_rejects(env):
    prompt = text_to_image()
    del prompt["3"]["inputs"]["prompt"]
    prompt["6"]["inputs"]["vae"] = ["1", 0]  # a PIXART_MODEL into a PIXART_VAE input
    with pytest.raises(harness.PromptRejected) as err:
        harness.Executor(CLASSES).run(prompt)
    kinds = {n: [e["type"] for e in v["errors"]] for n, v in err.value.node_errors.items()}
    assert kinds == {"3": ["required_input_missing"], "6": ["return_type_mismatch"]}
    assert err.value.error["type"] == "prompt_outputs_failed_validation"
    with pytest.raises(harness.PromptRejected, match="does not exist"):
        harness.Executor(CLASSES).run({"1": {"class_type": "NoSuchNode", "inputs": {}}})
    json.dumps(err.value.node_errors)  # the shape POST /prompt answers with


def test_controlnet_start_and_end_limit_where_it_acts(env):
    """start/end are fractions of the sampling steps: acting only in the second half of the steps gives neither the
    image without control nor the image with control throughout."""
    def latent(start=None, end=None):
        prompt = text_to_image(model=FILES["alpha"], sampler="dpmpp_2m", control=start is not None)
        if start is not None:
            prompt["11"]["inputs"].update(start=start, end=end)
        prompt["4"]["inputs"]["steps"] = 4
        return run(prompt)[0].last_results["4"][0]["samples"]

    none, full, late = latent(), latent(0.0, 1.0), latent(0.5, 1.0)
    assert (full - late).abs().max() > 1e-4 and (none - late).abs().max() > 1e-4


def test_stacked_controlnets_add_up(env):
    one = text_to_image(model=FILES["alpha"], sampler="dpmpp_2m", control=True)
    two = json.loads(json.dumps(one))
    two["12"] = {"class_type": "PixArtDeltaControlNetApply", "inputs": {"controlnet": ["10", 0], "vae": ["5", 0],
                 "image": ["9", 0], "strength": 0.5, "start": 0.0, "end": 1.0, "previous": ["11", 0]}}
    two["4"]["inputs"]["control"] = ["12", 0]
    a, b = run(one)[0].last_results, run(two)[0].last_results
    assert len(b["12"][0]) == 2 and b["12"][0][0] is b["11"][0][0]
    assert (a["4"][0]["samples"] - b["4"][0]["samples"]).abs().max() > 1e-4


def test_harness_keeps_the_validate_inputs_pitfalls(env):
    """As in ComfyUI: naming an input in VALIDATE_INPUTS switches off its min/max check (and a linked input arrives
    there as None); **kwargs switches off every built-in check."""
    seen = {}

    class Named:
        RETURN_TYPES, FUNCTION, OUTPUT_NODE = (), "go", True

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"a": ("INT", {"default": 0, "min": 0, "max": 5}),
                                 "b": ("INT", {"default": 0, "min": 0, "max": 5})},
                    "optional": {"image": ("IMAGE", {})}}

        @classmethod
        def VALIDATE_INPUTS(cls, a, image=None):
            seen.update(a=a, image=image)
            return True

        def go(self, a, b, image=None):
            return {"ui": {"a": [a]}}

    class Everything(Named):
        @classmethod
        def VALIDATE_INPUTS(cls, **kwargs):
            return True

    classes = {**CLASSES, "Named": Named, "Everything": Everything}
    image = {"class_type": "LoadImage", "inputs": {"image": "pixart_delta_example.png"}}
    ui = harness.Executor(classes).run({"1": {"class_type": "Named", "inputs": {"a": 99, "b": 1, "image": ["2", 0]}},
                                        "2": image})
    assert ui["1"] == {"a": [99]} and seen == {"a": 99, "image": None}
    with pytest.raises(harness.PromptRejected, match="bigger than max"):
        harness.Executor(classes).run({"1": {"class_type": "Named", "inputs": {"a": 1, "b": 99}}})
    assert harness.Executor(classes).run({"1": {"class_type": "Everything", "inputs": {"a": 99, "b": 99}}})


# ------------------------------------------------------------------------------------------------ speed and memory options
def test_sampler_step_cache_input_reaches_the_core(env, monkeypatch):
    """The optional step_cache combo: validated like any combo, off when absent (older workflows), and when on the
    core gets its mode name; with T-GATE the model runs the conditional batch alone after the gate."""
    from pixart_nodes import sampling
    from pixart_core.transformer import PixArtTransformer

    batches, forward = [], PixArtTransformer.forward
    seen_options = record_keyword(monkeypatch, sampling, "sample_batch", "step_cache")

    def spy_forward(self, x, *args, **kwargs):
        batches.append((x.shape[0], "cross_attn_hook" in kwargs, "block_hook" in kwargs))
        return forward(self, x, *args, **kwargs)

    monkeypatch.setattr(PixArtTransformer, "forward", spy_forward)

    def latent(cache, sampler="dpmpp_2m"):
        prompt = text_to_image(model=FILES["alpha"], sampler=sampler)
        prompt["4"]["inputs"]["steps"] = 4
        if cache is not None:
            prompt["4"]["inputs"]["step_cache"] = cache
        batches.clear()
        return run(prompt)[0].last_results["4"][0]["samples"]

    plain = latent(None)
    assert seen_options[-1] == "off" and batches == [(2, False, False)] * 4
    gated = latent("t-gate")
    assert seen_options[-1] == "t-gate"
    assert batches == [(2, True, False)] * 2 + [(1, True, False)] * 2  # CFG dropped after the gate (step 2 of 4)
    assert 0 < (gated - plain).norm() / plain.norm() < 0.05  # the bound of test_step_cache (measured 0.03%)
    latent("delta-dit", sampler="lcm")
    assert seen_options[-1] == "delta-dit" and batches == [(1, False, True)] * 4
    assert latent("T-GATE").equal(gated)  # the spelling workflows saved before one ASCII spelling: migrated
    latent("Δ-DiT", sampler="lcm")
    assert seen_options[-1] == "delta-dit"
    with pytest.raises(harness.PromptRejected) as err:
        latent("faster")
    assert [e["type"] for e in err.value.node_errors["4"]["errors"]] == ["custom_validation_failed"]
    assert "delta-dit" in err.value.messages()[0]


def _loader_and_latent(precision: str):
    """Text-to-image with the α tiny model loaded at `precision`: the loader's (model, info) and the sampled latent."""
    prompt = text_to_image(model=FILES["alpha"], sampler="dpmpp_2m")
    prompt["1"]["inputs"]["precision"] = precision
    executor, _ = run(prompt)
    return executor.last_results["1"], executor.last_results["4"][0]["samples"]


def test_loader_fp8_precision(env, monkeypatch):
    from pixart_core import quantize
    from pixart_core.quantize import FP8_DTYPE, Fp8Linear

    loader = NODE_CLASS_MAPPINGS["PixArtDeltaTransformerLoader"]()
    monkeypatch.setattr(quantize, "FP8_DTYPE", None)  # a torch build without float8
    with pytest.raises(PixArtError, match="fp8 weights need float8 support.*int8"):
        loader.load(FILES["alpha"], "fp8", "auto", "auto", "auto")
    monkeypatch.undo()
    if FP8_DTYPE is None:
        pytest.skip("this torch build has no float8_e4m3fn")

    (model, info), fp8 = _loader_and_latent("fp8")
    _, full = _loader_and_latent("auto")
    module = model.module
    assert module.quantization == "fp8" and "precision fp8" in info
    assert any(isinstance(m, Fp8Linear) for m in module.blocks.modules())
    assert module.blocks[0].attn.qkv.weight.dtype == FP8_DTYPE
    cosine = torch.nn.functional.cosine_similarity(fp8.flatten(), full.flatten(), dim=0)
    assert 0.995 < cosine and not torch.equal(fp8, full)  # test_quantize's bound (measured 0.99997)


def test_loader_int8_dynamic_precision(env):
    from pixart_core.quantize import Int8DynamicLinear

    (model, info), quantised = _loader_and_latent("int8-dynamic")
    _, full = _loader_and_latent("auto")
    assert model.module.quantization == "int8-dynamic" and "precision int8-dynamic" in info
    assert type(model.module.blocks[0].mlp.fc1) is Int8DynamicLinear
    cosine = torch.nn.functional.cosine_similarity(quantised.flatten(), full.flatten(), dim=0)
    assert 0.995 < cosine and not torch.equal(quantised, full)  # test_quantize's bound
