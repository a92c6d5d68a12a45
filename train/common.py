"""What the PixArt-nano recipes share: the diffusion schedule as tensors, EMA, text encoding, latents, model builders.

The schedule is the PixArt one (schedule.ddpm_schedule: 1000 steps, betas linear 1e-4..0.02), so every trained model
samples with the project's own samplers unchanged.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from pixart_core.config import ALPHA, PixArtConfig
from pixart_core.schedule import eps_from_v, linear_betas
from pixart_core.transformer import PixArtTransformer, null_embedding_conditioning


# --------------------------------------------------------------------------------------------------- schedule
class TrainSchedule:
    """ᾱ_t, β_t and the IDDPM posterior terms as float32 tensors indexed by integer timestep."""

    def __init__(self) -> None:
        betas = linear_betas(torch.float64)
        ab = torch.cumprod(1 - betas, 0)
        ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
        post_var = betas * (1 - ab_prev) / (1 - ab)
        self.betas = betas.float()
        self.alphas_cumprod = ab.float()
        # IDDPM: log of the posterior variance, clipped at t=0 (its value there is 0)
        self.post_log_var = torch.log(torch.cat([post_var[1:2], post_var[1:]])).float()
        self.post_coef_x0 = (betas * ab_prev.sqrt() / (1 - ab)).float()
        self.post_coef_xt = ((1 - ab_prev) * (1 - betas).sqrt() / (1 - ab)).float()

    def at(self, table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return table.to(t.device)[t.long()].view(-1, 1, 1, 1)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = self.at(self.alphas_cumprod, t)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def x0_from_eps(self, xt: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = self.at(self.alphas_cumprod, t)
        return (xt - (1 - ab).sqrt() * eps) / ab.sqrt()

    def eps_from_v(self, xt: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = self.at(self.alphas_cumprod, t)
        return eps_from_v(xt, v, ab.sqrt(), (1 - ab).sqrt())

    def v_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = self.at(self.alphas_cumprod, t)
        return ab.sqrt() * noise - (1 - ab).sqrt() * x0


# --------------------------------------------------------------------------------------------------- EMA
class EMA:
    """Exponential moving average of a model's floating-point state (parameters and buffers)."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.warmup = warmup
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay
        if self.warmup:  # short runs: do not let the random init dominate the average
            d = min(d, (1 + self.updates) / (10 + self.updates))
        for e, p in zip(self.model.state_dict().values(), model.state_dict().values()):
            if e.dtype.is_floating_point:
                e.lerp_(p.detach(), 1 - d)


def cosine_lr(base_lr: float, step: int, steps: int, final_fraction: float) -> float:
    """Cosine decay from base_lr at step 0 to final_fraction * base_lr at the last step (1.0: constant)."""
    return base_lr * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * step / steps)))


def warmup_lr(optimizer: torch.optim.Optimizer, step: int, base_lr: float, warmup: int) -> None:
    lr = base_lr * min(1.0, (step + 1) / max(1, warmup))
    for g in optimizer.param_groups:
        g["lr"] = lr


# --------------------------------------------------------------------------------------------------- text
@dataclass
class TextBatch:
    embeds: torch.Tensor  # (B, L, C)
    mask: torch.Tensor  # (B, L) 0/1


def encode_text(t5: nn.Module, tokenizer, captions: list[str]) -> TextBatch:
    """T5 embeddings of captions padded to the longest in the batch (the transformer trims padding anyway;
    T5's output on valid tokens does not depend on how much padding follows)."""
    tok = tokenizer([c.lower().strip() for c in captions], padding="longest", add_special_tokens=True,
                    return_attention_mask=True, return_tensors="pt")
    embeds = t5(tok.input_ids, attention_mask=tok.attention_mask)[0]
    return TextBatch(embeds, tok.attention_mask)


def drop_captions(text: TextBatch, null_embedding: torch.Tensor, prob: float, generator: torch.Generator,
                  empty: TextBatch | None = None) -> TextBatch:
    """Classifier-free-guidance caption dropout. A dropped caption becomes, with equal chance, the learned null
    caption y_embedding masked like the prompt (PixArt-α's CaptionEmbedder.token_drop) or the empty prompt's T5
    embedding (the unconditional branch diffusers' pipelines use), so both unconditional modes of the pipeline work."""
    b, length, _ = text.embeds.shape
    if prob <= 0:
        return text
    drop = torch.rand(b, generator=generator) < prob
    if not drop.any():
        return text
    use_empty = torch.rand(b, generator=generator) < 0.5 if empty is not None else torch.zeros(b, dtype=torch.bool)
    embeds, mask = text.embeds.clone(), text.mask.clone()
    null = null_embedding[:length].to(embeds.dtype)
    for i in torch.nonzero(drop).flatten().tolist():
        if use_empty[i]:
            n = empty.embeds.shape[1]
            embeds[i] = 0
            embeds[i, :n] = empty.embeds[0]
            mask[i] = 0
            mask[i, :n] = empty.mask[0]
        else:
            embeds[i] = null
    return TextBatch(embeds, mask)


