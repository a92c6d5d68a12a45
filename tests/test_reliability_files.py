"""Reliability of the loaders against bad files, driven through the nodes the way ComfyUI's executor runs them.

Every loader (transformer, T5, VAE, ControlNet, HED) gets: truncated and corrupted safetensors, a truncated and a
random-bytes .pth, an empty file, a pickle that would run code (refused, and proven not to run), each of the other
model types, a symlink loop, an empty models folder, and file names with path traversal sent through the API (only
names from ComfyUI's folder lists may load). Each must end in a PixArtError (or a rejected prompt) whose message names
the file and says what to do, never a raw torch / pickle / safetensors error.
"""

from __future__ import annotations

import builtins
import random
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pixart_nodes import NODE_CLASS_MAPPINGS
from pixart_nodes import comfy_bridge as bridge
from pixart_core.loading import bundled
from pixart_core.errors import PixArtError
from tests import comfy_harness as harness


class Sink:
    """A test-only output node that takes anything, so a prompt can end at a loader."""

    RETURN_TYPES, FUNCTION, OUTPUT_NODE, CATEGORY = (), "take", True, "test"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("*", {})}}

    def take(self, value):
        return {"ui": {"type": [type(value).__name__]}}


CLASSES = {**NODE_CLASS_MAPPINGS, **harness.NATIVE_NODES, "Sink": Sink}

# loader -> (node class, file input, models folder, other inputs, the tiny model that belongs there)
LOADERS = {
    "transformer": ("PixArtDeltaTransformerLoader", "model_name", "diffusion_models",
                    {"precision": "auto", "family": "auto", "train_resolution": "auto", "text_len": "auto"}, "lcm"),
    "t5": ("PixArtDeltaT5Loader", "t5_name", "text_encoders", {"precision": "fp32", "device": "auto"}, "t5"),
    "vae": ("PixArtDeltaVAELoader", "vae_name", "vae", {"kind": "auto", "precision": "auto"}, "sd_vae"),
    "controlnet": ("PixArtDeltaControlNetLoader", "controlnet_name", "controlnet", {}, "controlnet"),
    "hed": ("PixArtDeltaHEDPreprocessor", "hed_name", "controlnet", {"image": ["9", 0]}, "hed"),
}
FOLDERS = ("diffusion_models", "checkpoints", "text_encoders", "vae", "controlnet")
# raw library texts a user must never get instead of an explanation (torch's "re-run with weights_only=False" is
# advice to run the file's code)
RAW_ERRORS = ("Traceback", "_pickle.", "UnpicklingError", "will likely succeed", "size mismatch for")


def loader_prompt(loader: str, name: str) -> dict:
    cls, field, _, inputs, _ = LOADERS[loader]
    prompt = {"1": {"class_type": cls, "inputs": {field: name, **inputs}},
              "2": {"class_type": "Sink", "inputs": {"value": ["1", 0]}}}
    if loader == "hed":
        prompt["9"] = {"class_type": "LoadImage", "inputs": {"image": "pixart_delta_example.png"}}
    return prompt


def run_loader(loader: str, name: str):
    """Validate and run a prompt that loads `name`; returns the ui dict or raises the harness's error."""
    return harness.Executor(CLASSES).run(loader_prompt(loader, name))


def expect_user_error(loader: str, name: str, *needles: str) -> str:
    """The prompt passes validation (the name is in the list) and the loader raises a PixArtError naming the file."""
    with pytest.raises(harness.ExecutionError) as err:
        run_loader(loader, name)
    exc = err.value.exception
    message = str(exc)
    assert isinstance(exc, PixArtError), f"{loader} on {name}: raw {err.value.exception_type}: {message[:300]}"
    assert Path(name).name in message or Path(name).stem in message, message
    assert not any(raw in message for raw in RAW_ERRORS), message
    for needle in needles:
        assert needle.lower() in message.lower(), f"{needle!r} not in: {message}"
    return message


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return harness.write_tiny_models(tmp_path_factory.getbasetemp() / "tiny_models")


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny):
    """A models root holding the good tiny files plus, per loader, the bad ones written by the tests."""
    root = tmp_path_factory.mktemp("bad_models")
    for folder in FOLDERS:
        (root / folder).mkdir()
    for rel in harness.TINY_FILES.values():
        (root / rel).parent.mkdir(exist_ok=True)  # folders without a loader case here too (loras)
        shutil.copy(tiny / rel, root / rel)
    with harness.comfy_session(root, tmp_path_factory.mktemp("comfy_dirs_files"), 32):
        yield root


def good_file(root: Path, loader: str) -> Path:
    return root / harness.TINY_FILES[LOADERS[loader][4]]


def state_dict_of(path: Path) -> dict:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return obj.get("state_dict", obj)


def folder_of(root: Path, loader: str) -> Path:
    return root / LOADERS[loader][2]


