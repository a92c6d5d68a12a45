"""The one source of the example workflows: writes each as a UI-format file (drag into the ComfyUI page) and as an
API-format file (POST /prompt), from the same graph, so the two cannot drift.

Run from the repository root:  python workflows/build.py
Writes workflows/<name>.json (UI, frontend 1.27 shape), workflows/api/<name>.json (API) and the example input images
workflows/input/pixart_delta_example.png (for the ControlNet and img2img workflows) and pixart_inpaint_example.png (the
same picture with a transparent hole to repaint, for the inpainting workflow); copy them into ComfyUI/input.
The tests check that every UI file converts to exactly its API twin and that every API file runs.
"""

from __future__ import annotations

import json
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pixart_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

FRONTEND_VERSION = "1.27.10"
EXAMPLE_IMAGE = "pixart_delta_example.png"
INPAINT_IMAGE = "pixart_inpaint_example.png"

# The model files the workflows name: the official file names, in the folders the README's table gives.
LCM = "PixArt-LCM-XL-2-1024-MS.safetensors"
ALPHA_1024 = "PixArt-XL-2-1024-MS.pth"
SIGMA_1024 = "PixArt-Sigma-XL-2-1024-MS.pth"
SIGMA_2K = "PixArt-Sigma-XL-2-2K-MS.pth"
CONTROLNET_1024 = "PixArt-XL-2-1024-ControlNet.pth"
HED = "ControlNetHED.pth"
T5 = "t5xxl_fp16.safetensors"
SD_VAE = "sd-vae-ft-ema.safetensors"
SDXL_VAE = "sdxl_vae.safetensors"
LORA = "PixArt-Sigma-example-lora.safetensors"  # stands for any PixArt-Σ LoRA in models/loras

# PixArt-nano, which ships with the pack (pixart_core/loading/bundled.py names it in the loaders' lists)
NANO_LCM = "PixArt-nano-LCM (bundled)"
NANO_T5 = "PixArt-nano-T5 (bundled)"
NANO_VAE = "PixArt-nano-VAE (bundled)"
NANO_PROMPT = "a red circle above a blue square"

PROMPT = ("A small red fox sitting in a snowy birch forest at sunrise, soft golden light through the trees, "
          "detailed fur, shallow depth of field, photograph")

