"""Attention layers of the LDM UNet and autoencoder, all through `F.scaled_dot_product_attention`.

SDPA picks the flash / memory-efficient kernels on GPU and a fused kernel on CPU, so one code path
serves self- and cross-attention (Rombach et al. 2022, Sec. 3.3: Attention(Q, K, V) =
softmax(QKᵀ/√d)·V with Q from the image tokens and K, V from the conditioning tokens τθ(y)).

Attribute names give the CompVis / Stability state-dict keys (docs/architecture.md):
`to_q`, `to_k`, `to_v`, `to_out.0`, `ff.net.0.proj`, `ff.net.2`, `norm`, `proj_in`,
`transformer_blocks.i.{norm1,attn1,norm2,attn2,norm3,ff}`, `proj_out`; VAE `AttnBlock`: `norm, q, k, v, proj_out`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

POSITION_BANDS = 8  # Fourier bands per axis of the 2-D positional embedding: periods 2 ... 1/128 of the image


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (as the reference UNet does),
    so bf16 / fp16 activations do not lose the statistics' precision."""

    def forward(self, x: Tensor) -> Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters so that a residual branch starts as the identity."""
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


class Attention(nn.Module):
    """Multi-head attention; `context=None` makes it self-attention (Rombach et al. 2022, Eq. 3)."""

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.dim_head = dim_head
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """x: (B, N, query_dim); context: (B, L, context_dim) or None -> (B, N, query_dim). `mask` (B, L) bool:
        which context tokens may be attended to (a key-padding mask; every row needs one True)."""
        context = x if context is None else context
        q, k, v = (self._split_heads(t) for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        attn_mask = None if mask is None else mask[:, None, None, :]  # broadcast over heads and queries
        # Default SDPA scale is dim_head ** -0.5, the scale of Eq. 3.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        batch, _, tokens, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(batch, tokens, self.heads * self.dim_head))

    def _split_heads(self, t: Tensor) -> Tensor:
        batch, tokens, _ = t.shape
        return t.view(batch, tokens, self.heads, self.dim_head).transpose(1, 2)


class GEGLU(nn.Module):
    """Gated GELU projection (Shazeer 2020): value * gelu(gate), value = first half of `proj`."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU MLP of the transformer block, hidden width `mult * dim`."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        inner_dim = mult * dim
        self.net = nn.Sequential(GEGLU(dim, inner_dim), nn.Dropout(dropout), nn.Linear(inner_dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention (self-attention without context), GEGLU FF."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        d_head: int,
        dropout: float = 0.0,
        context_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.attn1 = Attention(dim, None, n_heads, d_head, dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = Attention(dim, context_dim, n_heads, d_head, dropout)
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.norm3 = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None) -> Tensor:
        x = x + self.attn1(self.norm1(x))
        # without a context attn2 is self-attention, where a context (key-padding) mask has no meaning
        x = x + self.attn2(self.norm2(x), context, context_mask if context is not None else None)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the H·W tokens of a feature map, residual around the whole stack.

    `proj_in` / `proj_out` are 1×1 convolutions (SD 1.x) or Linear layers on the tokens
    (`use_linear=True`, SD 2.x); `proj_out` starts at zero so the block starts as the identity.
    `positional_embedding=True` adds `spatial_positional_embedding` to the tokens after `proj_in`: attention
    itself is permutation-invariant, so without it a query knows where it is only through what the
    convolutions before it inferred (which the padding makes weak away from the borders). It has no weights,
    so the state-dict layout is the same either way.
    """

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        context_dim: int | None = None,
        use_linear: bool = False,
        dropout: float = 0.0,
        norm_groups: int = 32,
        positional_embedding: bool = False,
    ) -> None:
        super().__init__()
        inner_dim = n_heads * d_head
        self.use_linear = use_linear
        self.positional_embedding = positional_embedding
        self.norm = GroupNorm32(norm_groups, in_channels, eps=1e-6)
        self.proj_in = _projection(in_channels, inner_dim, use_linear)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, n_heads, d_head, dropout, context_dim) for _ in range(depth)
        )
        self.proj_out = zero_module(_projection(inner_dim, in_channels, use_linear))

    def forward(self, x: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None) -> Tensor:
        batch, _, height, width = x.shape
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)
        h = h.flatten(2).transpose(1, 2)  # (B, H·W, C): one token per pixel
        if self.use_linear:
            h = self.proj_in(h)
        if self.positional_embedding:
            h = h + spatial_positional_embedding(height, width, h.shape[-1], h.device, h.dtype)
        for block in self.transformer_blocks:
            h = block(h, context, context_mask)
        if self.use_linear:
            h = self.proj_out(h)
        h = h.transpose(1, 2).reshape(batch, -1, height, width)
        if not self.use_linear:
            h = self.proj_out(h)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention of the KL autoencoder (1×1 conv q, k, v, proj_out; scale C**-0.5)."""

    def __init__(self, channels: int, norm_groups: int = 32) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(norm_groups, channels, eps=1e-6)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x)
        # (B, 1, H·W, C): one head whose width is the channel count, so SDPA scales by C**-0.5.
        q, k, v = (conv(h).flatten(2).transpose(1, 2).unsqueeze(1) for conv in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2)
        return x + self.proj_out(h.reshape(batch, channels, height, width))


def spatial_positional_embedding(height: int, width: int, dim: int, device: torch.device | str | None = None,
                                 dtype: torch.dtype = torch.float32) -> Tensor:
    """(H·W, dim) fixed 2-D Fourier features of each token's position in the image, row-major as the tokens.

    Coordinates are normalised to the image, y = (i + 0.5) / H and x = (j + 0.5) / W, so a token at the top
    left gets the same code at any latent resolution (a resolution-free variant of the 2-D sin-cos embedding
    of ViT / MAE, He et al. 2022; Fourier features as Tancik et al. 2020). Band k has angular frequency
    pi * 2^k, k < min(POSITION_BANDS, dim // 4); each band fills [sin y, cos y, sin x, cos x], and the
    channels beyond 4 * bands stay zero."""
    bands = min(POSITION_BANDS, dim // 4)
    if bands == 0:
        raise ValueError(f"a 2-D positional embedding needs a token width of at least 4, got {dim}")
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    frequencies = math.pi * 2.0 ** torch.arange(bands, device=device, dtype=torch.float32)
    angles_y = grid_y.reshape(-1, 1) * frequencies
    angles_x = grid_x.reshape(-1, 1) * frequencies
    features = torch.stack([angles_y.sin(), angles_y.cos(), angles_x.sin(), angles_x.cos()], dim=-1).flatten(1)
    return F.pad(features, (0, dim - features.shape[1])).to(dtype)


def _projection(dim_in: int, dim_out: int, use_linear: bool) -> nn.Module:
    return nn.Linear(dim_in, dim_out) if use_linear else nn.Conv2d(dim_in, dim_out, kernel_size=1)
