"""Nodes: load the T5 v1.1 XXL encoder (models/text_encoders) and turn a prompt and its negative into embeddings."""

from __future__ import annotations

from pixart_core.errors import PixArtError
from pixart_core.loading.t5_loading import PRECISIONS as T5_PRECISIONS, QUANTISED, load_t5
from pixart_core.text_encoder import encode_prompts

from . import comfy_bridge as bridge
from . import model_cache
from .sockets import CONDITIONING, MODEL, T5, Conditioning, TextEncoder

FOLDER = "text_encoders"
DEVICES = ["auto", "cpu", "gpu"]
DEFAULT_TEXT_LEN = 300  # without a model to ask: long enough for Σ; α/δ prompts under 120 tokens encode the same


class PixArtDeltaT5Loader:
    DESCRIPTION = ("Loads the T5 v1.1 XXL text encoder PixArt uses, from models/text_encoders (e.g. "
                   "t5xxl_fp16.safetensors, or a GGUF such as t5-v1_1-xxl-encoder-Q8_0.gguf, dequantised into the "
                   "chosen precision). int8 / nf4 (bitsandbytes) cut its memory to about 5 / 3 GB and also run "
                   "on the CPU; the tokenizer is the one ComfyUI ships.")
    CATEGORY = "PixArt/loaders"
    RETURN_TYPES = (T5,)
    RETURN_NAMES = ("t5",)
    OUTPUT_TOOLTIPS = ("The T5 encoder, for PixArt T5 Text Encode.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "t5_name": (bridge.list_models(FOLDER), {
                    "tooltip": "The T5 v1.1 XXL encoder file in models/text_encoders or models/clip "
                               "(t5xxl_fp16.safetensors, t5xxl_fp8_e4m3fn.safetensors, a GGUF such as "
                               "t5-v1_1-xxl-encoder-Q5_K_M.gguf, or the first shard of a diffusers text_encoder)."}),
                "precision": (list(T5_PRECISIONS), {
                    "default": "bf16",
                    "tooltip": "fp32 (19 GB), bf16 / fp16 (9.5 GB; fp16 keeps the overflow-prone layers in fp32), "
                               "int8 (about 5 GB) or nf4 (about 3 GB) through bitsandbytes; the 8/4-bit modes work "
                               "on the CPU too. int8-wo-bf16 / nf4-wo-bf16 keep the feed-forward output layers in "
                               "bf16 (about 2 GB more, a little closer to bf16's embeddings with nf4)."}),
                "device": (DEVICES, {
                    "default": "auto",
                    "tooltip": "Where T5 runs. auto: ComfyUI's text-encoder device; cpu keeps the GPU free for the "
                               "transformer; gpu forces the GPU."}),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, t5_name):
        return bridge.validate_model_name(FOLDER, t5_name, "T5 encoder file")

    def load(self, t5_name: str, precision: str, device: str):
        if device not in DEVICES:
            raise PixArtError(f"device must be one of {', '.join(DEVICES)}; got {device!r}.")
        path = bridge.model_path(FOLDER, t5_name, "T5 encoder file")
        load_device, offload_device = bridge.text_encoder_devices(device)
        if precision in QUANTISED:
            offload_device = load_device  # bitsandbytes weights are quantised where they are built; never moved
        tokenizer = bridge.t5_tokenizer_dir()

        def load_new() -> TextEncoder:
            encoder = load_t5(path, precision=precision, device=offload_device,
                              tokenizer_fallbacks=[tokenizer] if tokenizer else [])
            return TextEncoder(bridge.ManagedModel(encoder, load_device, offload_device), t5_name, precision)

        settings = (precision, str(load_device), str(offload_device), tokenizer)
        return (model_cache.load_file(model_cache.TEXT_ENCODERS, path, settings, load_new, "T5 encoder file", t5_name),)


class PixArtDeltaT5TextEncode:
    DESCRIPTION = ("Encodes a prompt and a negative prompt with T5 for PixArt. Connect the model so the prompt length "
                   "matches it (120 tokens for α/δ, 300 for Σ); ComfyUI keeps the result, so re-queuing the same "
                   "prompt is instant.")
    CATEGORY = "PixArt/conditioning"
    RETURN_TYPES = (CONDITIONING,)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("Prompt and negative-prompt embeddings, for the PixArt samplers.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "t5": (T5, {"tooltip": "The encoder from PixArt Load T5 Encoder."}),
                "prompt": ("STRING", {
                    "multiline": True, "default": "",
                    "tooltip": "What to draw. PixArt reads natural sentences well; long prompts are cut at the "
                               "model's length (a warning in the console says what was cut)."}),
                "negative_prompt": ("STRING", {
                    "multiline": True, "default": "",
                    "tooltip": "What to avoid (used when CFG > 1; the LCM sampler ignores it). Empty is the "
                               "official default."}),
                "max_length": ("INT", {
                    "default": 0, "min": 0, "max": 1024, "step": 1,
                    "tooltip": "Prompt length in tokens. 0: the connected model's own length (120 α/δ, 300 Σ), or "
                               f"{DEFAULT_TEXT_LEN} with no model connected."}),
            },
            "optional": {
                "model": (MODEL, {"tooltip": "The transformer these embeddings are for; sets the prompt length."}),
            },
        }

    def encode(self, t5: TextEncoder, prompt: str, negative_prompt: str, max_length: int, model=None):
        if max_length == 0:
            max_length = model.config.text_len if model is not None else DEFAULT_TEXT_LEN
        bridge.load([t5.managed])
        result = encode_prompts(t5.module, [prompt], negative_prompt, max_length=max_length,
                                device=bridge.intermediate_device())
        return (Conditioning(result.embeds, result.mask, result.negative_embeds, result.negative_mask, max_length),)
