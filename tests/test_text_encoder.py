"""T5 text encoding: every file layout, every precision, parity with diffusers' encode_prompt, cache, warnings.

A tiny T5 v1.1-shaped encoder (2 layers, d_model 64, the real 32128-token vocabulary) is built here, saved in each
layout into tmp dirs, and read with the real T5 v1.1 tokenizer from tests/data/t5-v1_1-xxl.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pixart_core.errors import PixArtError
from pixart_core.loading.t5_loading import load_t5
from pixart_core.text_encoder import PromptEmbeddingCache, T5TextEncoder, encode_prompts
from pixart_core.transformer import null_embedding_conditioning
from tests.conftest import T5_TOKENIZER

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
REPO = Path(__file__).resolve().parents[1]


PROMPTS = [
    "A Small CAT sitting on a red sofa, soft light, 4k",
    '  <b>Visit</b> https://example.com/cat.png @someone — “a dog” in 東京 &amp; friends #12345678  ',
]
NEGATIVE = "Blurry, LOW quality, watermark"


def tiny_config():
    from transformers import T5Config

    return T5Config(
        vocab_size=32128, d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16,
        is_gated_act=True, dense_act_fn="gelu_pytorch_tanh", layer_norm_epsilon=1e-6,
    )


def copy_tokenizer(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy(T5_TOKENIZER / name, dest / name)


@pytest.fixture(scope="module")
def reference_model():
    """The tiny T5 as transformers builds it (default T5 init, seed 0)."""
    from transformers import T5EncoderModel

    torch.manual_seed(0)
    return T5EncoderModel(tiny_config()).eval()


@pytest.fixture(scope="module")
def layouts(reference_model, tmp_path_factory):
    """The same weights saved as a diffusers pipeline folder, a sharded HF folder and one bare .safetensors."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("t5")
    pipeline = root / "pipeline"
    reference_model.save_pretrained(pipeline / "text_encoder")
    copy_tokenizer(pipeline / "tokenizer")

    hf = root / "hf"
    reference_model.save_pretrained(hf, max_shard_size="4MB")  # shards + model.safetensors.index.json
    copy_tokenizer(hf)

    single = root / "text_encoders" / "t5_tiny_fp32.safetensors"
    single.parent.mkdir()
    state = {k: v.contiguous() for k, v in reference_model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_file(state, str(single))
    return {"pipeline": pipeline, "hf": hf, "single": single}


def load(path, precision="fp32", **kw) -> T5TextEncoder:
    kw.setdefault("tokenizer_path", None if Path(path).is_dir() else T5_TOKENIZER)
    return load_t5(path, precision=precision, **kw)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def cosine(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean per-token cosine similarity over the valid (unpadded) tokens."""
    valid = mask.bool()
    return F.cosine_similarity(a.float()[valid], b.float()[valid], dim=-1).mean().item()


# ---------------------------------------------------------------------------------------------------------- layouts
def test_every_layout_loads_the_same_weights(layouts, reference_model):
    expected = reference_model.state_dict()
    for name, path in layouts.items():
        enc = load(path)
        got = enc.model.state_dict()
        assert set(got) == set(expected), name
        for k, v in expected.items():
            assert torch.equal(got[k], v), f"{name}: {k}"
        assert enc.model.encoder.embed_tokens.weight is enc.model.shared.weight
    # one shard picked from a sharded folder (as a models/text_encoders file list offers it) loads the whole folder
    shard = sorted(layouts["hf"].glob("model-0000*.safetensors"))[0]
    got = load(shard).model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in expected.items())


def test_single_file_infers_the_config(layouts):
    config = load(layouts["single"]).model.config
    expected = tiny_config()
    for field in ("vocab_size", "d_model", "d_ff", "num_layers", "num_heads", "d_kv", "is_gated_act",
                  "relative_attention_num_buckets", "dense_act_fn"):
        assert getattr(config, field) == getattr(expected, field), field


def test_single_file_variants(reference_model, tmp_path):
    """ComfyUI-style files: fp16 storage, embed_tokens instead of shared, decoder keys, a prefix, scaled fp8."""
    from safetensors.torch import save_file

    state = reference_model.state_dict()
    odd = {"model." + k: v.half().contiguous() for k, v in state.items() if k != "shared.weight"}
    odd["model.decoder.final_layer_norm.weight"] = torch.ones(64, dtype=torch.float16)
    save_file(odd, str(tmp_path / "t5_fp16.safetensors"))
    got = load(tmp_path / "t5_fp16.safetensors", "fp32").model.state_dict()
    for k, v in state.items():
        assert torch.equal(got[k], v.half().float()), k

    scaled, expected = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}, {}
    for k, v in state.items():
        if v.dim() == 2 and "shared" not in k and "relative" not in k and "embed" not in k:
            scale = v.abs().max() / 448.0
            w8 = (v / scale).to(torch.float8_e4m3fn)
            scaled[k], scaled[k.removesuffix(".weight") + ".scale_weight"] = w8, scale.reshape(1)
            expected[k] = w8.float() * scale
        elif k != "encoder.embed_tokens.weight":
            scaled[k] = expected[k] = v.contiguous()
    save_file(scaled, str(tmp_path / "t5_fp8_scaled.safetensors"))
    got = load(tmp_path / "t5_fp8_scaled.safetensors", "fp32").model.state_dict()
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


def test_bad_files_raise_pixart_error(tmp_path, layouts):
    from safetensors.torch import save_file

    with pytest.raises(PixArtError, match="not found"):
        load_t5(tmp_path / "nope.safetensors")
    save_file({"conv.weight": torch.zeros(2, 2)}, str(tmp_path / "unet.safetensors"))
    with pytest.raises(PixArtError, match="not a T5 encoder"):
        load(tmp_path / "unet.safetensors")
    with pytest.raises(PixArtError, match="precision"):
        load(layouts["hf"], "fp8")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PixArtError, match="No T5 weights"):
        load_t5(tmp_path / "empty")


def test_missing_tokenizer_raises_and_fallbacks_work(layouts, tmp_path):
    with pytest.raises(PixArtError, match="No T5 tokenizer found"):
        load_t5(layouts["single"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(PixArtError, match="No T5 tokenizer in"):
        load_t5(layouts["single"], tokenizer_path=tmp_path / "empty")
    enc = load_t5(layouts["single"], precision="fp32", tokenizer_fallbacks=[tmp_path / "empty", T5_TOKENIZER])
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(T5_TOKENIZER), local_files_only=True)
    assert enc.tokenizer("a cat").input_ids == reference("a cat").input_ids


# ---------------------------------------------------------------------------------------------------------- parity
@pytest.fixture(scope="module")
def diffusers_pipelines(layouts):
    """diffusers' PixArt pipelines with only a tokenizer and a text encoder, loaded the official way."""
    from diffusers import PixArtAlphaPipeline, PixArtSigmaPipeline
    from transformers import AutoTokenizer, T5EncoderModel

    folder = layouts["pipeline"]
    tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True)
    text_encoder = T5EncoderModel.from_pretrained(str(folder / "text_encoder"), torch_dtype=torch.float32).eval()
    parts = dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=None, transformer=None, scheduler=None)
    return {120: PixArtAlphaPipeline(**parts), 300: PixArtSigmaPipeline(**parts)}


