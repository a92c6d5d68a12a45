"""GGUF T5 files: a tiny T5EncoderModel written to GGUF the way llama.cpp's converter does, read back and encoded.

The oracle is the transformers T5EncoderModel the file was written from. Names come from the gguf package's own
transformers -> llama.cpp map (gguf.get_tensor_name_map for MODEL_ARCH.T5ENCODER), metadata as llama.cpp's
convert_hf_to_gguf.py T5EncoderModel.set_gguf_parameters writes it. F32/F16/BF16/Q8_0/Q5_x/Q4_x are written with
gguf.quants.quantize; the gguf package has no K-quant quantiser (only dequantisers), so Q6_K, Q5_K and Q4_K blocks are
packed here by a plain quantiser written from ggml's block layouts (a wrong layout would fail the accuracy checks).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pixart_core.errors import PixArtError
from pixart_core.text_encoder import T5TextEncoder
from pixart_core.loading.t5_loading import load_t5, load_tokenizer
from tests.conftest import T5_TOKENIZER

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["A small cactus with a happy face in the Sahara desert", "two red apples on a blue plate, studio light"]
LENGTH = 32
# Q4_K_M in llama.cpp keeps some attn_v / ffn_down in Q6_K; the mix here does the same for all of them
Q4_K_M = {"attn_v": "Q6_K", "ffn_down": "Q6_K", "": "Q4_K"}
Q5_K_M = {"attn_v": "Q6_K", "ffn_down": "Q6_K", "": "Q5_K"}


def tiny_config():
    from transformers import T5Config

    # d_model, d_ff and heads x d_kv are multiples of 256: the K-quants' block length along a row
    return T5Config(vocab_size=32128, d_model=256, d_ff=512, num_layers=2, num_heads=4, d_kv=64,
                    is_gated_act=True, dense_act_fn="gelu_pytorch_tanh", layer_norm_epsilon=1e-6)


@pytest.fixture(scope="module")
def reference():
    from transformers import T5EncoderModel

    torch.manual_seed(0)
    model = T5EncoderModel(tiny_config()).eval()
    return T5TextEncoder(model, load_tokenizer(T5_TOKENIZER), "fp32")


# ----------------------------------------------------------------------------------------- K-quants, from ggml's layout
def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def _k_scales_and_mins(rows: np.ndarray, levels: int):
    """Q4_K/Q5_K: blocks of 256 = 8 sub-blocks of 32, x = d * sc_j * q - dmin * m_j with q in 0..levels,
    6-bit sc/m packed in 12 bytes; returns (d, dmin, packed scales, q)."""
    x = rows.reshape(-1, 8, 32).astype(np.float32)
    lo, hi = np.minimum(x.min(-1), 0), x.max(-1)
    scale, offset = (hi - lo) / levels, -lo
    d = _f16(scale.max(-1, keepdims=True) / 63)
    dmin = _f16(offset.max(-1, keepdims=True) / 63)
    sc = np.round(scale / np.where(d == 0, 1, d).astype(np.float32)).clip(0, 63).astype(np.uint8)
    m = np.round(offset / np.where(dmin == 0, 1, dmin).astype(np.float32)).clip(0, 63).astype(np.uint8)
    step = (d.astype(np.float32) * sc)[..., None]
    q = np.round((x + (dmin.astype(np.float32) * m)[..., None]) / np.where(step == 0, 1, step)).clip(0, levels)
    scales = np.concatenate([(sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6), (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6),
                             (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)], axis=-1)
    return d.view(np.uint8), dmin.view(np.uint8), scales, q.astype(np.uint8)


def _low_nibbles(q: np.ndarray) -> np.ndarray:
    return ((q[:, 0::2] & 15) | ((q[:, 1::2] & 15) << 4)).reshape(len(q), 128)  # byte [g, j]: sub-blocks 2g, 2g+1


def quantise_q4_k(rows: np.ndarray) -> np.ndarray:
    """144-byte blocks: d, dmin (fp16), 12 bytes of scales, 128 bytes of 4-bit codes."""
    d, dmin, scales, q = _k_scales_and_mins(rows, 15)
    return np.concatenate([d, dmin, scales, _low_nibbles(q)], axis=-1).reshape(rows.shape[0], -1)


def quantise_q5_k(rows: np.ndarray) -> np.ndarray:
    """176-byte blocks: as Q4_K plus 32 bytes holding each code's fifth bit (bit j of byte i: sub-block j, value i)."""
    d, dmin, scales, q = _k_scales_and_mins(rows, 31)
    qh = sum((q[:, j] >> 4) << j for j in range(8)).astype(np.uint8)
    return np.concatenate([d, dmin, scales, qh, _low_nibbles(q)], axis=-1).reshape(rows.shape[0], -1)


