"""Turn a T5 file or folder on disk into a T5 encoder module and its tokenizer, using little memory.

Layouts read (all in the transformers key layout `shared.weight`, `encoder.block.N.layer...`):
- a diffusers pipeline folder: `text_encoder/` (config.json + weights) and `tokenizer/`;
- a Hugging Face model folder: config.json + `model.safetensors` or shards with an index json (`.bin` shards too,
  read with `torch.load(weights_only=True)`);
- one `.safetensors` file as ComfyUI users keep them in models/text_encoders (t5xxl_fp32 / fp16 / bf16 / fp8, and
  ComfyUI's "scaled fp8" with a per-tensor `scale_weight`). With no config.json beside it, the config is read off the
  tensor shapes. A file that is one shard of an indexed folder loads the whole folder;
- one `.gguf` file in llama.cpp's T5 naming, any quantisation city96's T5 files use (read by t5_gguf.py).

The model is built on the meta device (no random init of 4.7B parameters) and every tensor is read from the
memory-mapped file, cast (or quantised) on its own and put in place, so the peak is the finished model plus one tensor.

Precisions: fp32, bf16, fp16 (the feed-forward output projection `wo` stays fp32: T5 v1.1 overflows fp16 there),
int8 (LLM.int8) and nf4 through bitsandbytes, which runs on the CPU as well as CUDA; everything not quantised and the
activations are bf16. In "int8" and "nf4" `wo` is quantised too, weight-only: nf4 through bitsandbytes' Linear4bit
(which computes in bf16), int8 as int8 weights converted to bf16 block by block in the matmul
(quantize.Int8WeightLinear). Not bitsandbytes' int8 matmul: it computes in fp16, and T5 v1.1's feed-forward output
overflows fp16 - the reason transformers keeps `wo` in fp32 (`_keep_in_fp32_modules`) and out of its own 8/4-bit
loading. "int8-wo-bf16" / "nf4-wo-bf16" are the earlier variants with `wo` in bf16 (~2 GB more for XXL), kept for
comparison and as the safe fallback (nf4 loses a little accuracy with `wo` in 4 bits; docs/t5.md).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import PixArtError
from ..memory import return_freed_memory
from ..text_encoder import FF_OUTPUT, PromptEmbeddingCache, T5TextEncoder

PRECISIONS = ("fp32", "bf16", "fp16", "int8", "nf4", "int8-wo-bf16", "nf4-wo-bf16")
QUANTISED = ("int8", "nf4", "int8-wo-bf16", "nf4-wo-bf16")
# dtype of everything that is not quantised (and of the activations) for each precision
COMPUTE_DTYPE = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "int8": torch.bfloat16,
    "nf4": torch.bfloat16,
    "int8-wo-bf16": torch.bfloat16,
    "nf4-wo-bf16": torch.bfloat16,
}

_EMBEDDING = "shared.weight"
_EMBEDDING_ALIAS = "encoder.embed_tokens.weight"
_FIRST_QUERY = "encoder.block.0.layer.0.SelfAttention.q.weight"
_TOKENIZER_FILES = ("tokenizer.json", "spiece.model")


@dataclass
class T5Source:
    """Where an encoder's weights, config and tokenizer were found."""

    weight_files: list[Path]
    config_file: Path | None
    tokenizer_candidates: list[Path] = field(default_factory=list)

    @property
    def identity(self) -> str:
        """Names the weights on disk (path, size, mtime), so a cache survives a reload of the same file."""
        parts = []
        for f in self.weight_files:
            st = f.stat()
            parts.append(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}")
        return "|".join(parts)


