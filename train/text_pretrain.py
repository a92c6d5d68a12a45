"""Recipe 0: pre-train the tiny T5 as a text-to-text model, so the frozen encoder binds words to objects.

PixArt keeps a frozen, pre-trained T5; the nano T5 has no pre-trained weights to start from, and learnt jointly
through the diffusion loss nothing forces "red" in "a red circle above a blue square" to carry "I am the upper
object" (the pair relation of every joint build was a coin flip). So the T5 is first trained, as a
`T5ForConditionalGeneration` over the project's word-level tokenizer, to rewrite a caption in any of its phrasings
(data.phrasings: "a blue square below a red circle", "above a blue square there is a red circle", ...) into the
scene's canonical description (data.canonical_description: objects top to bottom, then left to right, each with
place, size, colour and shape: "top red circle bottom blue square"). The phrasings put the upper object first or
second with equal chance, so word order alone never gives the answer: the model must bind each colour and shape to
its place. The decoder has a single layer, so the binding has to be done by the encoder. Only the encoder is kept
(`encoder_of`: a `T5EncoderModel`, the layout the pipeline ships), frozen for the diffusion recipes.

`binding_probe` checks that the binding is in the encoder's states: a linear probe (logistic regression) on the state
of each colour token of two-object captions predicts where its object is (first / second in the canonical order, and
the absolute place), trained on captions the text model saw, evaluated on held-out captions it never saw
(`is_held_out`: a fixed hash split of caption strings).
"""

from __future__ import annotations

import copy
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from . import data
from .common import nano_t5_config

HELD_OUT_PERCENT = 10


def is_held_out(caption: str) -> bool:
    """A fixed split of caption strings (crc32): held-out captions are never used to train the text model or a
    probe."""
    return zlib.crc32(caption.encode()) % 100 < HELD_OUT_PERCENT


def text_examples(rng: np.random.Generator, count: int, pair_prob: float = 0.6, held_out: bool = False
                  ) -> tuple[list[data.Scene], list[str]]:
    """count scenes, each captioned with a random phrasing, and their canonical descriptions; only captions of the
    requested split (held_out False: training captions)."""
    scenes, targets = [], []
    while len(scenes) < count:
        scene = data.vary_caption(data.random_scene(rng, pair_prob), rng)
        if is_held_out(scene.caption) == held_out:
            scenes.append(scene)
            targets.append(data.canonical_description(scene))
    return scenes, targets


def build_text_model(vocab_size: int, seed: int, d_model: int = 128, decoder_layers: int = 1, encoder_layers: int = 2):
    """T5ForConditionalGeneration whose encoder is exactly the shipped nano T5 encoder (common.nano_t5_config)."""
    from transformers import T5ForConditionalGeneration

    cfg = nano_t5_config(vocab_size, d_model)
    cfg.num_layers, cfg.num_decoder_layers = encoder_layers, decoder_layers
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(cfg)
    with torch.no_grad():  # the lm_head (tied to the token embedding) starts at std 1 in transformers: logits of
        model.lm_head.weight.normal_(0.0, d_model**-0.5)  # std ~sqrt(d_model), a first loss of ~85 instead of ~4
    return model


def encoder_of(model) -> nn.Module:
    """The encoder of a T5ForConditionalGeneration as a stand-alone T5EncoderModel (shared embedding + encoder
    stack, same weights, same config), frozen: what the diffusion recipes use and save_pipeline writes."""
    from transformers import T5EncoderModel

    cfg = copy.deepcopy(model.config)
    cfg.num_decoder_layers = cfg.num_layers  # what nano_t5_config says; an encoder has no decoder
    enc = T5EncoderModel(cfg)
    sd = {k: v for k, v in model.state_dict().items() if k.startswith(("shared.", "encoder."))}
    missing, unexpected = enc.load_state_dict(sd, strict=False)
    assert not unexpected and all(k == "encoder.embed_tokens.weight" for k in missing), (missing, unexpected)
    return enc.eval().requires_grad_(False)


@dataclass
class TextPretrainConfig:
    steps: int = 1500
    batch_size: int = 128
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.01
    # auxiliary word tagging: a linear head (discarded afterwards) reads each object word's place off the encoder
    tagging: bool = True
    seed: int = 0


