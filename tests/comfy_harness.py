"""A small stand-in for ComfyUI's executor: validate an API-format prompt the way ComfyUI 0.3.x does, then run it.

Validation mirrors `execution.validate_prompt` / `validate_inputs`: unknown class types, no output node, missing
required inputs, bad links, link type mismatch (comma-separated type unions, "*" matches anything), cast to INT /
FLOAT / STRING / BOOLEAN, min / max, combo membership, then VALIDATE_INPUTS with ComfyUI's pitfalls kept on purpose:
an input named in the VALIDATE_INPUTS signature skips its built-in min/max/combo checks, a **kwargs signature skips
them all, linked inputs arrive there as None, and `input_types` receives the linked types. Only output nodes and what
they depend on are validated and run, in dependency order. Errors come back in ComfyUI's own shapes (node_errors /
execution_error).

Native nodes used by the example workflows are replaced by stand-ins with the same INPUT_TYPES as ComfyUI's
(nodes.py, checked against a real server's /object_info by test_comfyui_real.py).
"""

from __future__ import annotations

import inspect
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# ------------------------------------------------------------------------------------------------ native stand-ins
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


class Directories:
    input = "."
    output = "."
    temp = "."


class LoadImage:
    @classmethod
    def INPUT_TYPES(cls):
        files = [f for f in os.listdir(Directories.input)
                 if os.path.isfile(os.path.join(Directories.input, f)) and f.lower().endswith(IMAGE_EXTENSIONS)]
        return {"required": {"image": (sorted(files), {"image_upload": True})}}

    CATEGORY = "image"
    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "load_image"

    def load_image(self, image):
        img = Image.open(os.path.join(Directories.input, image))
        rgb = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
        if "A" in img.getbands():
            mask = 1.0 - torch.from_numpy(np.asarray(img.getchannel("A"), dtype=np.float32) / 255.0)
        else:
            mask = torch.zeros((64, 64), dtype=torch.float32)
        return (torch.from_numpy(rgb)[None], mask[None])


class SaveImage:
    folder_type = "output"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The images to save."}),
                "filename_prefix": ("STRING", {"default": "ComfyUI", "tooltip": "The prefix for the file to save."}),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    RETURN_TYPES = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True
    CATEGORY = "image"

    def _dir(self) -> str:
        return Directories.output

    def save_images(self, images, filename_prefix="ComfyUI", prompt=None, extra_pnginfo=None):
        if not (isinstance(images, torch.Tensor) and images.ndim == 4 and images.shape[-1] == 3):
            raise TypeError(f"IMAGE must be a [B,H,W,3] tensor, got {getattr(images, 'shape', type(images))}")
        out = Path(self._dir())
        out.mkdir(parents=True, exist_ok=True)
        results = []
        for image in images:
            existing = len(list(out.glob(f"{filename_prefix}_*.png")))
            name = f"{filename_prefix}_{existing + 1:05}_.png"
            array = np.clip(255.0 * image.cpu().float().numpy(), 0, 255).astype(np.uint8)
            Image.fromarray(array).save(out / name)
            results.append({"filename": name, "subfolder": "", "type": self.folder_type})
        return {"ui": {"images": results}}


class PreviewImage(SaveImage):
    folder_type = "temp"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",)}, "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    def _dir(self) -> str:
        return Directories.temp

    def save_images(self, images, filename_prefix="ComfyUI_temp", prompt=None, extra_pnginfo=None):
        return super().save_images(images, filename_prefix, prompt, extra_pnginfo)


class LatentUpscaleBy:
    upscale_methods = ["nearest-exact", "bilinear", "area", "bicubic", "bislerp"]

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "upscale_method": (cls.upscale_methods,),
                             "scale_by": ("FLOAT", {"default": 1.5, "min": 0.01, "max": 8.0, "step": 0.01})}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "upscale"
    CATEGORY = "latent"

    def upscale(self, samples, upscale_method, scale_by):
        if upscale_method == "bislerp":
            raise ValueError("the test stand-in of LatentUpscaleBy implements torch's interpolation modes only")
        s = dict(samples)
        x = samples["samples"]
        size = (round(x.shape[-2] * scale_by), round(x.shape[-1] * scale_by))
        s["samples"] = F.interpolate(x, size=size, mode=upscale_method)
        return (s,)