# The core nodes the workflows use: (INPUT_TYPES, RETURN_TYPES, RETURN_NAMES, display name), as in ComfyUI 0.3.x.
NATIVE = {
    "LoadImage": ({"required": {"image": ([], {"image_upload": True})}}, ("IMAGE", "MASK"), ("IMAGE", "MASK"),
                  "Load Image"),
    "SaveImage": ({"required": {"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "ComfyUI"})}}, (), (),
                  "Save Image"),
    "PreviewImage": ({"required": {"images": ("IMAGE",)}}, (), (), "Preview Image"),
    "SetLatentNoiseMask": ({"required": {"samples": ("LATENT",), "mask": ("MASK",)}}, ("LATENT",), ("LATENT",),
                           "Set Latent Noise Mask"),
    "LatentUpscaleBy": ({"required": {"samples": ("LATENT",), "upscale_method": (["nearest-exact", "bilinear", "area",
                                                                                   "bicubic", "bislerp"],),
                                      "scale_by": ("FLOAT", {"default": 1.5})}}, ("LATENT",), ("LATENT",),
                        "Upscale Latent By"),
}
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")
COLUMN, NODE_WIDTH = 360, 320  # layout of the UI files, in canvas pixels
IMAGE_NODE_HEIGHT = {"LoadImage": 340, "PreviewImage": 280, "SaveImage": 300,  # room for the pictures the page
                     "PixArtDeltaLCMSampler": 500, "PixArtDeltaSampler": 480}  # shows (samplers: latent previews)


def schema(class_type: str) -> tuple[dict, tuple, tuple, str]:
    if class_type in NATIVE:
        return NATIVE[class_type]
    cls = NODE_CLASS_MAPPINGS[class_type]
    names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
    return cls.INPUT_TYPES(), tuple(cls.RETURN_TYPES), tuple(names), NODE_DISPLAY_NAME_MAPPINGS[class_type]


def is_widget(spec: tuple) -> bool:
    options = spec[1] if len(spec) > 1 else {}
    return (isinstance(spec[0], list) or spec[0] in WIDGET_TYPES) and not options.get("forceInput")


@dataclass
class Out:
    node: "Node"
    slot: int


@dataclass
class Node:
    id: int
    class_type: str
    values: dict  # widget name -> value
    links: dict  # input name -> Out
    seed_control: str | None = None  # the seed's "control after generate" setting
    title: str | None = None
    mode: int = 0

    def __getitem__(self, slot: int) -> Out:
        return Out(self, slot)


@dataclass
class Workflow:
    name: str
    description: str
    nodes: list[Node] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, class_type: str, seed_control: str | None = None, **inputs) -> Node:
        input_types = schema(class_type)[0]
        specs = {**input_types.get("required", {}), **input_types.get("optional", {})}
        unknown = set(inputs) - set(specs)
        if unknown:
            raise KeyError(f"{class_type} has no input(s) {sorted(unknown)}")
        values, links = {}, {}
        for name, spec in specs.items():
            given = inputs.get(name)
            if isinstance(given, Out):
                links[name] = given
                if is_widget(spec):  # a widget fed by a link keeps a value in widgets_values
                    values[name] = _default(spec)
            elif is_widget(spec):
                values[name] = given if name in inputs else _default(spec)
        node = Node(len(self.nodes) + 1, class_type, values, links, seed_control)
        self.nodes.append(node)
        return node

    def note(self, text: str) -> None:
        self.notes.append(text)

    # ----------------------------------------------------------------------------------------------- API format
    def api(self) -> dict:
        out = {}
        for node in self.nodes:
            if node.mode in (2, 4):
                continue
            input_types, _, _, display = schema(node.class_type)
            inputs = {}
            for category in ("required", "optional"):
                for name, spec in input_types.get(category, {}).items():
                    if name in node.values:
                        inputs[name] = node.values[name]
            for name, ref in node.links.items():
                inputs[name] = [str(ref.node.id), ref.slot]
            out[str(node.id)] = {"inputs": inputs, "class_type": node.class_type,
                                 "_meta": {"title": node.title or display}}
        return out

    # ----------------------------------------------------------------------------------------------- UI format
    def ui(self) -> dict:
        depth = {}
        for node in self.nodes:  # nodes are added after their inputs, so one pass gives each its column
            depth[node.id] = 1 + max((depth[r.node.id] for r in node.links.values()), default=-1)
        for node in self.nodes:  # a loader sits just left of the first node that uses it
            if not node.links:
                users = [depth[n.id] for n in self.nodes if any(r.node is node for r in n.links.values())]
                depth[node.id] = max(0, min(users, default=1) - 1)
        rows: dict[int, int] = {}
        links, link_ids = [], {}
        for node in self.nodes:
            for name, ref in node.links.items():
                link_id = len(links) + 1
                link_ids[(node.id, name)] = link_id
                out_type = schema(ref.node.class_type)[1][ref.slot]
                in_slot = self._socket_names(node).index(name)
                links.append([link_id, ref.node.id, ref.slot, node.id, in_slot, out_type])
        ui_nodes = []
        y_of_column: dict[int, int] = {}
        for order, node in enumerate(self.nodes):
            input_types, return_types, return_names, display = schema(node.class_type)
            col = depth[node.id]
            rows[col] = rows.get(col, 0) + 1
            height = self._height(node, input_types)
            y = y_of_column.get(col, 60)
            y_of_column[col] = y + height + 50
            inputs = []
            specs = {**input_types.get("required", {}), **input_types.get("optional", {})}
            for name in self._socket_names(node):
                entry = {"name": name, "type": self._type_name(specs[name]), "link": link_ids.get((node.id, name))}
                if is_widget(specs[name]):
                    entry["widget"] = {"name": name}
                inputs.append(entry)
            outputs = []
            for slot, (kind, name) in enumerate(zip(return_types, return_names)):
                targets = [link[0] for link in links if link[1] == node.id and link[2] == slot]
                outputs.append({"name": name, "type": kind, "links": targets or None})
            entry = {
                "id": node.id, "type": node.class_type, "pos": [60 + col * COLUMN, y], "size": [NODE_WIDTH, height],
                "flags": {}, "order": order, "mode": node.mode, "inputs": inputs, "outputs": outputs,
                "properties": {"Node name for S&R": node.class_type},
            }
            widgets = self._widgets_values(node, input_types)
            if widgets:
                entry["widgets_values"] = widgets
            if node.title:
                entry["title"] = node.title
            ui_nodes.append(entry)
        next_id = len(self.nodes) + 1
        for text in self.notes:
            ui_nodes.append({
                "id": next_id, "type": "Note", "pos": [60, max(y_of_column.values(), default=60) + 40],
                "size": [520, 220], "flags": {}, "order": next_id - 1, "mode": 0, "inputs": [], "outputs": [],
                "properties": {}, "widgets_values": [text], "color": "#432", "bgcolor": "#653",
            })
            next_id += 1
        return {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"pixart-delta/workflows/{self.name}")),
            "revision": 0,
            "last_node_id": next_id - 1,
            "last_link_id": len(links),
            "nodes": ui_nodes,
            "links": links,
            "groups": [],
            "config": {},
            "extra": {"ds": {"scale": 0.7, "offset": [0, 0]}, "frontendVersion": FRONTEND_VERSION},
            "version": 0.4,
        }

    @staticmethod
    def _type_name(spec: tuple) -> str:
        return "COMBO" if isinstance(spec[0], list) else spec[0]

    @staticmethod
    def _socket_names(node: Node) -> list[str]:
        """Input sockets listed in the UI file: every non-widget input, and widget inputs that are linked."""
        input_types = schema(node.class_type)[0]
        names = []
        for category in ("required", "optional"):
            for name, spec in input_types.get(category, {}).items():
                if not is_widget(spec) or name in node.links:
                    names.append(name)
        return names

    @staticmethod
    def _widgets_values(node: Node, input_types: dict) -> list:
        values = []
        for category in ("required", "optional"):
            for name, spec in input_types.get(category, {}).items():
                if name not in node.values:
                    continue
                values.append(node.values[name])
                options = spec[1] if len(spec) > 1 else {}
                if spec[0] == "INT" and options.get("control_after_generate", name in ("seed", "noise_seed")):
                    values.append(node.seed_control or "randomize")
                if isinstance(spec[0], list) and options.get("image_upload"):
                    values.append("image")
        return values

    def _height(self, node: Node, input_types: dict) -> int:
        if node.class_type in IMAGE_NODE_HEIGHT:  # room for the picture the page shows in the node
            return IMAGE_NODE_HEIGHT[node.class_type]
        rows = len(self._socket_names(node)) + len(node.values) + max(1, len(schema(node.class_type)[1]))
        multiline = sum(1 for n, s in {**input_types.get("required", {}), **input_types.get("optional", {})}.items()
                        if n in node.values and len(s) > 1 and s[1].get("multiline"))
        return 40 + 26 * rows + 110 * multiline


