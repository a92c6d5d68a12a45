"""The PixArt-nano tokenizer: a word-level vocabulary the project builds itself, saved as a Hugging Face fast tokenizer.

It behaves like the T5 tokenizer where the pipeline relies on it: `<pad>` = 0, `</s>` = 1, `<unk>` = 2, `</s>` appended
to every text, padding to max_length with an attention mask. The folder it writes (tokenizer.json,
tokenizer_config.json, special_tokens_map.json) loads with `transformers.AutoTokenizer` / `PreTrainedTokenizerFast`,
so the project's normal T5 loading path (t5_loading.load_tokenizer) reads it like the real T5 tokenizer folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
SPECIALS = (PAD, EOS, UNK)  # ids 0, 1, 2 as in T5


def build_tokenizer(words: Iterable[str]) -> Tokenizer:
    """A lower-casing, whitespace/punctuation-splitting word tokenizer over `words`, appending </s> like T5."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for w in sorted({w.lower() for w in words}):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, vocab[EOS])])
    return tok


def save_tokenizer(tok: Tokenizer, folder: str | Path, model_max_length: int = 120) -> Path:
    """Write the folder transformers loads with AutoTokenizer.from_pretrained(folder)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    special = {"pad_token": PAD, "eos_token": EOS, "unk_token": UNK}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
              "padding_side": "right", "clean_up_tokenization_spaces": True, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


def load_hf_tokenizer(folder: str | Path):
    """The saved tokenizer as a transformers fast tokenizer (local files only)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