@pytest.mark.parametrize("max_length", [120, 300])
@pytest.mark.parametrize("clean", [False, True])
def test_parity_with_diffusers_encode_prompt(layouts, diffusers_pipelines, max_length, clean):
    if clean:
        pytest.importorskip("bs4")
        pytest.importorskip("ftfy")
    pipe = diffusers_pipelines[max_length]
    ref = pipe.encode_prompt(
        PROMPTS, negative_prompt=NEGATIVE, device="cpu", clean_caption=clean, max_sequence_length=max_length
    )
    enc = load(layouts["pipeline"])
    ours = encode_prompts(enc, PROMPTS, NEGATIVE, max_length=max_length, clean_caption=clean)
    for name, a, b in zip(("embeds", "mask", "negative embeds", "negative mask"), ours, ref):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert max_diff(a, b) <= 1e-5, f"{name}: {max_diff(a, b)}"
    print(f"\nparity L={max_length} clean={clean}: embeds {max_diff(ours[0], ref[0]):.2e}, "
          f"negative {max_diff(ours[2], ref[2]):.2e}")


def test_parity_empty_negative_and_cleaning_changes_tokens(layouts, diffusers_pipelines):
    """The default negative "" gives T5("") with a 1-token mask, as diffusers; cleaning really changes the text."""
    pipe = diffusers_pipelines[120]
    ref = pipe.encode_prompt(PROMPTS, negative_prompt="", device="cpu", max_sequence_length=120)
    ours = encode_prompts(load(layouts["hf"]), PROMPTS, "", max_length=120)
    for a, b in zip(ours, ref):
        assert max_diff(a, b) <= 1e-5
    assert ours.negative_mask.sum(dim=1).tolist() == [1, 1]
    if importlib.util.find_spec("bs4") and importlib.util.find_spec("ftfy"):
        cleaned = encode_prompts(load(layouts["hf"]), PROMPTS, "", max_length=120, clean_caption=True)
        assert not torch.equal(cleaned.mask[1], ours.mask[1])