def _default(spec: tuple):
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
    if "default" in options:
        return options["default"]
    if isinstance(kind, list):
        return kind[0] if kind else ""
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[kind]


# ----------------------------------------------------------------------------------------------------- workflows
def _text_to_latent_parts(wf: Workflow, model_file: str, t5_precision: str = "bf16", precision: str = "auto",
                          prompt: str = PROMPT):
    model = wf.add("PixArtDeltaTransformerLoader", model_name=model_file, precision=precision)
    t5 = wf.add("PixArtDeltaT5Loader", t5_name=T5, precision=t5_precision)
    cond = wf.add("PixArtDeltaT5TextEncode", t5=t5[0], model=model[0], prompt=prompt, negative_prompt="")
    return model, cond


def _decode_and_save(wf: Workflow, latent: Out, vae_file: str, prefix: str) -> None:
    vae = wf.add("PixArtDeltaVAELoader", vae_name=vae_file)
    image = wf.add("PixArtDeltaVAEDecodeTiled", samples=latent, vae=vae[0])
    wf.add("SaveImage", images=image[0], filename_prefix=prefix)


def lcm_text_to_image() -> Workflow:
    wf = Workflow("pixart_delta_lcm_1024", "PixArt-δ LCM text-to-image, 1024 px, 4 steps")
    model, cond = _text_to_latent_parts(wf, LCM)
    latent = wf.add("PixArtDeltaLCMSampler", seed_control="randomize", model=model[0], conditioning=cond[0], seed=42,
                    steps=4, width=1024, height=1024)
    _decode_and_save(wf, latent[0], SD_VAE, "PixArt-delta-LCM")
    wf.note(f"PixArt-δ LCM, 4 steps, no CFG.\nmodels/diffusion_models/{LCM}\nmodels/text_encoders/{T5}\n"
            f"models/vae/{SD_VAE}")
    return wf