class SetLatentNoiseMask:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "mask": ("MASK",)}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "set_mask"
    CATEGORY = "latent/inpaint"

    def set_mask(self, samples, mask):
        s = dict(samples)
        s["noise_mask"] = mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1]))
        return (s,)


NATIVE_NODES = {"LoadImage": LoadImage, "SaveImage": SaveImage, "PreviewImage": PreviewImage,
                "LatentUpscaleBy": LatentUpscaleBy, "SetLatentNoiseMask": SetLatentNoiseMask}
NATIVE_DISPLAY_NAMES = {"LoadImage": "Load Image", "SaveImage": "Save Image", "PreviewImage": "Preview Image",
                        "LatentUpscaleBy": "Upscale Latent By", "SetLatentNoiseMask": "Set Latent Noise Mask"}


# ------------------------------------------------------------------------------------------------ validation
class PromptRejected(Exception):
    """What POST /prompt answers with HTTP 400: {"error": {...}, "node_errors": {...}}."""

    def __init__(self, error: dict, node_errors: dict):
        self.error = error
        self.node_errors = node_errors
        super().__init__(json.dumps({"error": error, "node_errors": node_errors}, indent=1, default=str))

    def messages(self) -> list[str]:
        return [f"{e['message']}: {e['details']}" for n in self.node_errors.values() for e in n["errors"]]


class ExecutionError(Exception):
    """What the websocket's execution_error and /history carry when a node raises."""

    def __init__(self, node_id: str, node_type: str, exception: BaseException):
        self.node_id = node_id
        self.node_type = node_type
        self.exception = exception
        self.exception_type = f"{type(exception).__module__}.{type(exception).__qualname__}"
        self.exception_message = str(exception)
        super().__init__(f"{node_type} (node {node_id}) raised {self.exception_type}: {self.exception_message}")


def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def types_match(received: str, expected: str) -> bool:
    """comfy_execution.validation.validate_node_input (non-strict)."""
    if received == expected or "*" in (received, expected):
        return True
    if not isinstance(received, str) or not isinstance(expected, str):
        return False
    return bool({t.strip() for t in received.split(",")} & {t.strip() for t in expected.split(",")})


def _input_info(class_inputs: dict, name: str):
    for category in ("required", "optional", "hidden"):
        if name in class_inputs.get(category, {}):
            spec = class_inputs[category][name]
            if isinstance(spec, str):
                return spec, category, {}
            return spec[0], category, (spec[1] if len(spec) > 1 else {})
    return None, None, None


