"""Prompts to T5 embeddings for PixArt: encode (with a cache), unload, and the unconditional branch. Reading T5
files (load_t5) is loading/t5_loading.py's job.

`encode` follows diffusers' `PixArtAlphaPipeline.encode_prompt` / `PixArtSigmaPipeline.encode_prompt` exactly:
- Text preprocessing as diffusers' `_text_preprocessing`: with `clean_caption=False` the prompt is still lower-cased
  and stripped (`text.lower().strip()`); with `clean_caption=True` diffusers' `_clean_caption` runs twice (URLs, HTML,
  @handles, CJK, odd punctuation, ftfy...). Cleaning needs the optional packages beautifulsoup4 and ftfy; without them
  it falls back to lower/strip with a warning, as diffusers does. (The Σ repo's own scripts pass raw prompts, not
  lower-cased; the α T5Embedder cleans. Matching diffusers is the choice here.)
- Tokenizer: `padding="max_length"`, `truncation=True`, `add_special_tokens=True` (appends `</s>`); the attention mask
  is passed to T5. max_length is the model's text length: 120 for α/δ, 300 for Σ.
- Returns `last_hidden_state` (B, L, d_model) in the encoder's dtype and the 0/1 mask (B, L) as int64.

The unconditional branch comes in two documented flavours (see `encode_prompts`):
- "empty": T5 of the negative prompt (default "") with its own mask, as the diffusers pipelines do;
- "null_embedding": the α checkpoints' learned `y_embedding` (L, 4096), masked with the prompt's mask, as the original
  α inference code does (`null_embedding_conditioning`).

An encoder given a PromptEmbeddingCache (the CLI and PixArtPipeline.from_paths, outside ComfyUI) keeps results per
(encoder, prompt, length, cleaning) on the CPU, bounded by bytes, so the same prompt does not run T5 again, even after
the encoder was unloaded. Without one (the default, and what the ComfyUI nodes use: ComfyUI's executor already keeps
each node's output) nothing is kept: the caller owns every tensor encode returns.
"""

from __future__ import annotations

import gc
import logging
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import nn

from .errors import PixArtError
from .transformer import null_embedding_conditioning

logger = logging.getLogger("pixart_core")

UNCONDITIONAL_MODES = ("empty", "null_embedding")
FF_OUTPUT = "DenseReluDense.wo"  # kept out of fp16 and of fp16/int8 activations (T5 v1.1 overflows there)


class PromptEmbeddingCache:
    """An LRU of single-prompt results (embeds (L, D), mask (L,)) kept on the CPU, holding at most `max_bytes` (the
    default 256 MiB is about 50 prompts of T5-XXL at Σ's 300 tokens in fp32). A caller opts in by handing one to
    load_t5 / T5TextEncoder; one cache may serve several encoders (the key names the encoder)."""

    def __init__(self, max_bytes: int = 256 << 20):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def get(self, key: tuple) -> tuple[torch.Tensor, torch.Tensor] | None:
        hit = self._entries.get(key)
        if hit is not None:
            self._entries.move_to_end(key)
        return hit

    def put(self, key: tuple, embeds: torch.Tensor, mask: torch.Tensor) -> None:
        if key in self._entries:
            self.bytes -= _nbytes(self._entries.pop(key))
        self._entries[key] = (embeds, mask)
        self.bytes += _nbytes((embeds, mask))
        while self.bytes > self.max_bytes and self._entries:  # an entry larger than the bound is not kept either
            self.bytes -= _nbytes(self._entries.popitem(last=False)[1])

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)