# ---------------------------------------------------------------------------------------------------------- precision
def test_fp16_keeps_ff_output_in_fp32_through_later_casts(layouts):
    enc = load(layouts["hf"], "fp16")

    def ff_dtypes():
        return {p.dtype for n, p in enc.named_parameters() if "DenseReluDense.wo" in n}

    def other_dtypes():
        return {p.dtype for n, p in enc.named_parameters() if "DenseReluDense.wo" not in n}

    assert ff_dtypes() == {torch.float32} and other_dtypes() == {torch.float16}
    enc.half()
    assert ff_dtypes() == {torch.float32} and other_dtypes() == {torch.float16}
    enc.to(torch.float16)
    enc.to("cpu", torch.float16)
    assert ff_dtypes() == {torch.float32} and other_dtypes() == {torch.float16}

    reference, mask = load(layouts["hf"], "fp32").encode(PROMPTS, 120)
    embeds, _ = enc.encode(PROMPTS, 120)
    assert embeds.dtype == torch.float16 and torch.isfinite(embeds).all()
    assert cosine(embeds, reference, mask) > 0.999

    bf16 = load(layouts["hf"], "bf16")
    bf16.half()  # a bf16 encoder cast to fp16 gets its wo promoted to fp32, not squeezed to fp16
    assert {p.dtype for n, p in bf16.named_parameters() if "DenseReluDense.wo" in n} == {torch.float32}
    bf16.float()
    assert {p.dtype for p in bf16.parameters()} == {torch.float32}


@pytest.mark.parametrize("precision, minimum", [("int8", 0.999), ("nf4", 0.985), ("int8-wo-bf16", 0.999),
                                                ("nf4-wo-bf16", 0.99)])
def test_quantised_encoders_run_on_cpu(layouts, precision, minimum):
    """bitsandbytes int8 / nf4 on the CPU, against the issue's floor of 0.99 with `wo` in bf16. Seen on this 2-layer
    model: int8 0.99990, int8-wo-bf16 0.99992, nf4-wo-bf16 0.99099, nf4 0.98856 (nf4's error grows with each 4-bit
    matrix: `wo` is the 7th per layer; and with depth on random weights: ~0.978 at 4 layers)."""
    import bitsandbytes as bnb

    from pixart_core.quantize import Int8WeightLinear

    reference, mask = load(layouts["hf"], "fp32").encode(PROMPTS, 120)
    enc = load(layouts["hf"], precision)
    kind = bnb.nn.Linear8bitLt if precision.startswith("int8") else bnb.nn.Linear4bit
    attention = enc.model.encoder.block[0].layer[0].SelfAttention
    ff = enc.model.encoder.block[0].layer[1].DenseReluDense
    assert isinstance(attention.q, kind) and isinstance(ff.wi_0, kind)
    if precision.endswith("-wo-bf16"):
        assert type(ff.wo) is torch.nn.Linear and ff.wo.weight.dtype == torch.bfloat16  # as transformers
    elif precision == "int8":  # weight-only: bitsandbytes' int8 matmul would run wo in fp16
        assert type(ff.wo) is Int8WeightLinear and ff.wo.weight.dtype == torch.int8
    else:
        assert isinstance(ff.wo.layer, kind)
    embeds, q_mask = enc.encode(PROMPTS, 120)
    assert torch.equal(q_mask, mask)
    similarity = cosine(embeds, reference, mask)
    print(f"\n{precision}: cosine similarity to fp32 = {similarity:.5f}")
    assert similarity >= minimum
    assert max_diff(embeds, reference) > 0  # the quantised layers are really in use


