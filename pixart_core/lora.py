"""LoRA on the PixArt transformer, as a runtime adapter: each targeted layer is wrapped so that
y = base(x) + up @ (down @ x), with every LoRA's alpha / rank and strength folded into `up`.

Why an adapter and not a merge into the weights:
- no second copy of any weight: the base layer is untouched and the adapter holds only the factors (as large as the
  LoRA: rank 32 on every layer of XL-2 is 4.5% of the bf16 weights), and nothing needs a backup to be removed;
- removing it is exact and free: the wrapper is swapped back for its base layer (strength 0 wraps nothing, so the
  model is the base bit for bit), and a new strength or another LoRA rebuilds only the small factors from the
  LoraFile in memory, never the file;
- it works unchanged on int8 (bitsandbytes Linear8bitLt) and fp8 (Fp8Linear) layers, whose weights cannot take an
  exact in-place update: the adapter runs in the model's compute dtype beside them.
The cost is two thin matmuls per wrapped layer and step, r(in + out) / (in * out) of the layer's work (5.6% at r = 32
on a 1152 x 1152 layer; measured +11% per step with every layer of XL-2 wrapped, bench/bench_lora.py).

Use: `apply_loras(model, [(load_lora(path), 0.8), ...])` until `remove_loras(model)`, or the context manager
`loras_applied(model, loras)` (the ComfyUI sampler uses it, so the cached base model is the base between runs).
"""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import PixArtError
from .loading.lora_files import LoraFile, LoraTerm

log = logging.getLogger("pixart_delta")


class LoraLinear(nn.Module):
    """A Linear-like layer (nn.Linear, int8, fp8) plus low-rank terms added to its output.

    down (R, in) holds every term of the layer; each group adds up_k @ down[cols_k] @ x to output rows rows_k (one
    group for a plain layer, one per part of a fused qkv / kv layer), in place into the base layer's fresh output:
    no zero blocks and no extra output-sized tensor (measured on the XL-2 qkv layer: +9% over the bare layer, against
    +25% for one block-diagonal up and a separate add)."""

    def __init__(self, base: nn.Module, down: torch.Tensor, groups: list[tuple[int, int, int, int, torch.Tensor]]):
        super().__init__()
        self.base = base
        self.register_buffer("down", down)
        self.slices = [g[:4] for g in groups]  # (first row, end row, first column of down, end column)
        for k, g in enumerate(groups):
            self.register_buffer(f"up{k}", g[4])  # (rows, columns): scale and strength folded in
        self.in_features, self.out_features = base.in_features, base.out_features

    @property
    def weight(self) -> torch.Tensor:  # callers that read dtype/device of a layer (transformer.dtype) still can
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x).contiguous()  # a fresh tensor from the layer: added to in place
        h = F.linear(x.to(self.down.dtype), self.down).to(out.dtype).reshape(-1, self.down.shape[0])
        flat = out.view(-1, out.shape[-1])
        for k, (r0, r1, c0, c1) in enumerate(self.slices):
            flat[:, r0:r1].addmm_(h[:, c0:c1], getattr(self, f"up{k}").t().to(out.dtype))
        return out


def lora_targets(model: nn.Module, lora: LoraFile) -> tuple[dict[str, list[LoraTerm]], list[str]]:
    """The file's terms grouped by the model layer they update, and what matches nothing. A LoRA whose layers do
    not fit (another width, more blocks) is refused."""
    found: dict[str, list[LoraTerm]] = {}
    unmatched = list(lora.ignored)
    depth = len(model.blocks)
    for term in lora.terms:
        block = re.match(r"blocks\.(\d+)\.", term.target)
        if block and int(block.group(1)) >= depth:
            raise PixArtError(f"{lora.name} has layers for block {block.group(1)}, but this transformer has "
                              f"{depth} blocks: the LoRA was made for another model (e.g. PixArt-α/Σ XL-2, 28 "
                              "blocks). Use a LoRA trained for this model.")
        try:
            layer = model.get_submodule(term.target)
        except AttributeError:
            layer = None
        if layer is None or not hasattr(layer, "in_features"):
            unmatched.append(term.source)
            continue
        _check_shape(lora.name, term, layer)
        found.setdefault(term.target, []).append(term)
    if not found:
        raise PixArtError(f"Nothing in {lora.name} matches a layer of this PixArt transformer (file layers: "
                          f"{', '.join(unmatched[:4])}...). It is a LoRA for another model.")
    return found, unmatched