@dataclass
class TextPretrainResult:
    model: nn.Module  # the T5ForConditionalGeneration
    losses: list[float] = field(default_factory=list)  # the seq2seq cross-entropy per step
    tagging_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    held_out_exact: float = float("nan")  # greedy decoding == canonical description, on held-out captions


def _tokenize(tokenizer, texts: list[str]):
    return tokenizer([t.lower().strip() for t in texts], padding="longest", add_special_tokens=True,
                     return_attention_mask=True, return_tensors="pt")


PLACES = ("top", "bottom", "left", "right", "center", "anywhere")


def object_places(scene: data.Scene) -> list[str]:
    """The place of each object of a scene, as in its canonical description."""
    if len(scene.objects) == 2:
        return list(data.place_of_pair(scene.relation))
    return [scene.position.split()[-1] if scene.position else "anywhere"]


def word_place_tags(scene: data.Scene) -> list[int]:
    """For every word of the scene's caption: the index in PLACES of the object it describes (its size, colour and
    shape words), -100 for the other words. The caption's words are the tokenizer's tokens (word level)."""
    words = scene.caption.split()
    tags = [-100] * len(words)
    for o, place in zip(scene.objects, object_places(scene)):
        i = words.index(o.colour)  # the colours of a scene differ
        for j in (i - 1 if o.size_word else i, i, i + 1):
            tags[j] = PLACES.index(place)
    return tags


def text_loss(model, tokenizer, captions: list[str], targets: list[str], tag_head: nn.Module | None = None,
              tags: list[list[int]] | None = None) -> tuple[torch.Tensor, dict]:
    """Cross-entropy of the canonical description given the caption; with tag_head, plus the auxiliary word-tagging
    loss (each object word's place, read linearly off the encoder's state)."""
    src, tgt = _tokenize(tokenizer, captions), _tokenize(tokenizer, targets)
    labels = tgt.input_ids.masked_fill(tgt.attention_mask == 0, -100)
    out = model(input_ids=src.input_ids, attention_mask=src.attention_mask, labels=labels)
    parts = {"seq2seq": float(out.loss.detach())}
    loss = out.loss
    if tag_head is not None:
        tag = torch.full(src.input_ids.shape, -100, dtype=torch.long)
        for i, t in enumerate(tags):
            tag[i, :len(t)] = torch.tensor(t)
        aux = nn.functional.cross_entropy(tag_head(out.encoder_last_hidden_state).flatten(0, 1), tag.flatten(),
                                          ignore_index=-100)
        parts["tagging"] = float(aux.detach())
        loss = loss + aux
    return loss, parts


@torch.no_grad()
def exact_match(model, tokenizer, captions: list[str], targets: list[str]) -> float:
    """Fraction of captions whose greedy decoding is exactly the canonical description."""
    model.eval()
    src = _tokenize(tokenizer, captions)
    out = model.generate(input_ids=src.input_ids, attention_mask=src.attention_mask, max_new_tokens=16,
                         do_sample=False, num_beams=1)
    decoded = tokenizer.batch_decode(out, skip_special_tokens=True)
    return float(np.mean([" ".join(d.split()) == t for d, t in zip(decoded, targets)]))