# ---------------------------------------------------------------------------------------------------------- cache
def count_t5_runs(enc: T5TextEncoder) -> list[int]:
    """The batch size of every T5 run of `enc` from now on."""
    calls = []
    forward = enc.model.forward

    def counting_forward(input_ids, **kw):
        calls.append(input_ids.shape[0])
        return forward(input_ids, **kw)

    enc.model.forward = counting_forward
    return calls


def test_cache_hit_does_not_call_the_encoder(layouts):
    enc = load(layouts["hf"], cache=PromptEmbeddingCache())
    calls = count_t5_runs(enc)
    first, first_mask = enc.encode(["a cat", "a dog"], 120)
    assert calls == [2]
    again, again_mask = enc.encode(["a dog", "a cat"], 120)
    assert calls == [2]
    assert torch.equal(again, first.flip(0)) and torch.equal(again_mask, first_mask.flip(0))
    enc.encode(["a cat", "a bird", "a bird"], 120)  # only the new prompt is encoded, once
    assert calls == [2, 1]
    enc.encode(["a cat"], 300)  # another length is another entry
    enc.encode(["a cat"], 120, clean_caption=True)
    assert calls == [2, 1, 1, 1]
    enc.cache.clear()
    enc.encode(["a cat"], 120)
    assert calls == [2, 1, 1, 1, 1]


def test_without_a_cache_nothing_is_kept(layouts):
    """The default (and the ComfyUI nodes', whose executor keeps node outputs): every call runs T5, and the encoder
    holds no reference to what it returned."""
    import weakref

    enc = load(layouts["hf"])
    assert enc.cache is None
    calls = count_t5_runs(enc)
    first, _ = enc.encode(["a cat"], 120)
    again, _ = enc.encode(["a cat"], 120)
    assert calls == [1, 1] and torch.equal(first, again)
    gone = weakref.ref(first)
    del first
    assert gone() is None


def test_cache_is_bounded_by_bytes(layouts):
    enc = load(layouts["hf"])
    embeds, mask = enc.encode(["a cat"], 120)
    one_prompt = embeds[0].nbytes + mask[0].nbytes  # what the cache keeps of one prompt
    enc.cache = PromptEmbeddingCache(max_bytes=2 * one_prompt)
    calls = count_t5_runs(enc)
    for prompt in ("a cat", "a dog", "a bird"):  # the third evicts the least recently used, "a cat"
        enc.encode([prompt], 120)
    assert len(enc.cache) == 2 and enc.cache.bytes == 2 * one_prompt
    enc.encode(["a bird"], 120)
    enc.encode(["a dog"], 120)
    assert calls == [1, 1, 1]
    enc.encode(["a cat"], 120)
    assert calls == [1, 1, 1, 1] and enc.cache.bytes == 2 * one_prompt
    enc.cache = PromptEmbeddingCache(max_bytes=one_prompt - 1)  # an entry larger than the bound is not kept
    enc.encode(["a cat"], 120)
    assert len(enc.cache) == 0 and enc.cache.bytes == 0


def test_unload_keeps_the_cache_and_reloads_on_a_miss(layouts):
    enc = load(layouts["single"], cache=PromptEmbeddingCache())
    first, _ = enc.encode(["a cat"], 120)
    enc.unload()
    assert not enc.is_loaded
    cached, _ = enc.encode(["a cat"], 120)
    assert not enc.is_loaded and torch.equal(cached, first)
    fresh, _ = enc.encode(["a red cat"], 120)
    assert enc.is_loaded and fresh.shape == first.shape
    enc.cache.clear()
    assert torch.equal(enc.encode(["a cat"], 120)[0], first)