def locate_t5(path: str | Path) -> T5Source:
    """Find weight files, config and tokenizer candidates for any supported layout."""
    p = Path(path).expanduser()
    if not p.exists():
        raise PixArtError(f"T5 text encoder not found: '{p}'. Give a .safetensors file or a model folder.")
    if p.is_file():
        if p.suffix.lower() not in (".safetensors", ".sft", ".bin", ".pt", ".pth", ".gguf"):
            raise PixArtError(f"'{p.name}' is not a T5 weight file; expected .safetensors or .gguf (or .bin).")
        if _listed_in_shard_index(p):  # one shard of a sharded folder: the folder is the model
            return locate_t5(p.parent)
        config = p.parent / "config.json"
        # beside the file, or beside its folder (the text_encoder/ of a diffusers pipeline has a sibling tokenizer/)
        return T5Source([p], None if not _is_t5_config(config) else config,
                        [p.parent / "tokenizer", p.parent.parent / "tokenizer"])

    if (p / "text_encoder").is_dir():  # diffusers pipeline folder
        weights_dir, tokenizer_candidates = p / "text_encoder", [p / "tokenizer", p]
    else:  # HF model folder, or the text_encoder/ subfolder of a pipeline
        weights_dir, tokenizer_candidates = p, [p, p / "tokenizer", p.parent / "tokenizer"]
    files = _weight_files(weights_dir)
    config = weights_dir / "config.json"
    return T5Source(files, config if config.is_file() else None, tokenizer_candidates)


def _listed_in_shard_index(f: Path) -> bool:
    for index in (f.parent / "model.safetensors.index.json", f.parent / "pytorch_model.bin.index.json"):
        try:
            if index.is_file() and f.name in json.loads(index.read_text()).get("weight_map", {}).values():
                return True
        except (OSError, ValueError):
            continue
    return False


def _is_t5_config(config_file: Path) -> bool:
    """A config.json beside a single file is used only if it describes a T5 (folders of mixed models are common)."""
    if not config_file.is_file():
        return False
    try:
        return json.loads(config_file.read_text()).get("model_type") == "t5"
    except (OSError, ValueError):
        return False


