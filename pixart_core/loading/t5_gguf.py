"""Read a T5 encoder from a GGUF file (llama.cpp's T5 naming, as city96's t5-v1_1-xxl-encoder-*.gguf files use).

The `gguf` package (PyPI, the reader llama.cpp ships) opens the file; it is imported only when a .gguf file is read,
so importing the pack stays fast. Every tensor is dequantised on its own with `gguf.quants.dequantize` (numpy) and
handed to the same builder the safetensors files use, which casts it (or quantises it to int8 / nf4) into the
requested precision. The finished model is therefore exactly the one a safetensors file of these values would give;
the GGUF quantisation only changes the file size and the values (within its quantisation error).

Names: llama.cpp's T5 tensors (gguf.constants MODEL_TENSORS for MODEL_ARCH.T5 / T5ENCODER, and its
tensor_mapping.py, which maps transformers' names to them) map back to transformers' T5EncoderModel:
`token_embd` -> `shared`, `enc.blk.N.attn_q` -> `encoder.block.N.layer.0.SelfAttention.q`, `ffn_gate` -> `wi_0`,
`ffn_up` -> `wi_1` (or `wi` in the original, ungated T5), `ffn_down` -> `wo`, `enc.output_norm` ->
`encoder.final_layer_norm`. Decoder (`dec.*`) and `output` tensors of a full T5 are ignored.

Config: read off the tensor shapes (as for a single safetensors file) and checked against the file's metadata
(`t5encoder.*` or `t5.*`: embedding / feed-forward length, block count, head count, key length, relative buckets,
layer-norm epsilon). llama.cpp stores no relative-attention max distance: it uses T5's 128, as does the default here.
"""

from __future__ import annotations

import mmap
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ..errors import PixArtError

ARCHITECTURES = ("t5encoder", "t5")
# the storage types city96's T5 files use (F16 ... Q3_K_L mixes) and the other classic llama.cpp types
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K",
                   "Q5_0", "Q5_1", "Q4_0", "Q4_1")

_BLOCK_NAMES = {  # llama.cpp name inside enc.blk.N -> transformers name inside encoder.block.N (gated T5 v1.1)
    "attn_norm": "layer.0.layer_norm",
    "attn_q": "layer.0.SelfAttention.q",
    "attn_k": "layer.0.SelfAttention.k",
    "attn_v": "layer.0.SelfAttention.v",
    "attn_o": "layer.0.SelfAttention.o",
    "attn_rel_b": "layer.0.SelfAttention.relative_attention_bias",
    "ffn_norm": "layer.1.layer_norm",
    "ffn_gate": "layer.1.DenseReluDense.wi_0",
    "ffn_up": "layer.1.DenseReluDense.wi_1",
    "ffn_down": "layer.1.DenseReluDense.wo",
}
_UNGATED_UP = "layer.1.DenseReluDense.wi"  # the original T5 (ReLU): ffn_up alone
_GLOBAL_NAMES = {"token_embd.weight": "shared.weight", "enc.output_norm.weight": "encoder.final_layer_norm.weight"}
_BLOCK_TENSOR = re.compile(r"enc\.blk\.(\d+)\.(\w+)\.weight")


def hf_names(gguf_names: Sequence[str]) -> dict[str, str]:
    """transformers T5EncoderModel name -> llama.cpp name, for the encoder tensors among `gguf_names`."""
    gated = any(n.endswith(".ffn_gate.weight") for n in gguf_names)
    out = {}
    for name in gguf_names:
        if name in _GLOBAL_NAMES:
            out[_GLOBAL_NAMES[name]] = name
        elif (m := _BLOCK_TENSOR.fullmatch(name)) and m.group(2) in _BLOCK_NAMES:
            inner = _BLOCK_NAMES[m.group(2)] if gated or m.group(2) != "ffn_up" else _UNGATED_UP
            out[f"encoder.block.{m.group(1)}.{inner}.weight"] = name
    return out


def expected_gguf_names(num_layers: int, gated: bool) -> list[str]:
    """Every tensor a complete T5 encoder of `num_layers` blocks has, in llama.cpp's names."""
    per_block = [k for k in _BLOCK_NAMES if k != "attn_rel_b" and (gated or k != "ffn_gate")]
    names = ["token_embd.weight", "enc.output_norm.weight", "enc.blk.0.attn_rel_b.weight"]
    return names + [f"enc.blk.{i}.{k}.weight" for i in range(num_layers) for k in per_block]