# ---------------------------------------------------------------------------------------------------------- warnings
def test_truncation_warning_says_how_many_tokens_were_cut(layouts, caplog):
    enc = load(layouts["hf"])
    long_prompt = " ".join(["a very small cat"] * 40)  # 161 tokens with </s>
    n_tokens = len(enc.tokenizer(long_prompt).input_ids)
    with caplog.at_level(logging.WARNING, logger="pixart_core"):
        embeds, mask = enc.encode([long_prompt, "a cat"], 120)
    messages = [r.getMessage() for r in caplog.records if r.name == "pixart_core"]
    assert len(messages) == 1, messages
    assert f"the last {n_tokens - 120} tokens were cut" in messages[0] and "Prompt 1" in messages[0]
    assert mask[0].sum() == 120 and embeds.shape == (2, 120, 64)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pixart_core"):
        enc.encode([long_prompt], 300)
    assert not [r for r in caplog.records if r.name == "pixart_core"]


# ---------------------------------------------------------------------------------------------------------- uncond
def test_null_embedding_conditioning_masks_like_the_prompt():
    y_embedding = torch.randn(120, 4096)
    prompt_mask = torch.zeros(3, 120, dtype=torch.int64)
    for i, n in enumerate((5, 17, 120)):
        prompt_mask[i, :n] = 1
    embeds, mask = null_embedding_conditioning(y_embedding, prompt_mask)
    assert embeds.shape == (3, 120, 4096) and torch.equal(embeds[2], y_embedding)
    assert torch.equal(mask, prompt_mask) and mask is not prompt_mask
    with pytest.raises(PixArtError, match="max_length 120"):
        null_embedding_conditioning(y_embedding, torch.ones(1, 300, dtype=torch.int64))
    with pytest.raises(PixArtError, match="tokens, channels"):
        null_embedding_conditioning(torch.randn(120), prompt_mask)


def test_unconditional_modes(layouts):
    enc = load(layouts["hf"])
    y_embedding = torch.randn(120, 64)
    null = encode_prompts(enc, PROMPTS, "", 120, unconditional="null_embedding", y_embedding=y_embedding)
    assert torch.equal(null.negative_mask, null.mask)
    assert torch.equal(null.negative_embeds, y_embedding.expand(2, -1, -1))
    empty = encode_prompts(enc, PROMPTS, "", 120, unconditional="empty")
    assert empty.negative_mask.sum(dim=1).tolist() == [1, 1]
    typed = encode_prompts(enc, PROMPTS, NEGATIVE, 120, unconditional="null_embedding", y_embedding=y_embedding)
    assert torch.equal(typed.negative_embeds, enc.encode([NEGATIVE] * 2, 120)[0])
    per_prompt = encode_prompts(enc, PROMPTS, [NEGATIVE, "ugly"], 120)
    assert torch.equal(per_prompt.negative_embeds[1], enc.encode(["ugly"], 120)[0][0])
    with pytest.raises(PixArtError, match="y_embedding"):
        encode_prompts(enc, PROMPTS, "", 120, unconditional="null_embedding")
    with pytest.raises(PixArtError, match="negative prompts"):
        encode_prompts(enc, PROMPTS, ["a", "b", "c"], 120)
    with pytest.raises(PixArtError, match="unconditional mode"):
        encode_prompts(enc, PROMPTS, "", 120, unconditional="zeros")


# ---------------------------------------------------------------------------------------------------------- bench
def test_bench_quick_runs(capsys):
    spec = importlib.util.spec_from_file_location("bench_t5", REPO / "bench" / "bench_t5.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--quick"])
    out = capsys.readouterr().out
    assert [r["precision"] for r in rows] == ["bf16", "int8", "nf4", "int8-wo-bf16", "nf4-wo-bf16"]
    assert all(r["encode_s"] > 0 for r in rows) and "precision" in out