def null_text(null_embedding: torch.Tensor, mask: torch.Tensor) -> TextBatch:
    """The learned null caption for a batch, masked like the prompts (the LCM teacher's unconditional input)."""
    return TextBatch(*null_embedding_conditioning(null_embedding[:mask.shape[1]], mask))


# --------------------------------------------------------------------------------------------------- latents
class LatentPool:
    """Posterior mean and std of VAE latents for a fixed set of scenes; `sample` draws z = mean + std·ε, scaled,
    as PixArt's feature-extraction training does."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, captions: list[str], scale: float):
        self.mean, self.std, self.captions, self.scale = mean, std, captions, scale

    def __len__(self) -> int:
        return len(self.captions)

    def sample(self, idx: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, list[str]]:
        m, s = self.mean[idx], self.std[idx]
        z = m + s * torch.randn(m.shape, generator=generator)
        return z * self.scale, [self.captions[i] for i in idx.tolist()]


@torch.no_grad()
def encode_pool(vae, images: torch.Tensor, captions: list[str], scale: float, batch_size: int = 256) -> LatentPool:
    """images: (N, 3, H, W) in [-1, 1]; vae: a diffusers AutoencoderKL."""
    means, stds = [], []
    for i in range(0, len(images), batch_size):
        dist = vae.encode(images[i:i + batch_size]).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return LatentPool(torch.cat(means), torch.cat(stds), captions, scale)


# --------------------------------------------------------------------------------------------------- models
def nano_transformer_config(caption_channels: int, hidden: int = 128, depth: int = 6, heads: int = 2,
                            patch: int = 1, latent_size: int = 8) -> PixArtConfig:
    """A PixArt-α-shaped transformer for 64x64 images (8x8 latents); text_len 120 like α, learned null caption."""
    return PixArtConfig(family=ALPHA, depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch,
                        in_channels=4, out_channels=8, caption_channels=caption_channels, text_len=120,
                        micro_conditions=False, sample_size=latent_size, pe_interpolation=1.0,
                        has_null_embedding=True)


def init_pixart_weights(model: PixArtTransformer, seed: int) -> None:
    """PixArt's initialize_weights: xavier linears, N(0, 0.02) embedders and t_block, zeroed cross-attention output
    projections and final layer, scale_shift_table ~ N(0, 1)/sqrt(D)."""
    g = torch.Generator().manual_seed(seed)
    d = model.config.hidden_size
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                bound = math.sqrt(6.0 / (m.in_features + m.out_features))
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 2 * bound - bound)
                m.bias.zero_()
        w = model.x_embedder.proj.weight
        fan = w.shape[1] * w.shape[2] * w.shape[3]
        bound = math.sqrt(6.0 / (fan + w.shape[0]))
        w.copy_((torch.rand(w.shape, generator=g) * 2 - 1) * bound)
        model.x_embedder.proj.bias.zero_()
        for lin in (model.t_embedder.mlp[0], model.t_embedder.mlp[2], model.t_block[1],
                    model.y_embedder.y_proj.fc1, model.y_embedder.y_proj.fc2):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.02)
        for block in model.blocks:
            block.cross_attn.proj.weight.zero_()
            block.cross_attn.proj.bias.zero_()
            block.scale_shift_table.copy_(torch.randn(block.scale_shift_table.shape, generator=g) / d**0.5)
        model.final_layer.linear.weight.zero_()
        model.final_layer.linear.bias.zero_()
        model.final_layer.scale_shift_table.copy_(torch.randn(2, d, generator=g) / d**0.5)
        if model.y_embedder.y_embedding is not None:
            c = model.config.caption_channels
            model.y_embedder.y_embedding.copy_(torch.randn(model.y_embedder.y_embedding.shape, generator=g) / c**0.5)


def nano_t5_config(vocab_size: int, d_model: int = 128):
    from transformers import T5Config

    return T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=32, d_ff=256, num_layers=2, num_heads=4,
                    relative_attention_num_buckets=16, relative_attention_max_distance=32,
                    feed_forward_proj="gated-gelu", dropout_rate=0.0, layer_norm_epsilon=1e-6,
                    pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, tie_word_embeddings=False)


def build_t5(vocab_size: int, seed: int, d_model: int = 128):
    from transformers import T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(nano_t5_config(vocab_size, d_model))


NANO_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[16, 32, 32, 64], layers_per_block=1,
    act_fn="silu", latent_channels=4, norm_num_groups=8, sample_size=64, scaling_factor=0.18215,
    mid_block_add_attention=False,
)


def build_vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**NANO_VAE_CONFIG)