def quantise_q6_k(rows: np.ndarray) -> np.ndarray:
    """Blocks of 256 = 16 groups of 16: x = d * sc_g * (q - 32), q 6-bit (4 low bits in ql, 2 high in qh), sc int8;
    210 bytes."""
    x = rows.reshape(-1, 16, 16).astype(np.float32)
    scale = np.abs(x).max(-1) / 31
    d = _f16(scale.max(-1, keepdims=True) / 127)
    sc = np.round(scale / np.where(d == 0, 1, d).astype(np.float32)).clip(0, 127).astype(np.int8)
    step = (d.astype(np.float32) * sc)[..., None]
    q = (np.round(x / np.where(step == 0, 1, step)).clip(-32, 31) + 32).astype(np.uint8).reshape(-1, 2, 128)
    low, high = q & 15, q >> 4
    ql = (low[..., :64] | (low[..., 64:] << 4)).reshape(-1, 128)
    qh = sum(high[..., 32 * s: 32 * (s + 1)] << (2 * s) for s in range(4)).astype(np.uint8).reshape(-1, 64)
    out = np.concatenate([ql, qh, sc.view(np.uint8), d.view(np.uint8)], axis=-1)
    return out.reshape(rows.shape[0], -1)


K_QUANTISERS = {"Q4_K": quantise_q4_k, "Q5_K": quantise_q5_k, "Q6_K": quantise_q6_k}


# ------------------------------------------------------------------------------------------------------ GGUF writer
def tensor_kind(gguf_name: str, kinds: str | dict) -> str:
    if isinstance(kinds, str):
        return kinds
    return next(kind for part, kind in kinds.items() if part in gguf_name)