def pretrain_text(model, tokenizer, cfg: TextPretrainConfig, log: Callable[[str], None] = print,
                  log_every: int = 100, eval_count: int = 300) -> TextPretrainResult:
    """Caption -> canonical description, fresh seeded examples every step (training captions only)."""
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    model.train().requires_grad_(True)
    tag_head = nn.Linear(model.config.d_model, len(PLACES)) if cfg.tagging else None
    params = list(model.parameters()) + (list(tag_head.parameters()) if tag_head is not None else [])
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    result = TextPretrainResult(model)
    start = time.time()
    for step in range(cfg.steps):
        lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))
        if step >= cfg.warmup:  # cosine decay to 5 % after the warm-up
            frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
            lr = cfg.lr * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        scenes, targets = text_examples(rng, cfg.batch_size)
        loss, parts = text_loss(model, tokenizer, [s.caption for s in scenes], targets, tag_head,
                                [word_place_tags(s) for s in scenes] if tag_head is not None else None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        result.losses.append(parts["seq2seq"])
        result.tagging_losses.append(parts.get("tagging", float("nan")))
        if log_every and (step % log_every == 0 or step == cfg.steps - 1):
            log(f"text step {step}/{cfg.steps} loss {np.mean(result.losses[-log_every:]):.4f} tagging "
                f"{np.mean(result.tagging_losses[-log_every:]):.4f} ({time.time() - start:.0f}s)")
    model.eval().requires_grad_(False)
    result.seconds = time.time() - start
    if eval_count:
        scenes, targets = text_examples(np.random.default_rng(cfg.seed + 1), eval_count, held_out=True)
        result.held_out_exact = exact_match(model, tokenizer, [s.caption for s in scenes], targets)
    return result


# --------------------------------------------------------------------------------------------------- probe
@torch.no_grad()
def colour_token_states(encoder, tokenizer, scenes: list[data.Scene]) -> tuple[torch.Tensor, torch.Tensor,
                                                                                torch.Tensor]:
    """For every colour word of two-object captions: the encoder's output state at that token, the index of its
    object in the canonical order (0: top / left, 1: bottom / right) and its place (0 top, 1 bottom, 2 left,
    3 right). Returns (states (N, C), order (N,), place (N,))."""
    places = {"top": 0, "bottom": 1, "left": 2, "right": 3}
    feats, order, place = [], [], []
    pairs = [s for s in scenes if len(s.objects) == 2]
    for i in range(0, len(pairs), 256):
        chunk = pairs[i:i + 256]
        tok = _tokenize(tokenizer, [s.caption for s in chunk])
        states = encoder(input_ids=tok.input_ids, attention_mask=tok.attention_mask)[0]
        for j, s in enumerate(chunk):
            p = data.place_of_pair(s.relation)
            for o, where in zip(s.objects, p):
                tid = tokenizer.convert_tokens_to_ids(o.colour)
                pos = (tok.input_ids[j] == tid).nonzero().flatten()
                assert len(pos) == 1, (s.caption, o.colour)
                feats.append(states[j, pos[0]].float())
                order.append(0 if where in ("top", "left") else 1)
                place.append(places[where])
    return torch.stack(feats), torch.tensor(order), torch.tensor(place)


def linear_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                 steps: int = 300, weight_decay: float = 1e-4, seed: int = 0) -> tuple[float, float]:
    """Multinomial logistic regression (features standardised on the training set, full-batch L-BFGS, a little L2).
    Returns (train accuracy, test accuracy)."""
    torch.manual_seed(seed)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    xtr, xte = (x_train - mean) / std, (x_test - mean) / std
    classes = int(max(y_train.max(), y_test.max())) + 1
    lin = nn.Linear(xtr.shape[1], classes)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=steps, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(lin(xtr), y_train) + weight_decay * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        acc_tr = float((lin(xtr).argmax(1) == y_train).float().mean())
        acc_te = float((lin(xte).argmax(1) == y_test).float().mean())
    return acc_tr, acc_te


def probe_scenes(seed: int, count: int, varied: bool = True) -> tuple[list[data.Scene], list[data.Scene]]:
    """Two-object scenes for the probe: (training captions, held-out captions), count each. varied False: the
    original grammar only ("A <relation> B"), the only one an encoder from an older build has seen."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    while len(train) < count or len(test) < count:
        s = data.random_pair(rng)
        if varied:
            data.vary_caption(s, rng)
        split = test if is_held_out(s.caption) else train
        if len(split) < count:
            split.append(s)
    return train, test


def binding_probe(encoder, tokenizer, seed: int = 0, count: int = 1500, varied: bool = True) -> dict:
    """Held-out accuracy of linear probes on the colour tokens' encoder states: "order" (first / second object in
    the canonical order) and "place" (top / bottom / left / right). Chance: 0.5 and about 0.5 (the relation's axis
    is in the caption)."""
    train, test = probe_scenes(seed, count, varied)
    xtr, otr, ptr = colour_token_states(encoder, tokenizer, train)
    xte, ote, pte = colour_token_states(encoder, tokenizer, test)
    order_tr, order_te = linear_probe(xtr, otr, xte, ote)
    place_tr, place_te = linear_probe(xtr, ptr, xte, pte)
    return {"order": order_te, "place": place_te, "order_train": order_tr, "place_train": place_tr,
            "train_tokens": len(otr), "held_out_tokens": len(ote), "varied_phrasings": varied}