def alpha_dpm() -> Workflow:
    wf = Workflow("pixart_alpha_1024_dpmpp", "PixArt-α 1024-MS, DPM-Solver++ 20 steps, CFG 4.5")
    model, cond = _text_to_latent_parts(wf, ALPHA_1024)
    size = wf.add("PixArtDeltaResolutionSelect", model=model[0], aspect_ratio="1:1")
    empty = wf.add("PixArtDeltaEmptyLatent", width=size[0], height=size[1], batch_size=1)
    latent = wf.add("PixArtDeltaSampler", seed_control="randomize", model=model[0], conditioning=cond[0],
                    latent=empty[0], seed=42, steps=20, cfg=4.5, sampler_name="dpmpp_2m", denoise=1.0)
    _decode_and_save(wf, latent[0], SD_VAE, "PixArt-alpha")
    wf.note(f"PixArt-α 1024-MS with DPM-Solver++ (20 steps, CFG 4.5).\nmodels/diffusion_models/{ALPHA_1024}\n"
            f"models/text_encoders/{T5}\nmodels/vae/{SD_VAE}")
    return wf


def sigma_2k_to_4k() -> Workflow:
    wf = Workflow("pixart_sigma_2k_to_4k", "PixArt-Σ 2K, latent upscale, refine, tiled decode at 4K")
    model, cond = _text_to_latent_parts(wf, SIGMA_2K)
    size = wf.add("PixArtDeltaResolutionSelect", model=model[0], aspect_ratio="1:1")
    empty = wf.add("PixArtDeltaEmptyLatent", width=size[0], height=size[1], batch_size=1)
    first = wf.add("PixArtDeltaSampler", seed_control="randomize", model=model[0], conditioning=cond[0],
                   latent=empty[0], seed=42, steps=20, cfg=4.5, sampler_name="dpmpp_2m", denoise=1.0)
    bigger = wf.add("LatentUpscaleBy", samples=first[0], upscale_method="bicubic", scale_by=2.0)
    refined = wf.add("PixArtDeltaSampler", seed_control="fixed", model=model[0], conditioning=cond[0], latent=bigger[0],
                     seed=7, steps=20, cfg=4.5, sampler_name="dpmpp_2m", denoise=0.5)
    _decode_and_save(wf, refined[0], SDXL_VAE, "PixArt-sigma-4K")
    wf.note(f"PixArt-Σ 2K: 2048 px, latent x2, refine at denoise 0.5, seam-free tiled decode at 4096 px.\n"
            f"models/diffusion_models/{SIGMA_2K}\nmodels/text_encoders/{T5}\nmodels/vae/{SDXL_VAE}")
    return wf