# ------------------------------------------------------------------------------------------------ damaged files
@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_the_good_file_loads(env, loader):
    """The baseline the failures below are measured against: the same prompt with the right file runs."""
    ui = run_loader(loader, good_file(env, loader).name)
    assert ui["2"]["type"]


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_truncated_and_corrupted_safetensors(env, loader):
    folder = folder_of(env, loader)
    data_file = folder / f"{loader}_whole.safetensors"
    save_file({k: v.contiguous() for k, v in state_dict_of(good_file(env, loader)).items()}, str(data_file))
    whole = data_file.read_bytes()
    header_len = int.from_bytes(whole[:8], "little")
    cases = {
        "truncated": whole[: len(whole) // 2],  # an interrupted download
        "header_cut": whole[: 8 + header_len // 2],  # cut inside the JSON header
        "bad_header": whole[:8] + b"\xff" * 32 + whole[40:],  # bytes of the header overwritten
        "huge_header_length": (2**62).to_bytes(8, "little") + whole[8:],
        "empty": b"",
    }
    data_file.unlink()
    for case, data in cases.items():
        name = f"{loader}_{case}.safetensors"
        (folder / name).write_bytes(data)
        try:
            expect_user_error(loader, name)
        finally:
            (folder / name).unlink()


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_truncated_and_garbage_pth(env, loader):
    folder = folder_of(env, loader)
    buffer = folder / f"{loader}_whole.pth"
    torch.save({"state_dict": state_dict_of(good_file(env, loader))}, buffer)
    whole = buffer.read_bytes()
    buffer.unlink()
    garbage = b"\x00" + random.Random(0).randbytes(4095)  # fixed: a random first byte could be a pickle opcode
    cases = {"truncated": whole[: len(whole) // 2], "garbage": garbage, "empty": b""}
    for case, data in cases.items():
        name = f"{loader}_{case}.pth"
        (folder / name).write_bytes(data)
        try:
            message = expect_user_error(loader, name)
            if case != "empty":
                assert "run code" not in message or loader == "vae", f"a damaged file is not a code refusal: {message}"
        finally:
            (folder / name).unlink()


class _WritesMarker:
    """Unpickling this calls open(marker, "w"): the file appears only if the pickle's code runs."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (str(self.marker), "w"))


@pytest.mark.parametrize("loader", sorted(LOADERS))
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_pickle_that_runs_code_is_refused_and_never_runs(env, tmp_path, loader, zip_format):
    marker = tmp_path / f"payload_ran_{loader}"
    name = f"{loader}_payload_{'zip' if zip_format else 'legacy'}.pth"
    path = folder_of(env, loader) / name
    weights = dict(list(state_dict_of(good_file(env, loader)).items())[:3])
    torch.save({"state_dict": weights, "extra": _WritesMarker(marker)}, path, _use_new_zipfile_serialization=zip_format)
    try:
        message = expect_user_error(loader, name, "refused")
        assert "safetensors" in message
        assert not marker.exists(), "the pickle's code ran"
        # the payload is real: the unsafe way of opening the file runs it
        torch.load(path, map_location="cpu", weights_only=False)
        assert marker.exists()
    finally:
        path.unlink()


# what each loader says when given each other kind of model
WRONG_TYPE_WORDS = {
    "transformer": {"t5": "T5", "sd_vae": "VAE", "hed": "not a PixArt transformer"},
    "t5": {"lcm": "not a T5", "sd_vae": "not a T5", "controlnet": "not a T5", "hed": "not a T5"},
    "vae": {"lcm": "PixArt transformer", "t5": "text encoder", "controlnet": "PixArt transformer", "hed": "not a VAE"},
    "controlnet": {"lcm": "no ControlNet", "alpha": "no ControlNet", "t5": "no ControlNet", "sd_vae": "no ControlNet",
                   "hed": "no ControlNet"},
    "hed": {"lcm": "not the HED", "t5": "not the HED", "sd_vae": "not the HED", "controlnet": "not the HED"},
}


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_wrong_model_type_says_what_the_file_is(env, loader):
    folder = folder_of(env, loader)
    for other, words in WRONG_TYPE_WORDS[loader].items():
        source = env / harness.TINY_FILES[other]
        name = f"wrong_{other}{source.suffix}"
        shutil.copy(source, folder / name)
        try:
            expect_user_error(loader, name, words)
        finally:
            (folder / name).unlink()


def test_combined_controlnet_file_also_loads_as_its_base_transformer(env):
    """Not an error: the released ControlNet .pth holds its α base, which the transformer loader takes (README)."""
    name = "PixArt-XL-2-1024-ControlNet.pth"
    shutil.copy(env / harness.TINY_FILES["controlnet"], env / "diffusion_models" / name)
    try:
        executor = harness.Executor(CLASSES)
        executor.run(loader_prompt("transformer", name))
        loaded = executor.last_results["1"][0].module.state_dict()
    finally:
        (env / "diffusion_models" / name).unlink()
    from pixart_core.loading.checkpoint import load_transformer

    base = load_transformer(env / harness.TINY_FILES["alpha"]).state_dict()  # the α model the file was built on
    assert loaded.keys() == base.keys() and all(torch.equal(loaded[k], base[k]) for k in base)


# ------------------------------------------------------------------------------------------------ links, folders
@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_symlink_loop_is_a_clear_error(env, loader):
    folder = folder_of(env, loader)
    a, b = folder / f"{loader}_loop_a.safetensors", folder / f"{loader}_loop_b.safetensors"
    a.symlink_to(b)
    b.symlink_to(a)
    try:
        assert a.name in bridge.list_models(LOADERS[loader][2])  # listed, as ComfyUI lists it
        expect_user_error(loader, a.name, "link")
    finally:
        a.unlink()
        b.unlink()


def test_folder_symlink_loops_do_not_hang_the_file_list(env):
    """Two links back to their own folder double the listing at every level of a naive walk (the page asks for the
    lists on every load); each real folder is listed once."""
    folder = env / "vae"
    links = [folder / "loop1", folder / "loop2", folder / "sub"]
    (folder / "sub_real").mkdir()
    links[0].symlink_to(folder)
    links[1].symlink_to(folder)
    links[2].symlink_to(folder / "sub_real")
    (folder / "sub_real" / "inner.safetensors").write_bytes(b"")
    try:
        start = time.perf_counter()
        names = NODE_CLASS_MAPPINGS["PixArtDeltaVAELoader"].INPUT_TYPES()["required"]["vae_name"][0]
        assert time.perf_counter() - start < 2.0
        assert "sd-vae-ft-ema.safetensors" in names and "sdxl_vae.safetensors" in names
        assert not any(n.startswith(("loop1/", "loop2/")) for n in names)
        assert "sub_real/inner.safetensors" in names or "sub/inner.safetensors" in names
    finally:
        for link in links:
            link.unlink()
        shutil.rmtree(folder / "sub_real")


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_empty_models_folder_says_where_to_put_the_file(env, tmp_path, loader):
    empty = tmp_path / "models"
    for folder in FOLDERS:
        (empty / folder).mkdir(parents=True)
    bridge.set_models_root(empty)
    try:
        cls, field, folder, _, good = LOADERS[loader]
        # only the bundled PixArt-nano models of that kind remain listed (the HED detector has none)
        expected = [] if loader == "hed" else list(bundled.loader_entries(folder))
        assert NODE_CLASS_MAPPINGS[cls].INPUT_TYPES()["required"][field][0] == expected
        with pytest.raises(harness.PromptRejected) as err:
            run_loader(loader, Path(harness.TINY_FILES[good]).name)
        [error] = err.value.node_errors["1"]["errors"]
        assert f"models/{folder}" in error["details"] and "not found" in error["details"]
    finally:
        bridge.set_models_root(env)


# ------------------------------------------------------------------------------------------------ path traversal
def traversal_names(env: Path, loader: str) -> list[str]:
    good = good_file(env, loader)
    outside = env.parent / f"outside_{loader}{good.suffix}"
    shutil.copy(good, outside)  # a real model file outside the folder list: loading it would "work"
    return [
        "../../../../../../etc/passwd",
        "/etc/passwd",
        str(outside),  # absolute path to a loadable file
        f"../{outside.name}",  # relative path out of the folder
        f"../../{env.parent.name}/{outside.name}",
        f"{good.parent.name}/../{good.name}",  # stays inside, but is not a listed name
        good.name + ".txt",  # not a model file
        "",
    ]


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_path_traversal_through_the_api_is_rejected(env, loader):
    """Names arrive from POST /prompt. The loaders name their file input in VALIDATE_INPUTS, which switches off
    ComfyUI's own 'value not in list' check, so the pack must do that check itself, and again when the node runs
    (a prompt can reach the node without the validation: a file removed after queuing, a workflow run by script)."""
    cls, field, _, inputs, _ = LOADERS[loader]
    node = NODE_CLASS_MAPPINGS[cls]
    for name in traversal_names(env, loader):
        with pytest.raises(harness.PromptRejected) as err:
            run_loader(loader, name)
        [error] = err.value.node_errors["1"]["errors"]
        assert error["type"] == "custom_validation_failed"
        assert "models/" in error["details"]
        with pytest.raises(PixArtError) as direct:
            kwargs = {field: name, **inputs}
            if loader == "hed":
                kwargs["image"] = torch.rand(1, 16, 16, 3)
            getattr(node(), node.FUNCTION)(**kwargs)
        if name and (name.startswith("/") or ".." in name):
            assert "refused" in str(direct.value) or "not found" in str(direct.value)


def test_validation_rejects_names_not_in_the_folder_list(env):
    """The same rule on every file input: listed names pass, anything else is refused by VALIDATE_INPUTS."""
    for loader, (cls, field, folder, _, good) in LOADERS.items():
        node = NODE_CLASS_MAPPINGS[cls]
        listed = node.INPUT_TYPES()["required"][field][0]
        name = Path(harness.TINY_FILES[good]).name
        assert name in listed
        assert node.VALIDATE_INPUTS(**{field: name}) is True
        message = node.VALIDATE_INPUTS(**{field: str(env / folder / name)})
        assert isinstance(message, str) and "refused" in message