def write_gguf(model, path: Path, kinds: str | dict = "F32", arch: str = "t5encoder", drop=(), overrides=None) -> Path:
    """`model`'s encoder in llama.cpp's names and metadata; 1-D norms in F32 (as llama.cpp keeps them), 2-D tensors
    in `kinds` where the row length allows it, else F16."""
    cfg = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.T5ENCODER, cfg.num_layers)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(512)
    writer.add_embedding_length(cfg.d_model)
    writer.add_feed_forward_length(cfg.d_ff)
    writer.add_block_count(cfg.num_layers)
    writer.add_head_count(cfg.num_heads)
    writer.add_key_length(cfg.d_kv)
    writer.add_value_length(cfg.d_kv)
    writer.add_layer_norm_eps(cfg.layer_norm_epsilon)
    writer.add_relative_attn_buckets_count(cfg.relative_attention_num_buckets)
    writer.add_layer_norm_rms_eps(cfg.layer_norm_epsilon)
    for hf_name, value in model.state_dict().items():
        if hf_name == "encoder.embed_tokens.weight":  # tied to shared.weight
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight",))
        if name in drop:
            continue
        array = value.float().numpy()
        kind = (overrides or {}).get(name) or tensor_kind(name, kinds)
        if array.ndim == 1 or kind == "F32":
            writer.add_tensor(name, array)
        elif kind == "F16" or array.shape[-1] % gguf.GGML_QUANT_SIZES[Q[kind]][0]:
            writer.add_tensor(name, array.astype(np.float16))
        else:
            quantise = K_QUANTISERS.get(kind) or (lambda a, k=kind: gguf.quants.quantize(a, Q[k]))
            writer.add_tensor(name, quantise(array), raw_dtype=Q[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def files(reference, tmp_path_factory):
    root = tmp_path_factory.mktemp("t5_gguf")
    kinds = {"F32": "F32", "F16": "F16", "BF16": "BF16", "Q8_0": "Q8_0", "Q6_K": "Q6_K", "Q5_K_M": Q5_K_M,
             "Q4_K_M": Q4_K_M, "Q5_1": "Q5_1", "Q4_0": "Q4_0"}
    return {k: write_gguf(reference.model, root / f"t5-tiny-encoder-{k}.gguf", v) for k, v in kinds.items()}


def load(path, precision="fp32") -> T5TextEncoder:
    return load_t5(path, precision=precision, tokenizer_path=T5_TOKENIZER)


def cosine(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    valid = mask.bool()
    return F.cosine_similarity(a.float()[valid], b.float()[valid], dim=-1).mean().item()


# ------------------------------------------------------------------------------------------------------- accuracy
def test_f32_gguf_is_the_original_model(files, reference):
    encoder = load(files["F32"])
    expected = reference.model.state_dict()
    got = encoder.model.state_dict()
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    assert encoder.model.encoder.embed_tokens.weight is encoder.model.shared.weight
    for field in ("vocab_size", "d_model", "d_ff", "num_layers", "num_heads", "d_kv", "is_gated_act",
                  "relative_attention_num_buckets", "relative_attention_max_distance"):
        assert getattr(encoder.model.config, field) == getattr(reference.model.config, field), field
    # eps is stored as float32 (1e-6 -> 9.99999997e-07): fp32 rounding of the norms, nothing more
    ours, mask = encoder.encode(PROMPTS, LENGTH)
    theirs, _ = reference.encode(PROMPTS, LENGTH)
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-5 * theirs.abs().max().item())


def test_original_ungated_t5_maps_ffn_up_to_wi(tmp_path):
    """The original T5 (ReLU, one `wi`): llama.cpp writes it as ffn_up with no ffn_gate."""
    from transformers import T5EncoderModel

    config = tiny_config()
    config.is_gated_act, config.dense_act_fn, config.num_layers = False, "relu", 1
    torch.manual_seed(1)
    original = T5EncoderModel(config).eval()
    encoder = load(write_gguf(original, tmp_path / "t5-original.gguf"))
    assert not encoder.model.config.is_gated_act
    expected = original.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in encoder.model.state_dict().items())


# Weight error bound per type, relative to each tensor's largest magnitude a: half a quantisation step (a full one
# where a type clips), plus the rounding of the block scales (fp16: 2^-11 of the scale; K-quants: 6/8-bit sub-block
# scales, half a scale step times the largest code).
F16_EPS = 2**-11
WEIGHT_BOUND = {
    "F16": F16_EPS,
    "BF16": 2**-8,
    "Q8_0": 1 / 254 + F16_EPS,  # q = round(x / d), d = a / 127
    "Q5_1": 1 / 31 + 3 * F16_EPS,  # 32 levels over [min, max] (width <= 2a); d and min in fp16
    "Q4_0": 1 / 8 + 8 * F16_EPS,  # d = a / 8 signed: the value opposite the largest clips at code 15, a full step
    "Q6_K": 1 / 62 + 32 / (2 * 31 * 127) + 32 * F16_EPS,  # step a/31 per 16 values; 8-bit scale of d = a/31/127
    "Q5_K_M": 1 / 31 + 1 / 63 + 1 / 126 + 32 * F16_EPS,  # Q5_K: step <= 2a/31; 6-bit scales and mins (Q6_K parts less)
    "Q4_K_M": 1 / 15 + 1 / 63 + 1 / 126 + 16 * F16_EPS,  # Q4_K: step <= 2a/15; 6-bit scales and mins (Q6_K parts less)
}
# measured on this seed (see docs/t5.md), floors a little below
COSINE_FLOOR = {"F16": 0.99999, "BF16": 0.9999, "Q8_0": 0.9995, "Q5_1": 0.99, "Q4_0": 0.96, "Q6_K": 0.998,
                "Q5_K_M": 0.99, "Q4_K_M": 0.97}


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("kind", list(WEIGHT_BOUND))
def test_quantised_files_encode_within_their_quantisation_error(files, reference, kind, record_property):
    encoder = load(files[kind])
    expected = reference.model.state_dict()
    for name, value in encoder.model.state_dict().items():
        err = (value.float() - expected[name]).abs().max().item()
        assert err <= WEIGHT_BOUND[kind] * expected[name].abs().max().item() + 1e-12, (name, err)
    ours, mask = encoder.encode(PROMPTS, LENGTH)
    theirs, _ = reference.encode(PROMPTS, LENGTH)
    similarity = cosine(ours, theirs, mask)
    record_property(f"cosine_{kind}", similarity)
    print(f"{kind}: cosine to the fp32 original {similarity:.6f}")
    assert similarity >= COSINE_FLOOR[kind]


@pytest.mark.usefixtures("one_torch_thread")
def test_precision_applies_to_a_gguf(files, reference):
    encoder = load(files["Q8_0"], precision="bf16")
    assert encoder.model.shared.weight.dtype == torch.bfloat16
    ours, mask = encoder.encode(PROMPTS, LENGTH)
    theirs, _ = reference.encode(PROMPTS, LENGTH)
    assert cosine(ours, theirs, mask) >= 0.999


# ------------------------------------------------------------------------------------------------------ bad files
def test_truncated_gguf_is_one_clear_error(files, tmp_path):
    data = files["Q8_0"].read_bytes()
    for size in (len(data) // 2, 100, 3):
        cut = tmp_path / f"cut-{size}.gguf"
        cut.write_bytes(data[:size])
        with pytest.raises(PixArtError, match="damaged or incomplete"):
            load(cut)


def test_llama_gguf_is_refused_with_what_it_is(reference, tmp_path):
    path = write_gguf(reference.model, tmp_path / "llama-3-8b.gguf", arch="llama")
    with pytest.raises(PixArtError, match="'llama' model, not a T5 encoder"):
        load(path)


def test_missing_tensors_are_named(reference, tmp_path):
    path = write_gguf(reference.model, tmp_path / "t5-missing.gguf", drop={"enc.blk.1.ffn_down.weight"})
    with pytest.raises(PixArtError, match=r"lacks 1 T5 tensors \(enc\.blk\.1\.ffn_down\.weight\)"):
        load(path)
    path = write_gguf(reference.model, tmp_path / "t5-no-embedding.gguf", drop={"token_embd.weight"})
    with pytest.raises(PixArtError, match="shared.weight"):
        load(path)


def test_metadata_that_contradicts_the_tensors_is_refused(reference, tmp_path):
    model = reference.model  # its config says 8 heads while the file is written, its tensors have 4
    real_heads = model.config.num_heads
    model.config.num_heads = 8
    try:
        path = write_gguf(model, tmp_path / "t5-bad-meta.gguf")
    finally:
        model.config.num_heads = real_heads
    with pytest.raises(PixArtError, match="head_count = 8 but the tensors give 4"):
        load(path)


def test_unsupported_type_is_refused_by_name(reference, tmp_path):
    path = write_gguf(reference.model, tmp_path / "t5-tq2.gguf", overrides={"enc.blk.0.ffn_up.weight": "TQ2_0"})
    with pytest.raises(PixArtError, match="'enc.blk.0.ffn_up.weight' is stored as TQ2_0"):
        load(path)


# ---------------------------------------------------------------------------------------------------------- nodes
@pytest.fixture
def node_env(files, tmp_path):
    from pixart_nodes import comfy_bridge as bridge
    from pixart_nodes import model_cache

    for folder in ("text_encoders", "clip"):
        (tmp_path / folder).mkdir()
    shutil.copy(files["Q8_0"], tmp_path / "text_encoders" / "t5-v1_1-xxl-encoder-Q8_0.gguf")
    shutil.copy(files["Q4_K_M"], tmp_path / "clip" / "t5-v1_1-xxl-encoder-Q4_K_M.gguf")
    (tmp_path / "text_encoders" / "notes.txt").write_text("not a model")
    bridge.set_models_root(tmp_path)
    bridge.set_t5_tokenizer_dir(T5_TOKENIZER)
    yield bridge
    bridge.set_models_root(None)
    bridge.set_t5_tokenizer_dir(None)
    model_cache.clear_all()


GGUF_NAMES = ["t5-v1_1-xxl-encoder-Q4_K_M.gguf", "t5-v1_1-xxl-encoder-Q8_0.gguf"]


@pytest.mark.usefixtures("one_torch_thread")
def test_t5_loader_node_lists_and_loads_gguf_files(node_env, reference):
    from pixart_nodes import NODE_CLASS_MAPPINGS

    loader = NODE_CLASS_MAPPINGS["PixArtDeltaT5Loader"]
    listed = loader.INPUT_TYPES()["required"]["t5_name"][0]
    assert [n for n in listed if n.endswith(".gguf")] == GGUF_NAMES and "notes.txt" not in listed
    (t5,) = loader().load(GGUF_NAMES[1], "fp32", "cpu")
    ours, mask = t5.module.encode(PROMPTS, LENGTH)
    theirs, _ = reference.encode(PROMPTS, LENGTH)
    assert cosine(ours, theirs, mask) >= COSINE_FLOOR["Q8_0"]


def test_gguf_files_are_listed_inside_comfyui_without_comfyui_gguf(node_env, monkeypatch, tmp_path):
    """ComfyUI's own text_encoders list has no .gguf (ComfyUI-GGUF adds the extension); the loader lists them."""
    bridge = node_env
    supported = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}  # folder_paths, 0.3.64
    dirs = [str(tmp_path / "text_encoders"), str(tmp_path / "clip")]
    (tmp_path / "text_encoders" / "t5xxl_fp16.safetensors").write_bytes(b"")

    def get_filename_list(folder):
        return sorted(n for n in bridge._walk(dirs) if Path(n).suffix in supported)

    fake = SimpleNamespace(get_filename_list=get_filename_list, get_folder_paths=lambda folder: dirs)
    monkeypatch.setattr(bridge, "IN_COMFYUI", True)
    monkeypatch.setattr(bridge, "_folder_paths", fake, raising=False)
    listed = bridge.list_models("text_encoders", with_bundled=False)
    assert listed == sorted([*GGUF_NAMES, "t5xxl_fp16.safetensors"])
    assert bridge.list_models("clip", with_bundled=False) == listed
    assert not [n for n in bridge.list_models("vae", with_bundled=False) if n.endswith(".gguf")]


def test_importing_the_pack_does_not_import_gguf():
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import pixart_nodes, pixart_core.text_encoder, "
            "pixart_core.pipeline; print('gguf' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "False"