class GGUFTensorReader:
    """Name -> tensor over one GGUF file, in transformers' T5EncoderModel names (the interface of
    t5_loading.TensorReader), dequantised tensor by tensor from the memory-mapped file; `config` is the T5Config."""

    def __init__(self, path: Path, reader):
        self.path = path
        self._reader = reader
        self._tensors = {t.name: t for t in reader.tensors}
        self._names = hf_names(list(self._tensors))
        self.config = _checked_config(self)
        for gguf_name in self._names.values():  # refused before anything is dequantised
            kind = self._tensors[gguf_name].tensor_type.name
            if kind not in SUPPORTED_TYPES:
                raise PixArtError(
                    f"'{path.name}': tensor '{gguf_name}' is stored as {kind}, which this loader does not read "
                    f"(it reads {', '.join(SUPPORTED_TYPES)}). Use another quantisation of the file (Q8_0, Q6_K, "
                    "Q5_K_M, Q4_K_M ...)."
                )

    @classmethod
    @contextmanager
    def open(cls, files: Sequence[Path]) -> Iterator[GGUFTensorReader]:
        if len(files) != 1:
            raise PixArtError(f"A GGUF T5 is one file; got {[f.name for f in files]}.")
        path = Path(files[0])
        try:
            from gguf import GGUFReader
        except ImportError as e:
            raise PixArtError("Reading .gguf files needs the gguf package (pip install gguf).") from e
        try:
            reader = GGUFReader(str(path))
        except Exception as e:  # gguf raises ValueError, KeyError, IndexError... for a damaged or cut-off file
            raise PixArtError(f"Cannot read '{path.name}' as GGUF ({type(e).__name__}: {e}); the file is damaged or "
                              "incomplete. Download it again.") from e
        yield cls(path, reader)  # the memory map closes with the reader; the built model owns copies

    def metadata(self, key: str):
        """The value of a metadata key (a number or a string), or None."""
        field = self._reader.get_field(key)
        if field is None:
            return None
        try:
            return field.contents()
        except Exception as e:  # a field of the wrong kind in a damaged file
            raise PixArtError(f"'{self.path.name}': unreadable GGUF metadata '{key}' ({e}).") from e

    def keys(self) -> list[str]:
        return list(self._names)

    def gguf_keys(self):
        """The tensor names as the file spells them (llama.cpp's)."""
        return self._tensors.keys()

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._names:
            raise KeyError(name)
        return tuple(int(d) for d in reversed(self._tensors[self._names[name]].shape))  # ggml lists dims reversed

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor in its own storage precision (F16/BF16 stay 16-bit) or fp32 for quantised types; a copy, never
        a view of the memory map."""
        t = self._tensors[self._names[name]]
        out = dequantize(t.data, t.tensor_type).reshape(self.shape(name))
        self._release_pages(t.data_offset, t.n_bytes)
        return out

    def _release_pages(self, offset: int, size: int) -> None:
        """Unmap the file pages of a tensor that has been copied: without this every page read stays in the process's
        resident set until the file is closed (the page cache keeps them; only the process's count drops)."""
        mm = getattr(self._reader.data, "_mmap", None)
        if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):  # Windows: no madvise
            return
        start = offset - offset % mmap.PAGESIZE
        try:
            mm.madvise(mmap.MADV_DONTNEED, start, offset + size - start)
        except (OSError, ValueError):  # only a resident-set saving; never a reason to fail a load
            pass


def dequantize(data: np.ndarray, qtype) -> torch.Tensor:
    """One GGUF tensor's data as a torch tensor that owns its memory: F32/F16/BF16 copied as they are, every
    quantised type through gguf.quants.dequantize (fp32)."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize as gguf_dequantize

    with warnings.catch_warnings():  # a memory-mapped array is read-only; every path below copies it
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        if qtype in (Q.F32, Q.F16):
            return torch.from_numpy(np.array(data))
        if qtype == Q.BF16:  # raw bytes, two per value: viewed, not widened to fp32
            return torch.from_numpy(np.array(data)).view(torch.bfloat16)
        return torch.from_numpy(gguf_dequantize(data, qtype))


def _checked_config(reader: GGUFTensorReader):
    """The T5Config read off the shapes, checked against the architecture and the metadata llama.cpp writes."""
    from .t5_loading import infer_t5_config

    name = reader.path.name
    arch = reader.metadata("general.architecture")
    if arch not in ARCHITECTURES:
        raise PixArtError(f"'{name}' is a GGUF of a '{arch}' model, not a T5 encoder (expected architecture "
                          f"{' or '.join(ARCHITECTURES)}). Pick the T5 v1.1 XXL encoder file.")
    if "enc.blk.1.attn_rel_b.weight" in reader.gguf_keys():  # a relative bias in every block
        raise PixArtError(f"'{name}' is a UMT5 encoder (a relative attention bias in every block), not T5 v1.1 XXL.")
    config = infer_t5_config(reader)
    missing = [n for n in expected_gguf_names(config.num_layers, config.is_gated_act) if n not in reader.gguf_keys()]
    if missing:
        raise PixArtError(f"'{name}' lacks {len(missing)} T5 tensors ({', '.join(missing[:4])}"
                          f"{' ...' if len(missing) > 4 else ''}); the file is incomplete. Download it again.")
    checks = {  # metadata key -> the value the tensor shapes give
        "embedding_length": config.d_model,
        "feed_forward_length": config.d_ff,
        "block_count": config.num_layers,
        "attention.head_count": config.num_heads,
        "attention.key_length": config.d_kv,
        "attention.value_length": config.d_kv,
        "attention.relative_buckets_count": config.relative_attention_num_buckets,
    }
    for key, from_shapes in checks.items():
        stored = reader.metadata(f"{arch}.{key}")
        if stored is not None and (not isinstance(stored, (int, float)) or int(stored) != from_shapes):
            raise PixArtError(f"'{name}': metadata {arch}.{key} = {stored} but the tensors give {from_shapes}; "
                              "the file is inconsistent. Download it again.")
    eps = reader.metadata(f"{arch}.attention.layer_norm_rms_epsilon") or reader.metadata(
        f"{arch}.attention.layer_norm_epsilon")
    if eps is not None:
        config.layer_norm_epsilon = float(eps)
    return config
