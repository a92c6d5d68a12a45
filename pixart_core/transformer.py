"""The PixArt transformer (α, Σ and δ share it), read top to bottom in the order the math happens.

Parameter names follow the ORIGINAL PixArt checkpoints (x_embedder, t_block, blocks.i.attn.qkv, ...), so an original
state dict loads as it is; diffusers checkpoints are renamed in loading/checkpoint_formats.py. Shapes in comments:
B batch, N image tokens (h*w after 2x2 patching), L text tokens, D width.

Speed that every sampler inherits: the caption projection and each block's cross-attention keys/values are computed
once per generation (TextConditioning), attention looks only at the valid text tokens, and every attention runs
through one kernel (attention.py, torch's scaled_dot_product_attention by default).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Protocol, Sequence

import torch
from torch import nn

from .attention import attention, gelu_linear
from .config import PixArtConfig
from .errors import PixArtError


def timestep_sinusoid(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """[cos, sin] embedding of scalar conditions (timesteps, sizes), always computed in fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_2d_position_embedding(
    dim: int, grid_h: int, grid_w: int, base_size: int, interpolation: float
) -> torch.Tensor:
    """(grid_h*grid_w, dim) sin-cos embedding. The first half encodes the column (w) coordinate, as the checkpoints
    were trained; every model maps its token grid onto [0, base_size / interpolation) in each axis."""
    pos_h = torch.arange(grid_h, dtype=torch.float64) / (grid_h / base_size) / interpolation
    pos_w = torch.arange(grid_w, dtype=torch.float64) / (grid_w / base_size) / interpolation
    ww, hh = torch.meshgrid(pos_w, pos_h, indexing="xy")  # both (grid_h, grid_w)

    def sincos_1d(positions: torch.Tensor, d: int) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2.0))
        out = positions.reshape(-1)[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([sincos_1d(ww, dim // 2), sincos_1d(hh, dim // 2)], dim=1).float()


class TextConditioning:
    """Projected caption tokens of one generation, with each block's cross-attention K/V cached on first use.

    tokens: (B, L', D) trimmed to the longest valid caption in the batch; mask: (B, L') bool, True = attend.
    Build it once per generation with PixArtTransformer.prepare_text and pass it to every step.
    """

    def __init__(self, tokens: torch.Tensor, mask: torch.Tensor):
        self.tokens = tokens
        self.mask = mask
        # SDPA takes a boolean mask broadcast over heads and queries; None lets it use its fastest kernel.
        self.attn_mask = None if bool(mask.all()) else mask[:, None, None, :]
        self._kv: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    def keys_values(self, cross_attn: "CrossAttention") -> tuple[torch.Tensor, torch.Tensor]:
        kv = self._kv.get(cross_attn)
        if kv is None:
            kv = cross_attn.project_text(self.tokens)
            self._kv[cross_attn] = kv
        return kv


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)  # (B, heads, n, head_dim)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, heads, n, hd = x.shape
    return x.transpose(1, 2).reshape(b, n, heads * hd)


class SelfAttention(nn.Module):
    """Self-attention over image tokens; Σ's optional qk-norm and KV token compression (depthwise conv + LayerNorm)."""

    def __init__(self, dim: int, heads: int, qk_norm: bool = False, kv_compress_scale: int = 1):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = nn.LayerNorm(dim)
            self.k_norm = nn.LayerNorm(dim)
        self.kv_compress_scale = kv_compress_scale
        if kv_compress_scale > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=kv_compress_scale, stride=kv_compress_scale, groups=dim)
            self.norm = nn.LayerNorm(dim)

    def _compress(self, t: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        b, n, c = t.shape
        h, w = grid_hw
        t = self.sr(t.transpose(1, 2).reshape(b, c, h, w))
        return self.norm(t.flatten(2).transpose(1, 2))

    def forward(self, x: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # rows of qkv are [q; k; v]
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.kv_compress_scale > 1:
            k, v = self._compress(k, grid_hw), self._compress(v, grid_hw)
        out = attention(_split_heads(q, self.heads), _split_heads(k, self.heads), _split_heads(v, self.heads))
        return self.proj(_merge_heads(out))


class CrossAttention(nn.Module):
    """Image tokens attend to caption tokens; the caption side (kv_linear) is computed once per generation."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def project_text(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv_linear(tokens).chunk(2, dim=-1)  # rows of kv_linear are [k; v]
        return _split_heads(k, self.heads), _split_heads(v, self.heads)

    def forward(self, x: torch.Tensor, text: TextConditioning) -> torch.Tensor:
        k, v = text.keys_values(self)
        q = _split_heads(self.q_linear(x), self.heads)
        if k.shape[0] != q.shape[0]:  # one caption for the whole batch
            k, v = k.expand(q.shape[0], -1, -1, -1), v.expand(q.shape[0], -1, -1, -1)
        mask = text.attn_mask
        if mask is not None and mask.shape[0] != q.shape[0]:
            mask = mask.expand(q.shape[0], -1, -1, -1)
        out = attention(q, k, v, mask)
        return self.proj(_merge_heads(out))


class Mlp(nn.Module):
    def __init__(self, dim_in: int, dim_hidden: int, dim_out: int):
        super().__init__()
        self.fc1 = nn.Linear(dim_in, dim_hidden)
        self.fc2 = nn.Linear(dim_hidden, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(gelu_linear(x, self.fc1))


class PixArtBlock(nn.Module):
    """adaLN-single block: modulated self-attention, plain cross-attention (no norm, no gate), modulated MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False, kv_compress_scale: int = 1):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, heads, qk_norm=qk_norm, kv_compress_scale=kv_compress_scale)
        self.cross_attn = CrossAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dim)
        self.scale_shift_table = nn.Parameter(torch.zeros(6, dim))

    def forward(
        self, x: torch.Tensor, t0: torch.Tensor, text: TextConditioning, grid_hw: tuple[int, int],
        cross_attn_hook: Callable[[Callable[[], torch.Tensor]], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """cross_attn_hook(compute) -> the cross-attention output to use; it may call compute() or reuse an earlier
        result (T-GATE step caching)."""
        # t0: (B, 6, D), the shared adaLN projection of the timestep
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (self.scale_shift_table[None] + t0).chunk(6, dim=1)
        # addcmul = x + a * b in one pass: on the CPU these elementwise passes cost as much as a small matmul
        x = torch.addcmul(x, gate_msa, self.attn(torch.addcmul(shift_msa, self.norm1(x), 1 + scale_msa), grid_hw))
        if cross_attn_hook is None:
            x = x + self.cross_attn(x, text)
        else:
            x = x + cross_attn_hook(lambda: self.cross_attn(x, text))
        x = torch.addcmul(x, gate_mlp, self.mlp(torch.addcmul(shift_mlp, self.norm2(x), 1 + scale_mlp)))
        return x


class PatchEmbed(nn.Module):
    def __init__(self, in_channels: int, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # contiguous: otherwise every later op inherits the conv's channels-first layout (a transposing copy per linear)
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()  # (B, N, D)


class ScalarEmbedder(nn.Module):
    """Sinusoid of a scalar, then Linear-SiLU-Linear (timestep: 256->D->D; sizes: 256->D/3->D/3)."""

    def __init__(self, dim_out: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim_out), nn.SiLU(), nn.Linear(dim_out, dim_out))

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        # values: (B,) or (B, k); each scalar is embedded separately and the k results concatenated
        b = values.shape[0]
        emb = timestep_sinusoid(values.reshape(-1), self.freq_dim).to(self.mlp[0].weight.dtype)
        return self.mlp(emb).reshape(b, -1)


class CaptionEmbedder(nn.Module):
    def __init__(self, caption_channels: int, dim: int, text_len: int, has_null_embedding: bool):
        super().__init__()
        self.y_proj = Mlp(caption_channels, dim, dim)
        if has_null_embedding:
            # The learned "empty caption" the α checkpoints were trained with for classifier-free guidance.
            self.register_buffer("y_embedding", torch.zeros(text_len, caption_channels))
        else:
            self.y_embedding = None


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * out_channels)
        self.scale_shift_table = nn.Parameter(torch.zeros(2, dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class ControlSignal(Protocol):
    """What the transformer asks of a ControlNet: given the tokens after block 0, the residuals to add to the input
    of blocks 1, 2, ... (a list; its k-th entry goes into block k+1)."""

    def __call__(
        self, x: torch.Tensor, t0: torch.Tensor, text: TextConditioning, grid_hw: tuple[int, int]
    ) -> Sequence[torch.Tensor]: ...


class PixArtTransformer(nn.Module):
    def __init__(self, config: PixArtConfig):
        super().__init__()
        self.config = c = config
        d = c.hidden_size
        self.x_embedder = PatchEmbed(c.in_channels, d, c.patch_size)
        self.t_embedder = ScalarEmbedder(d)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.y_embedder = CaptionEmbedder(c.caption_channels, d, c.text_len, c.has_null_embedding)
        if c.micro_conditions:
            self.csize_embedder = ScalarEmbedder(d // 3)
            self.ar_embedder = ScalarEmbedder(d // 3)
        self.blocks = nn.ModuleList(
            PixArtBlock(
                d,
                c.num_heads,
                c.mlp_ratio,
                qk_norm=c.qk_norm,
                kv_compress_scale=c.kv_compress_scale if i in c.kv_compress_layers else 1,
            )
            for i in range(c.depth)
        )
        self.final_layer = FinalLayer(d, c.patch_size, c.out_channels)
        self._pos_embed_cache: dict[tuple, torch.Tensor] = {}

    @property
    def dtype(self) -> torch.dtype:
        return self.t_block[1].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.t_block[1].weight.device

    # ----- text -----
    def prepare_text(self, y: torch.Tensor, y_mask: torch.Tensor | None = None) -> TextConditioning:
        """T5 embeddings (B, L, caption_channels) and their 0/1 mask (B, L) -> projected, trimmed tokens."""
        if y.ndim == 4:  # the original code's (B, 1, L, C)
            y = y.squeeze(1)
        if y.ndim != 3 or y.shape[-1] != self.config.caption_channels:
            raise PixArtError(
                f"The text conditioning has shape {tuple(y.shape)}, but this model expects (batch, tokens, "
                f"{self.config.caption_channels}) T5 embeddings. Encode the prompt with the T5 encoder made for PixArt "
                "(t5-v1_1-xxl)."
            )
        if y_mask is None:
            y_mask = torch.ones(y.shape[:2], dtype=torch.bool, device=y.device)
        y_mask = y_mask.to(device=y.device).bool()
        if y_mask.shape != y.shape[:2]:
            raise PixArtError(f"The text mask has shape {tuple(y_mask.shape)} but the embeddings have {tuple(y.shape[:2])}.")
        valid = y_mask.any(dim=0).nonzero()
        used = int(valid.max()) + 1 if len(valid) else 1  # tokens past the last valid one are never attended
        y, y_mask = y[:, :used], y_mask[:, :used]
        y_mask = y_mask.clone()
        y_mask[~y_mask.any(dim=1), 0] = True  # an all-masked caption would make softmax NaN
        tokens = self.y_embedder.y_proj(y.to(device=self.device, dtype=self.dtype))
        return TextConditioning(tokens, y_mask.to(self.device))

    def null_text(self, batch: int, y_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The learned null caption of α checkpoints (their training-time CFG dropout), masked like the prompt."""
        emb = self.y_embedder.y_embedding
        if emb is None:
            raise PixArtError(
                "This checkpoint carries no learned null caption (y_embedding): diffusers-format files drop it. "
                "Use the empty-prompt unconditional branch instead."
            )
        if y_mask is None:
            y_mask = torch.ones(batch, emb.shape[0], dtype=torch.long, device=emb.device)
        return null_embedding_conditioning(emb, y_mask)

    # ----- image -----
    def position_embedding(self, grid_h: int, grid_w: int) -> torch.Tensor:
        c = self.config
        key = (grid_h, grid_w, self.device, self.dtype)
        pe = self._pos_embed_cache.get(key)
        if pe is None:
            base = c.sample_size // c.patch_size
            pe = sincos_2d_position_embedding(c.hidden_size, grid_h, grid_w, base, c.pe_interpolation)
            pe = pe[None].to(device=self.device, dtype=self.dtype)
            if len(self._pos_embed_cache) > 16:
                self._pos_embed_cache.clear()
            self._pos_embed_cache[key] = pe
        return pe

    def check_latent(self, x: torch.Tensor) -> None:
        c = self.config
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise PixArtError(
                f"The latent has shape {tuple(x.shape)}, but this model takes (batch, {c.in_channels}, height/8, width/8)."
                " Use a latent from an SD/SDXL-family VAE (4 channels)."
            )
        if x.shape[2] % c.patch_size or x.shape[3] % c.patch_size:
            raise PixArtError(
                f"The latent is {x.shape[2]}x{x.shape[3]}; height and width must be multiples of {c.patch_size} "
                f"(image sizes multiples of {8 * c.patch_size} px)."
            )

    def embed_timestep(
        self, timestep: torch.Tensor, batch: int, resolution: torch.Tensor | None, aspect_ratio: torch.Tensor | None,
        latent_hw: tuple[int, int],
    ) -> torch.Tensor:
        """t: (B, D), the timestep embedding plus micro-conditions (height, width and aspect ratio) where trained."""
        timestep = torch.as_tensor(timestep, device=self.device).reshape(-1)
        if timestep.numel() == 1:
            timestep = timestep.expand(batch)
        t = self.t_embedder(timestep)
        if self.config.micro_conditions:
            h, w = latent_hw[0] * 8, latent_hw[1] * 8
            if resolution is None:
                resolution = torch.tensor([[h, w]], dtype=torch.float32)
            if aspect_ratio is None:
                aspect_ratio = torch.tensor([[h / w]], dtype=torch.float32)
            resolution = torch.as_tensor(resolution, dtype=torch.float32, device=self.device).reshape(-1, 2)
            aspect_ratio = torch.as_tensor(aspect_ratio, dtype=torch.float32, device=self.device).reshape(-1, 1)
            if resolution.shape[0] != batch:
                resolution = resolution.expand(batch, -1)
            if aspect_ratio.shape[0] != batch:
                aspect_ratio = aspect_ratio.expand(batch, -1)
            t = t + torch.cat([self.csize_embedder(resolution), self.ar_embedder(aspect_ratio)], dim=1)
        return t

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor | float,
        text: TextConditioning,
        resolution: torch.Tensor | None = None,
        aspect_ratio: torch.Tensor | None = None,
        controls: Sequence[ControlSignal] | None = None,
        block_hook: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None,
        cross_attn_hook: Callable[[int, Callable[[], torch.Tensor]], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x: (B, in_channels, H, W) latent -> (B, out_channels, H, W); channels 0-3 are epsilon.

        Step caching (step_cache.py): block_hook(i, x) may return a tensor to skip block i; it is called before every
        block, and once more with i = depth after the last one (a returned tensor replaces the blocks' output).
        cross_attn_hook(i, compute) returns block i's cross-attention output (compute() runs the layer).
        """
        self.check_latent(x)
        c = self.config
        b, _, lh, lw = x.shape
        p = c.patch_size
        gh, gw = lh // p, lw // p
        out_dtype = x.dtype

        h = self.x_embedder(x.to(self.dtype)) + self.position_embedding(gh, gw)  # (B, N, D)
        t = self.embed_timestep(timestep, b, resolution, aspect_ratio, (lh, lw))  # (B, D)
        t0 = self.t_block(t).view(b, 6, c.hidden_size)  # adaLN-single, shared by all blocks

        residuals: list[torch.Tensor] | None = None
        for i, block in enumerate(self.blocks):
            if residuals is not None and 0 < i <= len(residuals):
                h = h + residuals[i - 1]
            cached = block_hook(i, h) if block_hook is not None else None
            if cached is not None:
                h = cached
            elif cross_attn_hook is None:
                h = block(h, t0, text, (gh, gw))
            else:
                h = block(h, t0, text, (gh, gw), functools.partial(cross_attn_hook, i))
            if i == 0 and controls:
                residuals = self._control_residuals(controls, h, t0, text, (gh, gw))
        after = block_hook(len(self.blocks), h) if block_hook is not None else None
        h = after if after is not None else h

        h = self.final_layer(h, t)  # (B, N, p*p*C_out); the final layer takes t, not t0
        return self.unpatchify(h, gh, gw).to(out_dtype)

    @staticmethod
    def _control_residuals(controls, h, t0, text, grid_hw) -> list[torch.Tensor] | None:
        total: list[torch.Tensor] = []
        for control in controls:
            for k, r in enumerate(control(h, t0, text, grid_hw)):  # ControlNets may have different copy counts
                if k < len(total):
                    total[k] = total[k] + r
                else:
                    total.append(r)
        return total or None

    def unpatchify(self, h: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
        c = self.config
        p, co = c.patch_size, c.out_channels
        h = h.reshape(h.shape[0], gh, gw, p, p, co)  # token features are ordered (row, col, channel)
        h = torch.einsum("nhwpqc->nchpwq", h)
        return h.reshape(h.shape[0], co, gh * p, gw * p)


def null_embedding_conditioning(
    y_embedding: torch.Tensor, prompt_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The original α unconditional branch: the learned null caption, masked like the prompt.

    y_embedding: (L, D) (the checkpoint's `y_embedder.y_embedding`, D = 4096), prompt_mask: (B, L).
    Returns embeds (B, L, D) and a copy of the prompt mask.
    """
    if y_embedding.dim() == 3 and y_embedding.shape[0] == 1:
        y_embedding = y_embedding[0]
    if y_embedding.dim() != 2:
        raise PixArtError(f"The null embedding must be (tokens, channels); got shape {tuple(y_embedding.shape)}.")
    if prompt_mask.dim() != 2:
        raise PixArtError(f"The prompt mask must be (batch, tokens); got shape {tuple(prompt_mask.shape)}.")
    if y_embedding.shape[0] != prompt_mask.shape[1]:
        raise PixArtError(
            f"This checkpoint's null embedding has {y_embedding.shape[0]} tokens but the prompt was encoded with "
            f"{prompt_mask.shape[1]}; encode the prompt with max_length {y_embedding.shape[0]}, or use the "
            "'empty' unconditional mode."
        )
    batch = prompt_mask.shape[0]
    embeds = y_embedding.to(prompt_mask.device)[None].expand(batch, -1, -1).contiguous()
    return embeds, prompt_mask.clone()