def controlnet_hed_lcm() -> Workflow:
    wf = Workflow("pixart_delta_controlnet_hed_lcm", "PixArt-δ ControlNet (HED edges of a photo) with LCM")
    photo = wf.add("LoadImage", image=EXAMPLE_IMAGE)
    edges = wf.add("PixArtDeltaHEDPreprocessor", image=photo[0], hed_name=HED)
    wf.add("PreviewImage", images=edges[0])
    controlnet = wf.add("PixArtDeltaControlNetLoader", controlnet_name=CONTROLNET_1024)
    vae = wf.add("PixArtDeltaVAELoader", vae_name=SD_VAE)
    control = wf.add("PixArtDeltaControlNetApply", controlnet=controlnet[0], vae=vae[0], image=edges[0],
                     strength=1.0, start=0.0, end=1.0)
    model, cond = _text_to_latent_parts(wf, LCM)
    latent = wf.add("PixArtDeltaLCMSampler", seed_control="randomize", model=model[0], conditioning=cond[0], seed=42,
                    steps=4, width=1024, height=1024, control=control[0])
    image = wf.add("PixArtDeltaVAEDecodeTiled", samples=latent[0], vae=vae[0])
    wf.add("SaveImage", images=image[0], filename_prefix="PixArt-delta-ControlNet")
    wf.note(f"PixArt-δ ControlNet-Transformer on the LCM model: HED edges of a photo guide the layout.\n"
            f"input/{EXAMPLE_IMAGE} (or any photo)\nmodels/controlnet/{CONTROLNET_1024}\nmodels/controlnet/{HED}\n"
            f"models/diffusion_models/{LCM}\nmodels/text_encoders/{T5}\nmodels/vae/{SD_VAE}")
    return wf


def low_memory() -> Workflow:
    wf = Workflow("pixart_sigma_low_memory_int8", "Low memory: 8-bit T5 and 8-bit transformer (PixArt-Σ 1024)")
    model, cond = _text_to_latent_parts(wf, SIGMA_1024, t5_precision="int8", precision="int8")
    size = wf.add("PixArtDeltaResolutionSelect", model=model[0], aspect_ratio="1:1")
    empty = wf.add("PixArtDeltaEmptyLatent", width=size[0], height=size[1], batch_size=1)
    latent = wf.add("PixArtDeltaSampler", seed_control="randomize", model=model[0], conditioning=cond[0],
                    latent=empty[0], seed=42, steps=20, cfg=4.5, sampler_name="dpmpp_2m", denoise=1.0)
    _decode_and_save(wf, latent[0], SDXL_VAE, "PixArt-sigma-int8")
    wf.note(f"8-bit T5 (about 5 GB) and 8-bit transformer via bitsandbytes; tiled decode.\n"
            f"models/diffusion_models/{SIGMA_1024}\nmodels/text_encoders/{T5}\nmodels/vae/{SDXL_VAE}")
    return wf


def img2img() -> Workflow:
    wf = Workflow("pixart_alpha_img2img", "img2img: Load Image, tiled VAE encode, denoise 0.6, decode")
    photo = wf.add("LoadImage", image=EXAMPLE_IMAGE)
    vae = wf.add("PixArtDeltaVAELoader", vae_name=SD_VAE)
    encoded = wf.add("PixArtDeltaVAEEncodeTiled", pixels=photo[0], vae=vae[0])
    model, cond = _text_to_latent_parts(wf, ALPHA_1024)
    latent = wf.add("PixArtDeltaSampler", seed_control="randomize", model=model[0], conditioning=cond[0],
                    latent=encoded[0], seed=42, steps=20, cfg=4.5, sampler_name="dpmpp_2m", denoise=0.6)
    image = wf.add("PixArtDeltaVAEDecodeTiled", samples=latent[0], vae=vae[0])
    wf.add("SaveImage", images=image[0], filename_prefix="PixArt-alpha-img2img")
    wf.note(f"img2img at denoise 0.6: image sides must be multiples of 16 px.\ninput/{EXAMPLE_IMAGE}\n"
            f"models/diffusion_models/{ALPHA_1024}\nmodels/text_encoders/{T5}\nmodels/vae/{SD_VAE}")
    return wf