class Executor:
    def __init__(self, node_classes: dict[str, type]):
        self.node_classes = dict(node_classes)

    # -- validation ---------------------------------------------------------------------------------------------
    def validate(self, prompt: dict) -> list[str]:
        """Raise PromptRejected as ComfyUI would; return the output node ids that will run."""
        for node_id, node in prompt.items():
            if "class_type" not in node:
                raise PromptRejected({"type": "invalid_prompt", "message": "Cannot execute because a node is missing "
                                      "the class_type property.", "details": f"Node ID '#{node_id}'",
                                      "extra_info": {}}, {})
            if node["class_type"] not in self.node_classes:
                raise PromptRejected({"type": "invalid_prompt", "message": f"Cannot execute because node "
                                      f"{node['class_type']} does not exist.", "details": f"Node ID '#{node_id}'",
                                      "extra_info": {}}, {})
        outputs = [i for i, n in prompt.items() if getattr(self.node_classes[n["class_type"]], "OUTPUT_NODE", False)]
        if not outputs:
            raise PromptRejected({"type": "prompt_no_outputs", "message": "Prompt has no outputs", "details": "",
                                  "extra_info": {}}, {})
        validated: dict[str, tuple] = {}
        good, node_errors, messages = [], {}, []
        for o in outputs:
            ok, reasons, _ = self._validate_node(prompt, o, validated)
            if ok:
                good.append(o)
                continue
            messages += [f"{r['message']}: {r['details']}" for r in reasons]
            for node_id, (valid, errs, _) in validated.items():
                if not valid and errs:
                    entry = node_errors.setdefault(node_id, {"errors": errs, "dependent_outputs": [],
                                                             "class_type": prompt[node_id]["class_type"]})
                    entry["dependent_outputs"].append(o)
        if not good:
            raise PromptRejected({"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed "
                                  "validation", "details": "\n".join(messages), "extra_info": {}}, node_errors)
        return good

    def _validate_node(self, prompt: dict, node_id: str, validated: dict) -> tuple:
        if node_id in validated:
            return validated[node_id]
        inputs = prompt[node_id]["inputs"]
        cls = self.node_classes[prompt[node_id]["class_type"]]
        class_inputs = cls.INPUT_TYPES()
        valid_names = list(class_inputs.get("required", {})) + list(class_inputs.get("optional", {}))
        validate_fn = getattr(cls, "VALIDATE_INPUTS", None)
        fn_args, fn_kwargs = [], False
        if validate_fn is not None:
            spec = inspect.getfullargspec(validate_fn)
            fn_args, fn_kwargs = spec.args, spec.varkw is not None
        errors, valid, received_types = [], True, {}

        def error(kind: str, message: str, details: str, **extra):
            errors.append({"type": kind, "message": message, "details": details, "extra_info": extra})

        for name in valid_names:
            input_type, category, extra = _input_info(class_inputs, name)
            if name not in inputs:
                if category == "required":
                    error("required_input_missing", "Required input is missing", name, input_name=name)
                continue
            value = inputs[name]
            if isinstance(value, list):
                if len(value) != 2:
                    error("bad_linked_input", "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                          name, input_name=name)
                    continue
                source_id, slot = value
                if source_id not in prompt:
                    error("bad_linked_input", "Linked node does not exist", name, input_name=name)
                    continue
                source_cls = self.node_classes[prompt[source_id]["class_type"]]
                received = source_cls.RETURN_TYPES[slot]
                received_types[name] = received
                if "input_types" not in fn_args and not types_match(received, input_type):
                    error("return_type_mismatch", "Return type mismatch between linked nodes",
                          f"{name}, received_type({received}) mismatch input_type({input_type})", input_name=name)
                    continue
                upstream = self._validate_node(prompt, source_id, validated)
                if not upstream[0]:
                    valid = False
                continue
            if isinstance(value, dict) and "__value__" in value:
                value = inputs[name] = value["__value__"]
            try:
                casts = {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}
                cast = casts.get(input_type) if isinstance(input_type, str) else None
                if cast is not None:
                    value = inputs[name] = cast(value)
            except Exception as exc:
                error("invalid_input_type", f"Failed to convert an input value to a {input_type} value",
                      f"{name}, {value}, {exc}", input_name=name)
                continue
            if name in fn_args or fn_kwargs:
                continue  # ComfyUI skips the built-in checks of inputs VALIDATE_INPUTS names
            if "min" in extra and value < extra["min"]:
                error("value_smaller_than_min", f"Value {value} smaller than min of {extra['min']}", name,
                      input_name=name, received_value=value)
                continue
            if "max" in extra and value > extra["max"]:
                error("value_bigger_than_max", f"Value {value} bigger than max of {extra['max']}", name,
                      input_name=name, received_value=value)
                continue
            if isinstance(input_type, list) and value not in input_type:
                shown = f"(list of length {len(input_type)})" if len(input_type) > 20 else str(input_type)
                error("value_not_in_list", "Value not in list", f"{name}: '{value}' not in {shown}",
                      input_name=name, received_value=value)
                continue

        if fn_args or fn_kwargs:
            args = {}
            for name, value in inputs.items():
                if name in fn_args or fn_kwargs:
                    args[name] = None if _is_link(value) else value
            if "input_types" in fn_args:
                args["input_types"] = received_types
            args.pop("cls", None)
            result = validate_fn(**args)
            if result is not True:
                for name in args:
                    details = name if result is False else f"{name} - {result}"
                    error("custom_validation_failed", "Custom validation failed for node", details, input_name=name)

        outcome = (not errors and valid, errors, node_id)
        validated[node_id] = outcome
        return outcome

    # -- execution ----------------------------------------------------------------------------------------------
    def run(self, prompt: dict) -> dict[str, Any]:
        """Validate, then execute; returns {node_id: ui dict} of the output nodes (and raises ExecutionError)."""
        prompt = json.loads(json.dumps(prompt))  # validation casts values in place, as ComfyUI does
        outputs = self.validate(prompt)
        order: list[str] = []

        def visit(node_id: str, stack: tuple = ()):
            if node_id in order:
                return
            if node_id in stack:
                raise PromptRejected({"type": "invalid_prompt", "message": "Dependency cycle", "details": node_id,
                                      "extra_info": {}}, {})
            for value in prompt[node_id]["inputs"].values():
                if _is_link(value):
                    visit(value[0], stack + (node_id,))
            order.append(node_id)

        for o in outputs:
            visit(o)
        results: dict[str, tuple] = {}
        ui: dict[str, Any] = {}
        for node_id in order:
            node = prompt[node_id]
            cls = self.node_classes[node["class_type"]]
            class_inputs = cls.INPUT_TYPES()
            kwargs = {}
            for name, value in node["inputs"].items():
                _, category, _ = _input_info(class_inputs, name)
                if _is_link(value):
                    kwargs[name] = results[value[0]][value[1]]
                elif category is not None:
                    kwargs[name] = value
            for name, kind in class_inputs.get("hidden", {}).items():
                kwargs[name] = {"PROMPT": prompt, "EXTRA_PNGINFO": None, "UNIQUE_ID": node_id}.get(kind)
            try:
                out = getattr(cls(), cls.FUNCTION)(**kwargs)
            except Exception as exc:
                raise ExecutionError(node_id, node["class_type"], exc) from exc
            if isinstance(out, dict):
                ui[node_id] = out.get("ui")
                out = out.get("result", ())
            results[node_id] = tuple(out)
        self.last_results = results
        return ui


# ------------------------------------------------------------------------------------------------ tiny models
TINY_CAPTION = 64  # d_model of the tiny T5 = caption_channels of the tiny transformers
TINY_SAMPLE = 32  # tiny transformers are "trained at 256 px": the resolution node gives 256-class sizes

# What every example workflow expects, in the folders the README names, with tiny stand-ins of the official files.
TINY_FILES = {
    "lcm": "diffusion_models/PixArt-LCM-XL-2-1024-MS.safetensors",
    "alpha": "diffusion_models/PixArt-XL-2-1024-MS.pth",
    "sigma": "diffusion_models/PixArt-Sigma-XL-2-1024-MS.pth",
    "sigma_2k": "diffusion_models/PixArt-Sigma-XL-2-2K-MS.pth",
    "controlnet": "controlnet/PixArt-XL-2-1024-ControlNet.pth",
    "hed": "controlnet/ControlNetHED.pth",
    "t5": "text_encoders/t5xxl_fp16.safetensors",
    "sd_vae": "vae/sd-vae-ft-ema.safetensors",
    "sdxl_vae": "vae/sdxl_vae.safetensors",
    "lora": "loras/PixArt-Sigma-example-lora.safetensors",
}

_written: dict[str, Path] = {}


def _controlnet_part(base_sd: dict, seed: int) -> dict:
    """The released ControlNet layout (controlnet.0.copied_block.* + before/after_proj), one copy of base block 0."""
    g = torch.Generator().manual_seed(seed)
    width = base_sd["blocks.0.attn.proj.weight"].shape[0]
    out = {f"controlnet.0.copied_block.{k[len('blocks.0.'):]}": v.clone()
           for k, v in base_sd.items() if k.startswith("blocks.0.")}
    for name in ("before_proj", "after_proj"):
        out[f"controlnet.0.{name}.weight"] = torch.randn(width, width, generator=g) * 0.05
        out[f"controlnet.0.{name}.bias"] = torch.randn(width, generator=g) * 0.05
    return out


def write_tiny_models(root: Path) -> Path:
    """Tiny random models under the official file names in a ComfyUI-style models folder (written once per run)."""
    key = str(root)
    if key in _written:
        return _written[key]
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file
    from transformers import T5Config, T5EncoderModel

    from pixart_core.hed import ControlNetHED
    from tests.factories import original_state_dict, tiny_diffusers_transformer, to_ldm

    root = Path(root)
    for rel in TINY_FILES.values():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)

    def contiguous(sd: dict) -> dict:
        return {k: v.contiguous() for k, v in sd.items()}

    def original(family: str, text_len: int, seed: int, micro: bool) -> dict:
        ref = tiny_diffusers_transformer(family=family, sample_size=TINY_SAMPLE, micro_conditions=micro,
                                         caption_channels=TINY_CAPTION, seed=seed)
        return original_state_dict(contiguous(ref.state_dict()), text_len=text_len, caption_channels=TINY_CAPTION,
                                   pos_embed_tokens=(TINY_SAMPLE // 2) ** 2, seed=seed)

    lcm = tiny_diffusers_transformer(family="alpha", sample_size=128, micro_conditions=True,
                                     caption_channels=TINY_CAPTION, seed=11)
    save_file(contiguous(lcm.state_dict()), str(root / TINY_FILES["lcm"]))  # diffusers layout, as released
    alpha = original("alpha", 120, 12, True)
    torch.save({"state_dict": alpha}, root / TINY_FILES["alpha"])
    torch.save({"state_dict": original("sigma", 300, 13, False)}, root / TINY_FILES["sigma"])
    torch.save({"state_dict": original("sigma", 300, 14, False)}, root / TINY_FILES["sigma_2k"])
    combined = {f"base_model.{k}": v for k, v in alpha.items()}
    combined.update(_controlnet_part(alpha, 15))
    torch.save({"state_dict": combined}, root / TINY_FILES["controlnet"])

    torch.manual_seed(16)
    hed = ControlNetHED()
    with torch.no_grad():
        for p in hed.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    torch.save({k: v.half() for k, v in hed.state_dict().items()}, root / TINY_FILES["hed"])

    torch.manual_seed(17)
    t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=TINY_CAPTION, d_ff=128, num_layers=2, num_heads=4,
                                 d_kv=16, is_gated_act=True, dense_act_fn="gelu_pytorch_tanh"))
    state = {k: v.half().contiguous() for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_file(state, str(root / TINY_FILES["t5"]))

    for i, name in enumerate(("sd_vae", "sdxl_vae")):
        torch.manual_seed(18 + i)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 32, 32),
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=1, norm_num_groups=32)
        state = contiguous(vae.state_dict())
        # as released: sd-vae-ft-ema's diffusion_pytorch_model.safetensors (diffusers keys, renamed, README);
        # stabilityai/sdxl-vae's sdxl_vae.safetensors is the original ldm layout (decoder.up.N, mid.attn_1, ...)
        save_file(state if name == "sd_vae" else contiguous(to_ldm(state)), str(root / TINY_FILES[name]))
    save_file(_tiny_lora(depth=2, seed=20), str(root / TINY_FILES["lora"]))
    _written[key] = root
    return root