def _check_shape(name: str, term: LoraTerm, layer: nn.Module) -> None:
    out, inp = layer.out_features // term.parts, layer.in_features
    if term.down.shape[1] != inp or term.up.shape[0] != out:
        raise PixArtError(f"{name} does not fit this transformer: layer '{term.source}' is "
                          f"{term.up.shape[0]}x{term.down.shape[1]} (out x in) but the model's '{term.target}' "
                          f"{'part ' if term.parts > 1 else ''}is {out}x{inp}. The LoRA was made for another model "
                          "size (PixArt-α/Σ XL-2 is 1152 wide, PixArt-nano narrower).")


def check_lora(model: nn.Module, lora: LoraFile) -> list[str]:
    """Refuse a LoRA that does not fit the model; log one warning listing the file's keys that match nothing."""
    _, unmatched = lora_targets(model, lora)
    _warn_unmatched(lora, unmatched)
    return unmatched


def _warn_unmatched(lora: LoraFile, unmatched: list[str]) -> None:
    if unmatched:
        log.warning("LoRA %s: %d keys match nothing in this PixArt transformer and are ignored: %s", lora.name,
                    len(unmatched), ", ".join(unmatched))


def apply_loras(model: nn.Module, loras: Sequence[tuple[LoraFile, float]], warn: bool = True) -> None:
    """Make the model compute base + sum of strength * LoRA, replacing any LoRAs applied before. Terms with
    strength 0 are left out, so all-zero strengths leave the base model exactly."""
    remove_loras(model)
    grouped: dict[str, list[tuple[LoraTerm, float]]] = {}
    for lora, strength in loras:
        found, unmatched = lora_targets(model, lora)
        if warn:
            _warn_unmatched(lora, unmatched)
        if strength == 0:
            continue
        for target, terms in found.items():
            grouped.setdefault(target, []).extend((t, float(strength)) for t in terms)
    dtype = model.dtype
    for target, terms in grouped.items():
        parent_name, _, child = target.rpartition(".")
        setattr(model.get_submodule(parent_name), child, _adapter(model.get_submodule(target), terms, dtype))


def _adapter(layer: nn.Module, terms: list[tuple[LoraTerm, float]], dtype: torch.dtype) -> LoraLinear:
    """All terms of one layer: their downs stacked, their ups grouped by the rows (part of a fused layer) they
    write, scale * strength folded into up."""
    def rows(term: LoraTerm) -> tuple[int, int]:
        size = layer.out_features // term.parts
        return term.part * size, (term.part + 1) * size

    terms = sorted(terms, key=lambda ts: rows(ts[0]))
    device = layer.weight.device
    down = torch.cat([t.down.float() for t, _ in terms])
    groups, col = [], 0
    for t, strength in terms:
        (r0, r1), rank = rows(t), t.down.shape[0]
        up = t.up.float() * (t.scale * strength)
        if groups and groups[-1][:2] == (r0, r1):  # the same rows as the last term: one wider matmul
            c0, previous = groups[-1][2], groups[-1][4]
            groups[-1] = (r0, r1, c0, col + rank, torch.cat([previous, up], dim=1))
        else:
            groups.append((r0, r1, col, col + rank, up))
        col += rank
    return LoraLinear(layer, down.to(device, dtype), [(*g[:4], g[4].to(device, dtype)) for g in groups])


def remove_loras(model: nn.Module) -> None:
    """Swap every LoRA adapter back for the layer it wraps: the model is the base again, exactly."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoraLinear):
                setattr(module, child_name, child.base)


@contextmanager
def loras_applied(model: nn.Module, loras: Sequence[tuple[LoraFile, float]]) -> Iterator[nn.Module]:
    """The model with these LoRAs for the duration of the block, the base again afterwards (also on errors)."""
    apply_loras(model, loras, warn=False)
    try:
        yield model
    finally:
        remove_loras(model)