def inpaint() -> Workflow:
    wf = Workflow("pixart_alpha_inpaint", "Inpainting: Load Image's mask, VAE encode, Set Latent Noise Mask, sample")
    photo = wf.add("LoadImage", image=INPAINT_IMAGE)
    vae = wf.add("PixArtDeltaVAELoader", vae_name=SD_VAE)
    encoded = wf.add("PixArtDeltaVAEEncodeTiled", pixels=photo[0], vae=vae[0])
    masked = wf.add("SetLatentNoiseMask", samples=encoded[0], mask=photo[1])
    model, cond = _text_to_latent_parts(wf, ALPHA_1024, prompt="a small red wooden barn with a white door on a green "
                                        "hill, sunny day, photograph")
    latent = wf.add("PixArtDeltaSampler", seed_control="randomize", model=model[0], conditioning=cond[0],
                    latent=masked[0], seed=42, steps=20, cfg=4.5, sampler_name="dpmpp_2m", denoise=1.0)
    image = wf.add("PixArtDeltaVAEDecodeTiled", samples=latent[0], vae=vae[0])
    wf.add("SaveImage", images=image[0], filename_prefix="PixArt-alpha-inpaint")
    wf.note(f"Inpainting: only the masked part is redrawn, the rest is kept. The mask is Load Image's MASK: the "
            f"transparent pixels of {INPAINT_IMAGE} (paint your own with right click > Open in MaskEditor). Lower "
            f"denoise to keep more of what was under the mask.\ninput/{INPAINT_IMAGE}\n"
            f"models/diffusion_models/{ALPHA_1024}\nmodels/text_encoders/{T5}\nmodels/vae/{SD_VAE}")
    return wf


def sigma_lora() -> Workflow:
    wf = Workflow("pixart_sigma_lora", "PixArt-Σ 1024 with a LoRA (PixArt Load LoRA, strength 0.8)")
    base = wf.add("PixArtDeltaTransformerLoader", model_name=SIGMA_1024)
    model = wf.add("PixArtDeltaLoraLoader", model=base[0], lora_name=LORA, strength=0.8)
    t5 = wf.add("PixArtDeltaT5Loader", t5_name=T5, precision="bf16")
    cond = wf.add("PixArtDeltaT5TextEncode", t5=t5[0], model=model[0], prompt=PROMPT, negative_prompt="")
    size = wf.add("PixArtDeltaResolutionSelect", model=model[0], aspect_ratio="1:1")
    empty = wf.add("PixArtDeltaEmptyLatent", width=size[0], height=size[1], batch_size=1)
    latent = wf.add("PixArtDeltaSampler", seed_control="randomize", model=model[0], conditioning=cond[0],
                    latent=empty[0], seed=42, steps=20, cfg=4.5, sampler_name="dpmpp_2m", denoise=1.0)
    _decode_and_save(wf, latent[0], SDXL_VAE, "PixArt-sigma-LoRA")
    wf.note(f"A PixArt-Σ LoRA (diffusers, PEFT or kohya .safetensors) at strength 0.8; chain PixArt Load LoRA nodes "
            f"to stack LoRAs. Pick your own LoRA in the node.\nmodels/loras/{LORA}\n"
            f"models/diffusion_models/{SIGMA_1024}\nmodels/text_encoders/{T5}\nmodels/vae/{SDXL_VAE}")
    return wf


