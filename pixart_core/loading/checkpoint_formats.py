"""Reading checkpoint files into state dicts, and renaming every released key layout into the original one.

Files: original `.pth` (`{'state_dict': ...}` or flat, opened with weights_only=True), single `.safetensors` (original or
diffusers layout), and diffusers folders (config.json + safetensors, sharded or not, fp16 variants; a pipeline root with
a transformer/ subfolder works too). Anything that is not a file we can read safely is refused with a PixArtError.
"""

from __future__ import annotations

import json
import mmap
import os
import pickle
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from ..errors import PixArtError

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")

# Prefixes some tools put in front of the original keys.
_STRIP_PREFIXES = ("module.", "model.diffusion_model.", "diffusion_model.", "model.", "net.")


class StateDictSource:
    """Lazy access to the tensors of one checkpoint: keys and shapes without reading data (safetensors), then
    one tensor at a time, so a loader never holds the file twice."""

    def __init__(self, path: str | os.PathLike, tensors: dict[str, torch.Tensor] | None = None,
                 files: list[Path] | None = None, config: dict | None = None):
        self.path = Path(path)
        self._tensors = tensors  # pickled checkpoints arrive whole (memory-mapped where the format allows)
        self._files = files or []  # safetensors files, read lazily
        self._index: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._offsets: dict[str, tuple[int, int]] = {}  # absolute byte range of each tensor in its file
        self.config = config  # diffusers config.json, when there is one
        # What the network predicts, where the files record it (a single file's safetensors metadata, or the
        # pipeline's scheduler_config.json beside a diffusers transformer folder); None when they do not say.
        self.prediction_type: str | None = None
        self.metadata: dict = {}  # the safetensors headers' string metadata (the first file's wins on a clash)
        if tensors is not None:
            self._shapes = {k: tuple(v.shape) for k, v in tensors.items()}
            self._dtypes = {k: v.dtype for k, v in tensors.items()}
        for f in self._files:
            entries, metadata = _safetensors_header(f)
            self.metadata = {**metadata, **self.metadata}
            self.prediction_type = self.prediction_type or metadata.get("prediction_type")
            for key, shape, dtype, offsets in entries:
                self._index[key] = f
                self._shapes[key] = shape
                self._dtypes[key] = dtype
                self._offsets[key] = offsets

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def dtypes(self) -> dict[str, torch.dtype]:
        return dict(self._dtypes)

    def get(self, key: str) -> torch.Tensor:
        return next(self.iter_tensors([key]))[1]

    def iter_tensors(self, keys: list[str] | None = None,
                     dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield tensors one at a time, floating ones cast to dtype. Safetensors data is read straight from the file
        into the tensor that is kept (a cast reads from a memory map of the file, or through a small reused staging
        buffer), so a loader holds one copy of the weights and nothing more."""
        wanted = list(self._shapes) if keys is None else keys
        if self._tensors is not None:
            for k in wanted:
                t = self._tensors[k]
                yield k, t.to(dtype) if dtype is not None and t.is_floating_point() else t
            return
        by_file: dict[Path, list[str]] = {}
        for k in wanted:
            by_file.setdefault(self._index[k], []).append(k)
        staging = torch.empty(0, dtype=torch.uint8)
        for path, ks in by_file.items():
            ks.sort(key=lambda k: self._offsets[k][0])  # sequential reads
            with open(path, "rb") as f, _memory_map(f) as mapped:
                for k in ks:
                    src = self._dtypes[k]
                    dst = dtype if dtype is not None and src.is_floating_point else src
                    out = torch.empty(self._shapes[k], dtype=dst)
                    start, end = self._offsets[k]
                    f.seek(start)
                    if dst == src:
                        _read_exact(f, out.view(-1).view(torch.uint8), path, k)
                    elif not _cast_from_map(mapped, start, end, src, out.view(-1)):
                        staging = _read_cast(f, end - start, src, out.view(-1), staging, path, k)
                    yield k, out


@contextmanager
def _one_thread() -> Iterator[None]:
    """One torch thread while a checkpoint is read and cast: the copies are memory-bound and gain nothing from a second
    thread, and on a busy CPU each two-thread op waits for its descheduled partner (full-size fp32 folder to bf16:
    1.56x diffusers' load time with two threads, 0.56x with one; bench_load.py, 2026-12-07). torch's thread count is
    process-wide, so it is restored as soon as the reading is done."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextmanager
def _memory_map(f) -> Iterator[mmap.mmap | None]:
    """A private read mapping of the file (None where the platform cannot map it)."""
    try:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # writable for torch.frombuffer; never written
    except (OSError, ValueError):
        yield None
        return
    try:
        yield mapped
    finally:
        mapped.close()


def _cast_from_map(mapped: mmap.mmap | None, start: int, end: int, src: torch.dtype, dest: torch.Tensor) -> bool:
    """Cast the bytes [start, end) straight from the file mapping into dest: one op per tensor and no read copy
    (full-size fp32 folder, one thread: 1.02 CPU s against 1.23 s for the chunked read + cast). The pages are then
    dropped from this process (they stay in the OS page cache), so the resident peak stays the kept weights plus one
    tensor. False where the data is not aligned for src (the caller reads it in chunks instead)."""
    if mapped is None or start % src.itemsize:
        return False
    if end == start:
        return True
    raw = torch.frombuffer(mapped, dtype=torch.uint8, count=end - start, offset=start)
    dest.copy_(raw.view(src))
    del raw  # the mapping cannot close while a tensor views it
    if hasattr(mapped, "madvise"):  # Unix; elsewhere the OS trims the mapped pages itself
        first = start - start % mmap.PAGESIZE
        mapped.madvise(mmap.MADV_DONTNEED, first, end - first)
    return True


def _read_exact(f, dest: torch.Tensor, path: Path, key: str) -> None:
    if dest.numel() and f.readinto(memoryview(dest.numpy())) != dest.numel():
        raise PixArtError(f"{path.name} is truncated while reading '{key}'. Download it again.")


def _read_cast(f, nbytes: int, src: torch.dtype, dest: torch.Tensor, staging: torch.Tensor, path: Path,
               key: str, chunk: int = 16 * 2**20) -> torch.Tensor:
    """Read nbytes of src-typed data in chunks and cast each into dest; returns the (reusable) staging buffer."""
    item = torch.empty(0, dtype=src).element_size()
    if staging.numel() < min(chunk, nbytes):
        staging = torch.empty(min(chunk, nbytes), dtype=torch.uint8)
    done = 0
    while done < nbytes:
        n = min(chunk, nbytes - done)
        _read_exact(f, staging[:n], path, key)
        dest[done // item: (done + n) // item] = staging[:n].view(src)
        done += n
    return staging


def _safetensors_header(path: Path) -> tuple[list[tuple[str, tuple[int, ...], torch.dtype, tuple[int, int]]], dict]:
    """Keys, shapes, dtypes and byte ranges from a safetensors header, checked against the file size (truncation
    shows here, before anything is read), and the header's string metadata."""
    dtypes = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or n > min(size - 8, 100 * 2**20):
                raise ValueError("header length out of range")
            header = json.loads(f.read(n))
        out = []
        end = 0
        metadata = header.get("__metadata__")
        metadata = metadata if isinstance(metadata, dict) else {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            if info["dtype"] not in dtypes:
                raise ValueError(f"unsupported dtype {info['dtype']} for {key}")
            a, b = info["data_offsets"]
            out.append((key, tuple(info["shape"]), dtypes[info["dtype"]], (8 + n + a, 8 + n + b)))
            end = max(end, b)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise PixArtError(f"{path.name} is not a valid safetensors file ({e}). It may be damaged or a different "
                          "format renamed; download it again.") from e
    if 8 + n + end > size:
        raise PixArtError(f"{path.name} is truncated: the header promises {8 + n + end} bytes but the file has {size}. "
                          "The download was probably interrupted; download it again.")
    return out, metadata


# Pickle opcodes that import or call something (INST, OBJ, REDUCE, BUILD, NEWOBJ, NEWOBJ_EX, EXT1-4): a file the
# weights-only reader stops at one of these is refused as unsafe; any other unknown byte means a damaged file.
_CODE_OPCODES = {ord(c) for c in "ioRb"} | {0x81, 0x92, 0x82, 0x83, 0x84}


def _refusal_or_damage(path: Path, e: pickle.UnpicklingError) -> PixArtError:
    """weights_only=True raises UnpicklingError both for a pickle that asks for code (a GLOBAL outside the tensor
    allow-list) and for bytes that are no pickle at all; the user needs a different message for each."""
    text = str(e)
    operand = re.search(r"Unsupported operand (\d+)", text)
    if "GLOBAL" in text or "Unsupported global" in text or (operand and int(operand.group(1)) in _CODE_OPCODES):
        return PixArtError(
            f"Refused to open {path.name}: it contains pickled objects other than tensors, which could run code on "
            "this machine. Use the .safetensors release of this model, or convert the file in a trusted environment."
        )
    return PixArtError(f"{path.name} is not a readable PyTorch checkpoint (it is damaged, truncated or another kind "
                       "of file with a .pth/.pt/.ckpt/.bin name). Download it again.")


def safe_torch_load(path: str | os.PathLike) -> object:
    """torch.load with weights_only=True (memory-mapped when the format allows): a pickle that would run code is
    refused, never executed, and every failure is a PixArtError naming the file."""
    path = Path(path)
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e).lower() and "zip" not in str(e).lower():
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        raise _refusal_or_damage(path, e) from e
    except (RuntimeError, EOFError, OSError, ValueError, UnicodeDecodeError) as e:
        text = str(e)
        # torch's reader errors are long and about its internals; the user needs only what it means
        reason = ("its zip archive is cut short or damaged" if "zip archive" in text or "central directory" in text
                  else "it ends too early" if isinstance(e, EOFError) else text.splitlines()[0][:160] if text
                  else type(e).__name__)
        raise PixArtError(f"Could not read {path.name} as a PyTorch checkpoint ({reason}). It may be damaged or "
                          "truncated; download it again.") from e


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True: a pickle that would run code is refused, never executed."""
    obj = safe_torch_load(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PixArtError(f"{path.name} holds no state dict of tensors; it is not a model checkpoint.")
    return obj


def _diffusers_weight_files(folder: Path) -> list[Path]:
    """The weight files of a diffusers model folder: sharded index, plain, or fp16 variant."""
    for index_name in ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json",
                       "diffusion_pytorch_model.fp16.safetensors.index.json"):
        index = folder / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise PixArtError(f"{folder} is missing shards {missing} listed in {index_name}; download them too.")
            return [folder / s for s in shards]
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                 "model.safetensors", "diffusion_pytorch_model.bf16.safetensors"):
        if (folder / name).is_file():
            return [folder / name]
    found = sorted(p for p in folder.glob("*.safetensors"))
    return found[:1] if len(found) == 1 else []


def open_checkpoint(path: str | os.PathLike) -> StateDictSource:
    """Open a file or folder in any supported layout; nothing is converted yet."""
    path = Path(path)
    try:
        path = path.resolve(strict=True)
    except (FileNotFoundError, RuntimeError) as e:  # RuntimeError: symlink loop
        raise PixArtError(f"Model path {path} does not exist or is a broken link ({e}).") from e
    if path.is_dir():
        folder = path / "transformer" if (path / "transformer").is_dir() else path
        files = _diffusers_weight_files(folder)
        if not files:
            pth = sorted(folder.glob("*.pth"))
            if len(pth) == 1:
                return open_checkpoint(pth[0])
            raise PixArtError(f"The folder {folder} contains no model weights (expected diffusion_pytorch_model"
                              ".safetensors, a sharded index, or one .safetensors/.pth file).")
        config = None
        if (folder / "config.json").is_file():
            config = json.loads((folder / "config.json").read_text())
        source = StateDictSource(path, files=files, config=config)
        scheduler_config = folder.parent / "scheduler" / "scheduler_config.json"
        if folder.name == "transformer" and scheduler_config.is_file():  # a pipeline records it in its scheduler
            source.prediction_type = json.loads(scheduler_config.read_text()).get("prediction_type")
        return source
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        config_file = path.with_name("config.json")
        config = json.loads(config_file.read_text()) if config_file.is_file() else None
        return StateDictSource(path, files=[path], config=config)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return StateDictSource(path, tensors=_load_pickle(path))
    raise PixArtError(f"{path.name}: unsupported file type '{path.suffix}'. Use .safetensors, .pth or a diffusers folder.")


# ---------------------------------------------------------------------------------------------------------------
# Key layouts
# ---------------------------------------------------------------------------------------------------------------

_DIFFUSERS_SIMPLE = [
    (r"^pos_embed\.proj\.", "x_embedder.proj."),
    (r"^caption_projection\.linear_1\.", "y_embedder.y_proj.fc1."),
    (r"^caption_projection\.linear_2\.", "y_embedder.y_proj.fc2."),
    (r"^adaln_single\.emb\.timestep_embedder\.linear_1\.", "t_embedder.mlp.0."),
    (r"^adaln_single\.emb\.timestep_embedder\.linear_2\.", "t_embedder.mlp.2."),
    (r"^adaln_single\.emb\.resolution_embedder\.linear_1\.", "csize_embedder.mlp.0."),
    (r"^adaln_single\.emb\.resolution_embedder\.linear_2\.", "csize_embedder.mlp.2."),
    (r"^adaln_single\.emb\.aspect_ratio_embedder\.linear_1\.", "ar_embedder.mlp.0."),
    (r"^adaln_single\.emb\.aspect_ratio_embedder\.linear_2\.", "ar_embedder.mlp.2."),
    (r"^adaln_single\.linear\.", "t_block.1."),
    (r"^proj_out\.", "final_layer.linear."),
    (r"^scale_shift_table$", "final_layer.scale_shift_table"),
]
_DIFFUSERS_BLOCK = [
    (r"scale_shift_table$", "scale_shift_table"),
    (r"attn1\.to_out\.0\.", "attn.proj."),
    (r"attn2\.to_q\.", "cross_attn.q_linear."),
    (r"attn2\.to_out\.0\.", "cross_attn.proj."),
    (r"ff\.net\.0\.proj\.", "mlp.fc1."),
    (r"ff\.net\.2\.", "mlp.fc2."),
    (r"attn1\.norm_q\.", "attn.q_norm."),
    (r"attn1\.norm_k\.", "attn.k_norm."),
]
# Diffusers splits the fused projections of the original: attn.qkv = [to_q; to_k; to_v], kv_linear = [to_k; to_v].
_FUSED = {
    "attn.qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
    "cross_attn.kv_linear": ("attn2.to_k", "attn2.to_v"),
}


def is_diffusers_layout(keys) -> bool:
    return any(k.startswith(("transformer_blocks.", "adaln_single.", "caption_projection.")) for k in keys)


def strip_prefix(keys: list[str]) -> str:
    """The common wrapper prefix in front of the original keys ('' when none)."""
    for prefix in _STRIP_PREFIXES:
        if keys and all(k.startswith(prefix) for k in keys):
            return prefix
    return ""


def block_key_plan(block_prefix_in: str, block_prefix_out: str, keys: set[str]) -> dict[str, list[str]]:
    """Within one diffusers block: original key -> the diffusers keys it is made of (fused ones concatenated)."""
    plan: dict[str, list[str]] = {}
    rest = {k[len(block_prefix_in):] for k in keys if k.startswith(block_prefix_in)}
    for fused, parts in _FUSED.items():
        for suffix in ("weight", "bias"):
            src = [f"{p}.{suffix}" for p in parts]
            if all(s in rest for s in src):
                plan[f"{block_prefix_out}{fused}.{suffix}"] = [block_prefix_in + s for s in src]
                rest -= set(src)
    for k in sorted(rest):
        new = k
        for pattern, repl in _DIFFUSERS_BLOCK:
            if re.search(pattern, new):
                new = re.sub(pattern, repl, new)
                break
        plan[block_prefix_out + new] = [block_prefix_in + k]
    return plan


def diffusers_to_original_plan(keys: list[str]) -> dict[str, list[str]]:
    """Original key -> list of diffusers keys (one, or several to concatenate along dim 0)."""
    keyset = set(keys)
    plan: dict[str, list[str]] = {}
    blocks = sorted({int(m.group(1)) for k in keys if (m := re.match(r"transformer_blocks\.(\d+)\.", k))})
    for i in blocks:
        plan.update(block_key_plan(f"transformer_blocks.{i}.", f"blocks.{i}.", keyset))
    for k in keys:
        if k.startswith("transformer_blocks."):
            continue
        new = k
        for pattern, repl in _DIFFUSERS_SIMPLE:
            if re.search(pattern, new):
                new = re.sub(pattern, repl, new)
                break
        plan[new] = [k]
    return plan


def diffusers_name_to_original(name: str) -> tuple[str, int, int]:
    """One diffusers module name -> (original module name, part, parts). part/parts place it among the projections
    the original fuses (attn1.to_k is part 1 of 3 of attn.qkv); unfused names give (name, 0, 1), and names that are
    already original pass through unchanged."""
    m = re.match(r"transformer_blocks\.(\d+)\.(.*)$", name)
    if m:
        for fused, parts in _FUSED.items():
            if m.group(2) in parts:
                return f"blocks.{m.group(1)}.{fused}", parts.index(m.group(2)), len(parts)
    (renamed,) = diffusers_to_original_plan([name + ".weight"])
    return renamed[: -len(".weight")], 0, 1


def original_plan(keys: list[str], prefix: str = "") -> dict[str, list[str]]:
    """Original layout under a prefix: original key -> [file key]."""
    return {k[len(prefix):]: [k] for k in keys if k.startswith(prefix)}


def materialise(source: StateDictSource, plan: dict[str, list[str]], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Read the planned tensors, each cast to dtype as it arrives; fused ones are written into their place in a
    preallocated tensor, so no part is held twice."""
    shapes = source.shapes()
    out: dict[str, torch.Tensor] = {}
    owner = {parts[0]: name for name, parts in plan.items() if len(parts) == 1}
    slot: dict[str, tuple[str, int]] = {}  # file key -> (model key, first row) for fused tensors
    for name, parts in plan.items():
        if len(parts) > 1:
            row = 0
            for part in parts:
                slot[part] = (name, row)
                row += shapes[part][0]
    with _one_thread():
        for key, tensor in source.iter_tensors([k for parts in plan.values() for k in parts], dtype):
            if key not in slot:
                out[owner[key]] = tensor
                continue
            name, row = slot[key]
            if name not in out:
                total = sum(shapes[p][0] for p in plan[name])
                out[name] = torch.empty((total, *tensor.shape[1:]), dtype=tensor.dtype)
            out[name][row: row + tensor.shape[0]] = tensor
    return out


def planned_shape(plan: dict[str, list[str]], shapes: dict[str, tuple], key: str) -> tuple | None:
    """The shape a model tensor gets from its planned file tensors (fused ones stacked along dim 0); None if unplanned."""
    parts = plan.get(key)
    if not parts:
        return None
    s = [shapes[p] for p in parts]
    return (sum(x[0] for x in s), *s[0][1:]) if len(s) > 1 else tuple(s[0])


def verify_plan(expected: dict[str, tuple], plan: dict[str, list[str]], shapes: dict[str, tuple], *,
                mismatch: str, kind: str, tensor_label: str, needed_by: str) -> None:
    """Refuse a file whose planned tensors do not fill the model exactly: missing, unknown or wrongly shaped tensors,
    each named. mismatch opens the message; kind names what the file might be ("a model type"); tensor_label and
    needed_by word the single-tensor message ("Tensor 'k' has shape ... but the detected model needs ...")."""
    missing = sorted(set(expected) - set(plan))
    unexpected = sorted(set(plan) - set(expected))
    if missing or unexpected:
        def show(ks):
            return ", ".join(ks[:6]) + (f" and {len(ks) - 6} more" if len(ks) > 6 else "")
        raise PixArtError(
            mismatch
            + (f"Missing: {show(missing)}. " if missing else "")
            + (f"Not understood: {show(unexpected)}. " if unexpected else "")
            + f"The file may be incomplete, or {kind} this loader does not know."
        )
    for k in expected:
        got = planned_shape(plan, shapes, k)
        if got != expected[k]:
            raise PixArtError(f"{tensor_label} '{k}' has shape {got} but the detected {needed_by} needs {expected[k]}.")