def _nbytes(entry: tuple[torch.Tensor, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in entry)


class T5TextEncoder(nn.Module):
    """A T5 encoder with its tokenizer: `encode(prompts, max_length)` -> (embeds, mask).

    It is an nn.Module so ComfyUI's model management can move it. Its own casts (`.half()`, `.to(torch.float16)`)
    keep every feed-forward output projection `wo` in fp32, because T5 v1.1 overflows fp16 there.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        precision: str,
        identity: str | None = None,
        reload: Callable[[torch.device], nn.Module] | None = None,
        cache: PromptEmbeddingCache | None = None,
    ):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.precision = precision
        # names the weights for the cache; in-memory encoders get a unique one
        self.identity = identity or f"memory:{uuid.uuid4()}"
        self._reload = reload
        self.cache = cache  # None: nothing kept between calls
        self._device = next(model.parameters()).device
        self._unloaded_dtype = model.shared.weight.dtype
        self.eval()  # inference only: T5's dropout must stay off

    @property
    def is_loaded(self) -> bool:
        return self.model is not None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device if self.model is not None else self._device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the embeddings it returns (the embedding table's dtype)."""
        if self.model is None:
            raise PixArtError("The T5 encoder is unloaded; call load() first.")
        return self.model.shared.weight.dtype

    def unload(self) -> None:
        """Drop the weights (prompts in the cache, if it has one, stay usable); `load()` or a miss brings them back."""
        if self.model is None:
            return
        self._device, self._unloaded_dtype = self.device, self.dtype
        self.model = None
        gc.collect()
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    def load(self) -> None:
        """Reload the weights after `unload()`, onto the device the encoder was on."""
        if self.model is not None:
            return
        if self._reload is None:
            raise PixArtError("This T5 encoder was built in memory and has been unloaded; load it again from its file.")
        self.model = self._reload(self._device)
        if self.dtype != self._unloaded_dtype:  # it had been cast after loading: come back the same
            self.to(self._unloaded_dtype)

    def encode(
        self,
        prompts: Sequence[str],
        max_length: int,
        clean_caption: bool = False,
        device: str | torch.device | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings (B, max_length, d_model) and mask (B, max_length) for a batch of prompts.

        With a cache, cached prompts are not encoded again. Results are returned on `device` (default: the CPU, where
        the cache lives; the encoder and the transformer are often on different devices).
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise PixArtError("No prompt to encode.")
        if not all(isinstance(p, str) for p in prompts):
            raise PixArtError("Prompts must be strings.")
        if not isinstance(max_length, int) or max_length < 1:
            raise PixArtError(f"max_length must be a positive integer (120 for PixArt-α, 300 for Σ), not {max_length!r}.")

        keys = [(self.identity, self.precision, self._dtype_tag(), p, max_length, bool(clean_caption)) for p in prompts]
        found = {k: self.cache.get(k) if self.cache is not None else None for k in dict.fromkeys(keys)}
        missing = [k for k, v in found.items() if v is None]
        if missing:
            self.load()
            embeds, mask = self._run_t5(preprocess_captions([k[3] for k in missing], clean_caption), max_length)
            for row, k in enumerate(missing):
                # clone: a row of the batch would otherwise keep the whole batch's storage alive
                found[k] = (embeds[row].to("cpu").clone(), mask[row].to("cpu").clone())
                if self.cache is not None:
                    self.cache.put(k, *found[k])
        out = torch.device(device) if device is not None else torch.device("cpu")
        embeds = torch.stack([found[k][0] for k in keys]).to(out)
        mask = torch.stack([found[k][1] for k in keys]).to(out)
        return embeds, mask

    def _dtype_tag(self) -> str:
        return str(self.dtype) if self.model is not None else str(self._unloaded_dtype)

    @torch.inference_mode()
    def _run_t5(self, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize and run T5 (no cache)."""
        _warn_truncation(self.tokenizer, texts, max_length)
        tokens = self.tokenizer(
            texts,
            padding="max_length",
            max_length=max_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        device = self.device
        mask = tokens.attention_mask.to(device)
        with _quiet_int8_cast_notice():
            embeds = self.model(tokens.input_ids.to(device), attention_mask=mask)[0]
        return embeds, mask

    def _apply(self, fn, recurse: bool = True):
        """Casts to fp16 leave `wo` in fp32 (moved to the same device); other casts apply as usual."""
        if self.model is None:
            return self
        probe = fn(torch.empty(0, dtype=torch.float32, device=self.device))
        if probe.dtype != torch.float16:
            return super()._apply(fn, recurse)

        def keep_fp32(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=probe.device, dtype=torch.float32) if t.is_floating_point() else t.to(probe.device)

        ff_outputs = {m for name, m in self.named_modules() if name.endswith(FF_OUTPUT) and type(m) is nn.Linear}
        for module in self.modules():
            nn.Module._apply(module, keep_fp32 if module in ff_outputs else fn, recurse=False)
        return self

    def extra_repr(self) -> str:
        return f"precision={self.precision}, loaded={self.is_loaded}"


class _DropInt8CastNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")


@contextmanager
def _quiet_int8_cast_notice() -> Iterator[None]:
    """bitsandbytes logs a warning on every int8 layer call that its int8 matmul quantises fp16 inputs: expected,
    and 144 lines per prompt for T5-XXL, so it is silenced while T5 runs."""
    bnb_logger = logging.getLogger("bitsandbytes.autograd._functions")
    quiet = _DropInt8CastNotice()
    bnb_logger.addFilter(quiet)
    try:
        yield
    finally:
        bnb_logger.removeFilter(quiet)


def preprocess_captions(texts: Sequence[str], clean_caption: bool) -> list[str]:
    """diffusers' `_text_preprocessing`: clean twice when asked (and possible), else lower-case and strip."""
    if clean_caption:
        cleaner = _caption_cleaner()
        if cleaner is not None:
            return [cleaner(cleaner(t)) for t in texts]
    return [t.lower().strip() for t in texts]


def _caption_cleaner() -> Callable[[str], str] | None:
    """diffusers' PixArt `_clean_caption`, reused as is; None (with a warning) without bs4 and ftfy."""
    try:
        import bs4  # noqa: F401
        import ftfy  # noqa: F401
    except ImportError:
        logger.warning(
            "Caption cleaning needs the packages beautifulsoup4 and ftfy (pip install beautifulsoup4 ftfy); "
            "prompts are only lower-cased and stripped."
        )
        return None
    from types import SimpleNamespace

    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import PixArtAlphaPipeline

    # _clean_caption only reads `bad_punct_regex` from self; no pipeline instance needed
    owner = SimpleNamespace(bad_punct_regex=PixArtAlphaPipeline.bad_punct_regex)
    return lambda text: PixArtAlphaPipeline._clean_caption(owner, text)


def _warn_truncation(tokenizer, texts: Sequence[str], max_length: int) -> None:
    full = tokenizer(list(texts), add_special_tokens=True).input_ids
    for i, ids in enumerate(full):
        if len(ids) > max_length:
            cut = len(ids) - max_length
            removed = tokenizer.decode(ids[max_length - 1 : -1])
            if len(removed) > 200:  # a pasted novel must not flood the server log
                removed = removed[:200] + f"... ({len(removed) - 200} more characters)"
            logger.warning(
                "Prompt %d is %d tokens long but the model reads %d: the last %d tokens were cut: '%s'",
                i + 1, len(ids), max_length, cut, removed,
            )


class PromptEmbeddings(NamedTuple):
    embeds: torch.Tensor  # (B, L, D)
    mask: torch.Tensor  # (B, L)
    negative_embeds: torch.Tensor  # (B, L, D)
    negative_mask: torch.Tensor  # (B, L)


def encode_prompts(
    encoder: T5TextEncoder,
    prompts: Sequence[str],
    negative_prompt: str | Sequence[str] = "",
    max_length: int = 120,
    clean_caption: bool = False,
    unconditional: str = "empty",
    y_embedding: torch.Tensor | None = None,
    device: str | torch.device | None = None,
) -> PromptEmbeddings:
    """Conditional and unconditional embeddings for a batch, like diffusers' `encode_prompt` with guidance.

    A string negative prompt is used for every prompt; a list gives one per prompt.
    unconditional="empty": T5(negative prompt) with its own mask (diffusers).
    unconditional="null_embedding": `y_embedding` masked like each prompt (original α code). A non-empty negative
    prompt still takes precedence: it is encoded with T5, since a user who typed one means it.
    """
    if unconditional not in UNCONDITIONAL_MODES:
        raise PixArtError(f"Unknown unconditional mode '{unconditional}'; choose {' or '.join(UNCONDITIONAL_MODES)}.")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
    if len(negatives) != len(prompts):
        raise PixArtError(f"Got {len(negatives)} negative prompts for {len(prompts)} prompts; give one or the same number.")

    embeds, mask = encoder.encode(prompts, max_length, clean_caption, device)
    use_null = unconditional == "null_embedding" and all(not n.strip() for n in negatives)
    if use_null:
        if y_embedding is None:
            raise PixArtError(
                "The 'null_embedding' unconditional mode needs the checkpoint's y_embedding (α checkpoints have one); "
                "this model has none, so use the 'empty' mode."
            )
        neg_embeds, neg_mask = null_embedding_conditioning(y_embedding.to(mask.device), mask)
        if neg_embeds.shape[-1] != embeds.shape[-1]:
            raise PixArtError(
                f"The null embedding has {neg_embeds.shape[-1]} channels but T5 gives {embeds.shape[-1]}; "
                "this T5 does not belong to this checkpoint."
            )
        neg_embeds = neg_embeds.to(embeds.dtype)
    else:
        neg_embeds, neg_mask = encoder.encode(negatives, max_length, clean_caption, device)
    return PromptEmbeddings(embeds, mask, neg_embeds, neg_mask)