def nano_lcm() -> Workflow:
    wf = Workflow("pixart_nano_lcm", "PixArt-nano (ships with the pack): LCM 4 steps at 64 px, seconds on a CPU")
    model = wf.add("PixArtDeltaTransformerLoader", model_name=NANO_LCM, precision="fp32")
    t5 = wf.add("PixArtDeltaT5Loader", t5_name=NANO_T5, precision="fp32")
    cond = wf.add("PixArtDeltaT5TextEncode", t5=t5[0], model=model[0], prompt=NANO_PROMPT, negative_prompt="")
    latent = wf.add("PixArtDeltaLCMSampler", seed_control="randomize", model=model[0], conditioning=cond[0], seed=42,
                    steps=4, width=64, height=64, batch_size=4)
    _decode_and_save(wf, latent[0], NANO_VAE, "PixArt-nano")
    wf.note("PixArt-nano: a 64 px toy model trained by this pack's own recipes; it ships with the pack, so this runs "
            "with no download.\nIt draws coloured circles, squares and triangles: colours red, green, blue, yellow, "
            "purple, cyan; places left, right, top, bottom, center; two objects 'above', 'below', 'to the left of', "
            "'to the right of'.\nFor real images load the official files instead (pixart_delta_lcm_1024).")
    return wf


WORKFLOWS = (nano_lcm, lcm_text_to_image, alpha_dpm, sigma_2k_to_4k, controlnet_hed_lcm, low_memory, img2img,
             inpaint, sigma_lora)


def all_workflows() -> list[Workflow]:
    return [make() for make in WORKFLOWS]


def example_image(size: int = 1024):
    """A simple synthetic 'photo' (sky, sun, hills, a house, trees) with clear edges for HED and img2img."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(img)
    s = size / 1024
    for y in range(size):  # sky gradient
        t = y / size
        draw.line([(0, y), (size, y)], fill=(int(120 + 90 * t), int(170 + 60 * t), int(235 - 20 * t)))
    draw.ellipse([760 * s, 110 * s, 900 * s, 250 * s], fill=(255, 220, 120))
    draw.polygon([(0, 640 * s), (260 * s, 430 * s), (520 * s, 620 * s), (780 * s, 400 * s), (size, 600 * s),
                  (size, size), (0, size)], fill=(90, 140, 90))
    draw.rectangle([0, 760 * s, size, size], fill=(70, 120, 60))
    draw.rectangle([380 * s, 560 * s, 640 * s, 780 * s], fill=(200, 180, 150), outline=(60, 40, 30), width=int(6 * s))
    draw.polygon([(350 * s, 570 * s), (510 * s, 450 * s), (670 * s, 570 * s)], fill=(150, 50, 40))
    draw.rectangle([480 * s, 680 * s, 540 * s, 780 * s], fill=(90, 60, 40))
    for x in (150, 230, 820, 900):
        draw.rectangle([(x - 8) * s, 700 * s, (x + 8) * s, 800 * s], fill=(80, 55, 35))
        draw.ellipse([(x - 55) * s, 580 * s, (x + 55) * s, 720 * s], fill=(40, 100, 50))
    return img


def inpaint_example_image(size: int = 1024):
    """The example picture with a transparent hole over the house: Load Image's MASK (1 - alpha) marks it for
    repainting, as a mask painted in ComfyUI's mask editor does."""
    from PIL import Image, ImageDraw

    img = example_image(size).convert("RGBA")
    alpha = Image.new("L", img.size, 255)
    s = size / 1024
    ImageDraw.Draw(alpha).rectangle([330 * s, 420 * s, 690 * s, 800 * s], fill=0)
    img.putalpha(alpha)
    return img


def write(out_dir: Path = HERE) -> list[Path]:
    written = []
    (out_dir / "api").mkdir(parents=True, exist_ok=True)
    (out_dir / "input").mkdir(parents=True, exist_ok=True)
    for wf in all_workflows():
        ui_path, api_path = out_dir / f"{wf.name}.json", out_dir / "api" / f"{wf.name}.json"
        ui_path.write_text(json.dumps(wf.ui(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        api_path.write_text(json.dumps(wf.api(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        written += [ui_path, api_path]
    for name, make in ((EXAMPLE_IMAGE, example_image), (INPAINT_IMAGE, inpaint_example_image)):
        image_path = out_dir / "input" / name
        make().save(image_path, optimize=True)
        written.append(image_path)
    return written


if __name__ == "__main__":
    for path in write():
        print(path.relative_to(ROOT))