def _tiny_lora(depth: int, seed: int, rank: int = 4, scale: float = 0.05) -> dict:
    """A LoRA for the tiny transformers as diffusers' save_lora_weights names it (transformer.<diffusers key>)."""
    from tests.factories import TINY_WIDTH

    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(depth):
        for layer in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "ff.net.2"):
            fan_in = 4 * TINY_WIDTH if layer == "ff.net.2" else TINY_WIDTH
            name = f"transformer.transformer_blocks.{i}.{layer}"
            out[f"{name}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) * scale
            out[f"{name}.lora_B.weight"] = torch.randn(TINY_WIDTH, rank, generator=g) * scale
    return out


def example_input(input_dir: Path, name: str, size: int) -> Path:
    """A workflows' example picture, shrunk for fast tests, under the name the workflows load (its alpha, the
    inpainting mask, kept)."""
    sys_path_root = Path(__file__).resolve().parents[1]
    image = Image.open(sys_path_root / "workflows" / "input" / name)
    image = image.convert("RGBA" if "A" in image.getbands() else "RGB").resize((size, size))
    input_dir.mkdir(parents=True, exist_ok=True)
    image.save(input_dir / name)
    return input_dir / name


@contextmanager
def comfy_session(models_root: Path, work: Path, image_size: int, image_name: str = "pixart_delta_example.png"):
    """ComfyUI's folders as the nodes see them, for one test module: models under `models_root`, input / output /
    temp under `work` (the example image in input), the real T5 tokenizer, one torch thread (the suite shares two
    cores); all undone afterwards, the Cancel flag and the pack's model caches cleared."""
    from pixart_nodes import comfy_bridge as bridge
    from pixart_nodes import model_cache
    from tests.conftest import T5_TOKENIZER, torch_threads

    Directories.input, Directories.output, Directories.temp = (str(work / "input"), str(work / "output"),
                                                                str(work / "temp"))
    example_input(work / "input", image_name, image_size)
    bridge.set_models_root(models_root)
    bridge.set_t5_tokenizer_dir(T5_TOKENIZER)
    model_cache.clear_all()
    try:
        with torch_threads(1):
            yield
    finally:
        bridge.set_models_root(None)
        bridge.set_t5_tokenizer_dir(None)
        bridge.request_interrupt(False)
        model_cache.clear_all()
