"""The example workflows: the files on disk are what workflows/build.py makes, every UI file converts to exactly its
API twin under the frontend's rules, and every API workflow runs through the node classes (ComfyUI's validation and
dependency order, tests/comfy_harness.py) on tiny models written under the official file names."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image

from pixart_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from tests import comfy_harness as harness
from tests.ui_to_api import ui_to_api
from workflows import build

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
NAMES = [make().name for make in build.WORKFLOWS]
CLASSES = {**NODE_CLASS_MAPPINGS, **harness.NATIVE_NODES}
DISPLAY = {**NODE_DISPLAY_NAME_MAPPINGS, **harness.NATIVE_DISPLAY_NAMES}

TEST_SIZE = 64  # px: the size widgets are shrunk to, so a run takes a moment
TEST_STEPS = 6  # DPM-Solver++ 2M still runs its second-order updates
TEST_TILE = 128  # px: the 512 px decode of the 2K -> 4K workflow runs on 4 tiles

# Each workflow's SaveImage / PreviewImage outputs on the tiny models: (width, height) of every image written.
# The tiny transformers were "trained at 256 px", so the resolution node picks 256 px bins.
EXPECTED = {
    "pixart_nano_lcm": {"SaveImage": (64, 64)},  # the bundled PixArt-nano (models/nano), not a tiny stand-in
    "pixart_delta_lcm_1024": {"SaveImage": (64, 64)},
    "pixart_alpha_1024_dpmpp": {"SaveImage": (256, 256)},
    "pixart_sigma_2k_to_4k": {"SaveImage": (512, 512)},
    "pixart_delta_controlnet_hed_lcm": {"SaveImage": (64, 64), "PreviewImage": (64, 64)},
    "pixart_sigma_low_memory_int8": {"SaveImage": (256, 256)},
    "pixart_alpha_img2img": {"SaveImage": (64, 64)},
    "pixart_alpha_inpaint": {"SaveImage": (64, 64)},
    "pixart_sigma_lora": {"SaveImage": (256, 256)},
}


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    models = harness.write_tiny_models(tmp_path_factory.getbasetemp() / "tiny_models")
    work = tmp_path_factory.mktemp("comfy_dirs")
    with harness.comfy_session(models, work, TEST_SIZE, build.EXAMPLE_IMAGE):
        harness.example_input(work / "input", build.INPAINT_IMAGE, TEST_SIZE)
        yield work


def shrink(prompt: dict) -> dict:
    """Small sizes for the test run (the workflow's own values stay in the files)."""
    prompt = json.loads(json.dumps(prompt))
    for node in prompt.values():
        inputs = node["inputs"]
        for name in ("width", "height"):
            if isinstance(inputs.get(name), int):
                inputs[name] = TEST_SIZE
        if "tile_size" in inputs:
            inputs["tile_size"] = TEST_TILE
        if node["class_type"] == "PixArtDeltaSampler":
            inputs["steps"] = min(inputs["steps"], TEST_STEPS)
    return prompt


def test_files_are_what_build_py_makes(tmp_path):
    written = build.write(tmp_path)
    assert len(written) == 2 * len(NAMES) + 2
    for path in written:
        if path.suffix == ".json":
            rel = path.relative_to(tmp_path)
            assert load(WORKFLOWS / rel) == load(path), f"{rel} is stale: run python workflows/build.py"
    for image in (build.EXAMPLE_IMAGE, build.INPAINT_IMAGE):
        assert (WORKFLOWS / "input" / image).is_file()


@pytest.mark.parametrize("name", NAMES)
def test_ui_file_converts_to_its_api_twin(name):
    ui = load(WORKFLOWS / f"{name}.json")
    api = load(WORKFLOWS / "api" / f"{name}.json")
    assert ui_to_api(ui, CLASSES, DISPLAY) == api
    assert ui["version"] == 0.4 and ui["extra"]["frontendVersion"].startswith("1.")
    assert {n["type"] for n in ui["nodes"]} - {"Note"} == {n["class_type"] for n in api.values()}


@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_runs_on_tiny_models(env, name):
    assert run_and_measure(shrink(load(WORKFLOWS / "api" / f"{name}.json")), name) == EXPECTED[name]


def run_and_measure(prompt: dict, name: str) -> dict:
    """Run an API prompt; {node type: (width, height) of its first image}, after checking no image is flat."""
    outputs = harness.Executor(CLASSES).run(prompt)
    sizes: dict[str, list] = {}
    for node_id, ui in outputs.items():
        kind = prompt[node_id]["class_type"]
        for image in ui["images"]:
            folder = harness.Directories.output if image["type"] == "output" else harness.Directories.temp
            with Image.open(Path(folder) / image["filename"]) as img:
                sizes.setdefault(kind, []).append(img.size)
                pixels = torch.tensor(list(img.getdata()), dtype=torch.float32)
                assert pixels.std() > 0, f"{name}: {kind} wrote a flat image"
    return {k: v[0] for k, v in sizes.items()}


# ------------------------------------------------------------------------------------------------ saved before issue #20
OLD_COMMIT = "3d3ec73"  # the workflows as users saved them before display names, step-cache spelling and W:H labels
OLD_NAMES = sorted(set(NAMES) - {"pixart_nano_lcm", "pixart_alpha_inpaint", "pixart_sigma_lora"})  # newer than that commit


def old_file(rel: str) -> dict:
    try:
        done = subprocess.run(["git", "show", f"{OLD_COMMIT}:{rel}"], cwd=ROOT, capture_output=True, text=True,
                              check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"git history with {OLD_COMMIT} is not available here")
    return json.loads(done.stdout)


@pytest.mark.parametrize("name", OLD_NAMES)
def test_workflows_saved_before_issue_20_still_load_and_run(env, name):
    ui, api = old_file(f"workflows/{name}.json"), old_file(f"workflows/api/{name}.json")
    converted = ui_to_api(ui, CLASSES, DISPLAY)  # the widget values still line up with today's widgets
    assert {k: v["inputs"] for k, v in converted.items()} == {k: v["inputs"] for k, v in api.items()}
    assert run_and_measure(shrink(api), name) == EXPECTED[name]


# ------------------------------------------------------------------------------------------------ the frontend's rules
def _ui(nodes: list[dict], links: list[list]) -> dict:
    return {"last_node_id": len(nodes), "last_link_id": len(links), "nodes": nodes, "links": links, "groups": [],
            "config": {}, "extra": {}, "version": 0.4}


def _node(node_id, kind, widgets=None, inputs=(), outputs=(), mode=0, title=None):
    node = {"id": node_id, "type": kind, "pos": [0, 0], "size": [100, 100], "flags": {}, "order": node_id,
            "mode": mode, "inputs": [{"name": n, "type": t, "link": link} for n, t, link in inputs],
            "outputs": [{"name": n, "type": t, "links": links} for n, t, links in outputs], "properties": {}}
    if widgets is not None:
        node["widgets_values"] = widgets
    if title:
        node["title"] = title
    return node


def test_bypassed_nodes_pass_their_matching_input_through_and_muted_nodes_drop_links():
    lcm_widgets = [7, "fixed", 4, 64, 64, 1, 1.0, "off"]
    ui = _ui([
        _node(1, "LoadImage", ["photo.png", "image"], outputs=[("IMAGE", "IMAGE", [1, 3]), ("MASK", "MASK", None)]),
        _node(2, "PixArtDeltaHEDPreprocessor", ["ControlNetHED.pth"], inputs=[("image", "IMAGE", 1)],
              outputs=[("edges", "IMAGE", [2])], mode=4),
        _node(3, "SaveImage", ["x"], inputs=[("images", "IMAGE", 2)], title="My save"),
        _node(4, "Reroute", inputs=[("", "*", 3)], outputs=[("", "IMAGE", [4])]),
        _node(5, "PreviewImage", inputs=[("images", "IMAGE", 4)], mode=2),
        _node(6, "Note", ["a note"]),
        _node(7, "PixArtDeltaLCMSampler", lcm_widgets,
              inputs=[("model", "PIXART_MODEL", None), ("conditioning", "PIXART_CONDITIONING", None),
                      ("latent", "LATENT", None), ("control", "PIXART_CONTROL", 5)]),
        _node(8, "PixArtDeltaControlNetApply", [1.0, 0.0, 1.0], mode=2,
              inputs=[("controlnet", "PIXART_CONTROLNET", None), ("vae", "PIXART_VAE", None),
                      ("image", "IMAGE", None)], outputs=[("control", "PIXART_CONTROL", [5])]),
    ], [[1, 1, 0, 2, 0, "IMAGE"], [2, 2, 0, 3, 0, "IMAGE"], [3, 1, 0, 4, 0, "IMAGE"], [4, 4, 0, 5, 0, "IMAGE"],
        [5, 8, 0, 7, 3, "PIXART_CONTROL"]])
    api = ui_to_api(ui, CLASSES, DISPLAY)
    assert set(api) == {"1", "3", "7"}  # bypassed 2, muted 5 and 8, virtual 4 and 6 are gone
    assert api["1"]["inputs"] == {"image": "photo.png"}  # the upload button's "image" is not sent
    assert api["3"] == {"inputs": {"filename_prefix": "x", "images": ["1", 0]}, "class_type": "SaveImage",
                        "_meta": {"title": "My save"}}
    assert api["7"]["inputs"] == {"seed": 7, "steps": 4, "width": 64, "height": 64, "batch_size": 1, "denoise": 1.0,
                                 "step_cache": "off"}
    assert api["7"]["_meta"]["title"] == "PixArt-δ LCM Sampler"


def test_bypass_without_a_matching_input_drops_the_link_and_bad_widget_counts_are_refused():
    from tests.ui_to_api import ConversionError

    ui = _ui([
        _node(1, "PixArtDeltaVAELoader", ["v.safetensors", "auto", "auto"], outputs=[("vae", "PIXART_VAE", [1])]),
        _node(2, "PixArtDeltaVAEEncodeTiled", [0], mode=4, inputs=[("pixels", "IMAGE", None), ("vae", "PIXART_VAE", 1)],
              outputs=[("latent", "LATENT", [2])]),
        _node(3, "PixArtDeltaVAEDecodeTiled", ["auto", 0],
              inputs=[("samples", "LATENT", 2), ("vae", "PIXART_VAE", 3)]),
    ], [[1, 1, 0, 2, 1, "PIXART_VAE"], [2, 2, 0, 3, 0, "LATENT"], [3, 1, 0, 3, 1, "PIXART_VAE"]])
    api = ui_to_api(ui, CLASSES, DISPLAY)
    assert api["3"]["inputs"] == {"mode": "auto", "tile_size": 0, "vae": ["1", 0]}  # no LATENT input to pass on
    ui["nodes"][2]["widgets_values"] = ["auto"]
    with pytest.raises(ConversionError, match="1 widget values for 2 widgets"):
        ui_to_api(ui, CLASSES, DISPLAY)