def _weight_files(folder: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise PixArtError(f"Cannot read the shard index '{index}': {e}. Re-download the model folder.") from e
            files = [folder / name for name in sorted(set(weight_map.values()))]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise PixArtError(f"Shards listed in '{index}' are missing: {missing}. Re-download the model folder.")
            return files
    for pattern in ("*.safetensors", "pytorch_model*.bin"):
        files = sorted(folder.glob(pattern))
        if files:
            return files
    raise PixArtError(
        f"No T5 weights in '{folder}': expected model.safetensors (or shards with an index json), "
        "or a diffusers pipeline folder with text_encoder/ and tokenizer/."
    )


class TensorReader:
    """Name -> tensor over one or more checkpoint files, read lazily from memory maps.

    Keys are normalised to the T5EncoderModel layout: a common prefix is stripped, decoder/lm_head keys are ignored,
    `encoder.embed_tokens.weight` stands in for a missing `shared.weight`, and ComfyUI scaled-fp8 weights are
    multiplied by their `scale_weight`.
    """

    def __init__(self, handles: list, stored: dict[str, int], names: dict[str, tuple[int, str]]):
        self._handles = handles  # safe_open handles or state dicts
        self._stored = stored  # stored name -> handle index
        self._names = names  # normalised name -> (handle index, stored name)

    @classmethod
    @contextmanager
    def open(cls, files: Sequence[Path]) -> Iterator[TensorReader]:
        from safetensors import safe_open

        handles, stored = [], {}
        for i, f in enumerate(files):
            if f.suffix.lower() in (".safetensors", ".sft"):
                try:
                    h = safe_open(str(f), framework="pt", device="cpu")
                except Exception as e:  # safetensors raises its own error types for a bad header
                    raise PixArtError(f"Cannot read '{f}' as safetensors ({e}); the file may be incomplete.") from e
            else:
                h = _torch_load(f)
            handles.append(h)
            for k in h.keys():
                stored[k] = i
        try:
            yield cls(handles, stored, _normalise_names(stored, files))
        finally:
            handles.clear()  # drop the memory maps; the built model owns copies of every tensor

    def keys(self) -> list[str]:
        return list(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        i, stored = self._names[name]
        h = self._handles[i]
        if isinstance(h, dict):
            return tuple(h[stored].shape)
        return tuple(h.get_slice(stored).get_shape())

    def tensor(self, name: str) -> torch.Tensor:
        i, stored = self._names[name]
        t = self._read(i, stored)
        scale_name = stored.removesuffix(".weight") + ".scale_weight"
        if stored.endswith(".weight") and scale_name in self._stored:  # ComfyUI scaled fp8: weight * scale
            t = t.to(torch.float32) * self._read(self._stored[scale_name], scale_name).to(torch.float32)
        return t

    def _read(self, i: int, stored: str) -> torch.Tensor:
        h = self._handles[i]
        return h[stored] if isinstance(h, dict) else h.get_tensor(stored)

    def __contains__(self, name: str) -> bool:
        return name in self._names


def _torch_load(f: Path) -> dict:
    """A pickled T5 checkpoint, opened with weights_only=True (code in the pickle is refused, never run)."""
    from .checkpoint_formats import safe_torch_load

    state = safe_torch_load(f)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PixArtError(f"'{f.name}' holds no state dict of tensors; it is not a T5 checkpoint.")
    return state


def _normalise_names(stored: dict[str, int], files: Sequence[Path]) -> dict[str, tuple[int, str]]:
    anchor = next((k for k in stored if k.endswith(_FIRST_QUERY)), None)
    if anchor is None:
        sample = sorted(stored)[:5]
        raise PixArtError(
            f"{[f.name for f in files]} is not a T5 encoder in the transformers key layout "
            f"(no '{_FIRST_QUERY}'; keys look like {sample}). Use a t5xxl .safetensors or the diffusers "
            "text_encoder folder."
        )
    prefix = anchor[: -len(_FIRST_QUERY)]
    names = {}
    for k, i in stored.items():
        if not k.startswith(prefix):
            continue
        name = k[len(prefix) :]
        if name.startswith(("decoder.", "lm_head.")) or name.endswith((".scale_weight", ".scale_input")):
            continue
        if name == "scaled_fp8":  # ComfyUI's marker tensor for the scaled-fp8 format
            continue
        names[name] = (i, k)
    if _EMBEDDING not in names and _EMBEDDING_ALIAS in names:
        names[_EMBEDDING] = names[_EMBEDDING_ALIAS]
    names.pop(_EMBEDDING_ALIAS, None)
    return names


def infer_t5_config(reader: TensorReader):
    """Read a T5EncoderModel config off the tensor shapes (for single files that come without config.json).

    d_model from the embedding, d_ff from the first feed-forward input, heads from the relative attention bias
    (buckets x heads), d_kv = query width / heads, layers from the block count. A gated feed-forward (wi_0/wi_1)
    means T5 v1.1 (gated GELU, tanh approximation); a single `wi` means the original T5 (ReLU).
    """
    from transformers import T5Config

    try:
        vocab, d_model = reader.shape(_EMBEDDING)
        buckets, heads = reader.shape("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
        inner = reader.shape(_FIRST_QUERY)[0]
        gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in reader
        wi = "wi_0" if gated else "wi"
        d_ff = reader.shape(f"encoder.block.0.layer.1.DenseReluDense.{wi}.weight")[0]
    except KeyError as e:
        raise PixArtError(f"The T5 file lacks {e}; it is not a complete T5 encoder.") from e
    blocks = {int(m.group(1)) for k in reader.keys() if (m := re.match(r"encoder\.block\.(\d+)\.", k))}
    return T5Config(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=inner // heads,
        d_ff=d_ff,
        num_layers=len(blocks),
        num_heads=heads,
        relative_attention_num_buckets=buckets,
        is_gated_act=gated,
        dense_act_fn="gelu_pytorch_tanh" if gated else "relu",
        layer_norm_epsilon=1e-6,
    )


def read_t5_config(source: T5Source, reader: TensorReader):
    if source.config_file is None:
        return infer_t5_config(reader)
    from transformers import T5Config

    try:
        values = json.loads(source.config_file.read_text())
    except (OSError, ValueError) as e:
        raise PixArtError(f"Cannot read '{source.config_file}': {e}.") from e
    if values.get("model_type", "t5") != "t5":
        raise PixArtError(f"'{source.config_file}' describes a '{values['model_type']}' model, not T5.")
    return T5Config.from_dict(values)


def build_t5_encoder(config, tensor_for, precision: str, device: str | torch.device = "cpu") -> nn.Module:
    """Build a transformers T5EncoderModel on the meta device and fill it tensor by tensor.

    `tensor_for(name, shape, dtype)` returns the tensor for a parameter (from a file, or random in the bench);
    `dtype` is a hint of what the tensor will be stored as, so a generator can make it directly in that dtype.
    """
    from transformers import T5EncoderModel

    if precision not in PRECISIONS:
        raise PixArtError(f"Unknown T5 precision '{precision}'; choose one of {', '.join(PRECISIONS)}.")
    device = torch.device(device)
    compute = COMPUTE_DTYPE[precision]
    with torch.device("meta"):
        model = T5EncoderModel(config)
    model.eval().requires_grad_(False)

    for name, param in list(model.named_parameters()):  # tied encoder.embed_tokens is listed once, as shared
        module_name, leaf = name.rsplit(".", 1)
        module = model.get_submodule(module_name)
        is_ff_output = module_name.endswith(FF_OUTPUT)
        quantise = (precision in QUANTISED and isinstance(module, nn.Linear)
                    and not (is_ff_output and precision.endswith("-wo-bf16")))
        dtype = torch.float32 if (precision == "fp16" and is_ff_output) else compute
        tensor = tensor_for(name, tuple(param.shape), dtype)
        if tuple(tensor.shape) != tuple(param.shape):
            raise PixArtError(
                f"T5 tensor '{name}' has shape {tuple(tensor.shape)} but the config expects {tuple(param.shape)}; "
                "the config.json does not belong to these weights."
            )
        if quantise:
            kind = precision.split("-")[0]
            make = _weight_only_ff_output if is_ff_output else _quantised_linear
            quantised = make(tensor.to(compute), kind, device)
            _set_submodule(model, module_name, quantised)
        else:
            module._parameters[leaf] = nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False)
        del tensor
    model.encoder.embed_tokens.weight = model.shared.weight  # re-tie: assignment above replaced the shared Parameter
    return_freed_memory()  # glibc keeps the freed temporaries of quantising (and of casting) mapped otherwise
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise PixArtError(f"T5 weights are incomplete; missing {left[:5]}.")
    return model


def _quantised_linear(weight: torch.Tensor, precision: str, device: torch.device) -> nn.Module:
    import bitsandbytes as bnb

    out_features, in_features = weight.shape
    if precision == "int8":
        layer = bnb.nn.Linear8bitLt(
            in_features, out_features, bias=False, has_fp16_weights=False, threshold=6.0, device="meta"
        )
        # Int8Params quantise themselves when moved to a device
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False).to(device)
    else:
        layer = bnb.nn.Linear4bit(
            in_features, out_features, bias=False, compute_dtype=COMPUTE_DTYPE[precision], quant_type="nf4",
            device="meta",
        )
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", module=layer).to(device)
    return layer


class _UncastFFOutput(nn.Module):
    """A 4-bit `wo` behind a module without a `weight` tensor: transformers' T5 casts wo's input to `wo.weight.dtype`
    (uint8 for 4-bit storage) unless that is int8 or not a tensor."""

    weight = None

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _weight_only_ff_output(weight: torch.Tensor, kind: str, device: torch.device) -> nn.Module:
    """`wo` quantised with bf16 activations (no fp16 anywhere): int8 weight-only, or nf4."""
    if kind == "nf4":
        return _UncastFFOutput(_quantised_linear(weight, kind, device))
    from ..quantize import Int8WeightLinear

    return Int8WeightLinear(weight.to(device), None, COMPUTE_DTYPE[kind])


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, child = name.rsplit(".", 1)
    setattr(model.get_submodule(parent_name), child, new)


def load_t5_model(source: T5Source, precision: str, device: str | torch.device = "cpu") -> nn.Module:
    """Read the weights of `source` into a T5EncoderModel at `precision` on `device`."""
    if precision in QUANTISED:
        _require_bitsandbytes(precision)
    gguf = source.weight_files[0].suffix.lower() == ".gguf"
    if gguf:  # llama.cpp's names and quantisations (gguf imported here); the config comes from its metadata
        from .t5_gguf import GGUFTensorReader as reader_type
    else:
        reader_type = TensorReader
    with reader_type.open(source.weight_files) as reader:
        config = reader.config if gguf else read_t5_config(source, reader)

        def from_file(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            if name not in reader:
                raise PixArtError(
                    f"T5 weights in {[f.name for f in source.weight_files]} lack '{name}'; the file is incomplete "
                    "or not a T5 v1.1 encoder."
                )
            return reader.tensor(name)

        return build_t5_encoder(config, from_file, precision, device)


def _require_bitsandbytes(precision: str) -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise PixArtError(
            f"T5 precision '{precision}' needs bitsandbytes (pip install bitsandbytes>=0.45); "
            "or choose bf16 / fp16 / fp32."
        ) from e


def find_tokenizer_dir(candidates: Sequence[str | Path]) -> Path | None:
    """First folder among `candidates` that holds a T5 tokenizer (tokenizer.json or spiece.model)."""
    for c in candidates:
        d = Path(c).expanduser()
        if d.is_dir() and any((d / f).is_file() for f in _TOKENIZER_FILES):
            return d
    return None


def load_tokenizer(directory: str | Path):
    """A T5 tokenizer from local files only (never the hub)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as e:  # transformers raises several types (OSError, ValueError, EnvironmentError)
        raise PixArtError(f"Cannot load the T5 tokenizer from '{directory}': {e}") from e


def load_t5(
    path: str | Path,
    precision: str = "bf16",
    device: str | torch.device = "cpu",
    tokenizer_path: str | Path | None = None,
    tokenizer_fallbacks: Sequence[str | Path] = (),
    cache: PromptEmbeddingCache | None = None,
) -> T5TextEncoder:
    """Load a T5 encoder from a diffusers pipeline folder, a Hugging Face folder, a single .safetensors file or a
    .gguf file.

    precision: one of PRECISIONS: "fp32", "bf16", "fp16" (wo kept fp32), "int8" or "nf4" (wo quantised too), or
    "int8-wo-bf16" / "nf4-wo-bf16" (wo in bf16); the 8/4-bit ones through bitsandbytes, on the CPU or CUDA.
    Tokenizer: `tokenizer_path` if given, else the folder's tokenizer (tokenizer/ or the folder itself), else the
    first of `tokenizer_fallbacks` that holds one (the ComfyUI node passes ComfyUI's bundled t5_tokenizer folder).
    cache: keep encoded prompts there (see PromptEmbeddingCache); None keeps nothing.
    """
    if precision not in PRECISIONS:
        raise PixArtError(f"Unknown T5 precision '{precision}'; choose one of {', '.join(PRECISIONS)}.")
    source = locate_t5(path)
    if tokenizer_path is not None:
        tokenizer_dir = find_tokenizer_dir([tokenizer_path])
        if tokenizer_dir is None:
            raise PixArtError(
                f"No T5 tokenizer in '{tokenizer_path}' (expected tokenizer.json or spiece.model there)."
            )
    else:
        tokenizer_dir = find_tokenizer_dir([*source.tokenizer_candidates, *tokenizer_fallbacks])
        if tokenizer_dir is None:
            looked = [str(p) for p in [*source.tokenizer_candidates, *tokenizer_fallbacks]]
            raise PixArtError(
                f"No T5 tokenizer found for '{path}' (looked in {looked}). Put the T5 v1.1 tokenizer files "
                "(tokenizer.json, tokenizer_config.json, special_tokens_map.json) in a folder and pass it as the "
                "tokenizer path, or use the diffusers pipeline folder, which has tokenizer/."
            )
    tokenizer = load_tokenizer(tokenizer_dir)
    model = load_t5_model(source, precision, device)

    def reload(to_device: torch.device) -> nn.Module:
        return load_t5_model(source, precision, to_device)

    identity = f"{source.identity}|{tokenizer_dir.resolve()}"
    return T5TextEncoder(model, tokenizer, precision, identity=identity, reload=reload, cache=cache)
