"""The latent-diffusion UNet εθ(z_t, t, τθ(y)) (Rombach et al. 2022, Sec. 3.3 and Eq. 3).

Module attribute names reproduce the CompVis / Stability state-dict layout exactly
(docs/architecture.md): `time_embed.{0,2}`, `input_blocks.N.M`, `middle_block.{0,1,2}`,
`output_blocks.N.M`, `out.{0,2}`, so a released SD 1.x / 2.x UNet loads after stripping the
`model.diffusion_model.` prefix.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ldm.nets.attention import GroupNorm32, SpatialTransformer, zero_module


class UNetModel(nn.Module):
    """Encoder / decoder UNet with ResBlocks, SpatialTransformers and skip connections.

    Conditioning: cross-attention on `context` (B, L, context_dim); a vector `y`
    (B, class_embed_dim) projected by `label_emb` and added to the time embedding; channel
    concatenation is the caller's job (`LatentDiffusion` stacks concat conditions on z_t and derives
    `in_channels`). `attention_resolutions` are
    downsampling rates (1 = full resolution). Set exactly one of `num_heads` (fixed head count,
    SD 1.x) and `num_head_channels` (fixed head width, SD 2.x). `context_mask` (B, L) bool restricts
    cross-attention to the true tokens (a key-padding mask); `spatial_positional_embedding` adds fixed 2-D
    position codes to the tokens of every SpatialTransformer (no weights: the SD key layout is unchanged).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        model_channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        num_heads: int = -1,
        num_head_channels: int = -1,
        transformer_depth: int = 1,
        context_dim: int | None = None,
        class_embed_dim: int | None = None,
        use_linear_in_transformer: bool = False,
        use_scale_shift_norm: bool = False,
        use_checkpoint: bool = False,
        norm_groups: int = 32,
        spatial_positional_embedding: bool = False,
    ) -> None:
        super().__init__()
        if (num_heads == -1) == (num_head_channels == -1):
            raise ValueError(
                f"UNetModel: set exactly one of num_heads (fixed head count, SD 1.x) and num_head_channels "
                f"(fixed head width, SD 2.x); got num_heads={num_heads}, num_head_channels={num_head_channels}"
            )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.model_channels = model_channels
        self.context_dim = context_dim
        self.class_embed_dim = class_embed_dim
        self.use_checkpoint = use_checkpoint
        self.downsampling_factor = 2 ** (len(channel_mult) - 1)
        time_embed_dim = 4 * model_channels

        def res_block(channels: int, out: int) -> ResBlock:
            return ResBlock(channels, time_embed_dim, out, dropout, use_scale_shift_norm, norm_groups)

        def transformer(channels: int) -> SpatialTransformer:
            heads, head_width = _head_layout(channels, num_heads, num_head_channels)
            return SpatialTransformer(
                channels, heads, head_width, transformer_depth, context_dim,
                use_linear_in_transformer, dropout, norm_groups, spatial_positional_embedding,
            )

        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )
        if class_embed_dim is not None:
            self.label_emb = nn.Linear(class_embed_dim, time_embed_dim)

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))])
        skip_channels = [model_channels]
        channels, rate = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res_block(channels, mult * model_channels)]
                channels = mult * model_channels
                if rate in attention_resolutions:
                    layers.append(transformer(channels))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(channels)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(channels)))
                skip_channels.append(channels)
                rate *= 2

        self.middle_block = TimestepEmbedSequential(
            res_block(channels, channels), transformer(channels), res_block(channels, channels)
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for index in range(num_res_blocks + 1):
                layers = [res_block(channels + skip_channels.pop(), mult * model_channels)]
                channels = mult * model_channels
                if rate in attention_resolutions:
                    layers.append(transformer(channels))
                if level != 0 and index == num_res_blocks:
                    layers.append(Upsample(channels))
                    rate //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            GroupNorm32(norm_groups, channels),
            nn.SiLU(),
            zero_module(nn.Conv2d(channels, out_channels, 3, padding=1)),
        )

    def forward(
        self, x: Tensor, timesteps: Tensor, context: Tensor | None = None, y: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> Tensor:
        """x: (B, in_channels, H, W); timesteps: (B,) or scalar, int or float -> (B, out_channels, H, W)."""
        self._check_inputs(x, context, y)
        _check_context_mask(context, context_mask)
        if timesteps.ndim == 0:  # one timestep for the whole batch
            timesteps = timesteps.expand(x.shape[0])
        t_emb = timestep_embedding(timesteps, self.model_channels).to(x.dtype)
        emb = self.time_embed(t_emb)
        if y is not None:
            emb = emb + self.label_emb(y)

        h, skips = x, []
        for block in self.input_blocks:
            h = self._run(block, h, emb, context, context_mask)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context, context_mask)
        for block in self.output_blocks:
            h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb, context, context_mask)
        return self.out(h)

    def _run(self, block: TimestepEmbedSequential, h: Tensor, emb: Tensor, context: Tensor | None,
             context_mask: Tensor | None) -> Tensor:
        """Gradient checkpointing trades a second forward of each block for its activation memory."""
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(block, h, emb, context, context_mask, use_reentrant=False)
        return block(h, emb, context, context_mask)

    def _check_inputs(self, x: Tensor, context: Tensor | None, y: Tensor | None) -> None:
        height, width = x.shape[-2:]
        if height % self.downsampling_factor or width % self.downsampling_factor:
            raise ValueError(
                f"UNetModel: input size {height}x{width} must be divisible by {self.downsampling_factor} "
                f"(2 ** (len(channel_mult) - 1)); pad or resize the latent"
            )
        if self.context_dim is None and context is not None:
            raise ValueError("UNetModel: got a context but the model was built with context_dim=None; "
                             "set context_dim to use cross-attention")
        if self.context_dim is not None:
            if context is None:
                raise ValueError(f"UNetModel: context_dim={self.context_dim} needs a context (B, L, "
                                 f"{self.context_dim}); pass the conditioner's null context for unconditional rows")
            if context.ndim != 3 or context.shape[-1] != self.context_dim:
                raise ValueError(f"UNetModel: context must be (B, L, {self.context_dim}), "
                                 f"got shape {tuple(context.shape)}")
        if self.class_embed_dim is None and y is not None:
            raise ValueError("UNetModel: got y but the model was built with class_embed_dim=None; "
                             "set class_embed_dim to use a class / vector embedding")
        if self.class_embed_dim is not None:
            if y is None:
                raise ValueError(f"UNetModel: class_embed_dim={self.class_embed_dim} needs y (B, "
                                 f"{self.class_embed_dim}); pass the conditioner's null embedding")
            if y.ndim != 2 or y.shape[-1] != self.class_embed_dim:
                raise ValueError(f"UNetModel: y must be (B, {self.class_embed_dim}), got shape {tuple(y.shape)}")


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding [cos(t·f), sin(t·f)], f_i = exp(-ln(max_period)·i/half) (Vaswani et al. 2017, Sec. 3.5;
    cos first, as in the CompVis UNet). Returns float32 (B, dim); odd `dim` gets a zero last column."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(embedding, (0, dim % 2))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the time embedding added in between (Ho et al. 2020, App. B)
    or, with `use_scale_shift_norm`, applied as FiLM scale/shift after the second norm (Nichol & Dhariwal 2021)."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int,
        dropout: float = 0.0,
        use_scale_shift_norm: bool = False,
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            GroupNorm32(norm_groups, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        emb_out = 2 * out_channels if use_scale_shift_norm else out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            GroupNorm32(norm_groups, out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = (
            nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, kernel_size=1)
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        emb_out = self.emb_layers(emb)[:, :, None, None].to(h.dtype)
        if self.use_scale_shift_norm:
            norm, rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = emb_out.chunk(2, dim=1)
            h = rest(norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class Downsample(nn.Module):
    """Stride-2 3×3 convolution (`op`), halving H and W."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour ×2 followed by a 3×3 convolution (`conv`)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """A Sequential that hands the time embedding to ResBlocks and the context to transformers."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor | None = None,  # type: ignore[override]
                context_mask: Tensor | None = None) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, context_mask)
            else:
                x = layer(x)
        return x


def _check_context_mask(context: Tensor | None, mask: Tensor | None) -> None:
    if mask is None:
        return
    if context is None:
        raise ValueError("UNetModel: got a context_mask without a context; the mask marks the context's true tokens")
    if mask.dtype != torch.bool or tuple(mask.shape) != tuple(context.shape[:2]):
        raise ValueError(f"UNetModel: context_mask must be a bool tensor of shape (B, L) = {tuple(context.shape[:2])}, "
                         f"got {mask.dtype} {tuple(mask.shape)}")


def _head_layout(channels: int, num_heads: int, num_head_channels: int) -> tuple[int, int]:
    """(heads, head width) at a level with `channels` channels, from whichever of the two is fixed."""
    fixed, name = (num_heads, "num_heads") if num_heads != -1 else (num_head_channels, "num_head_channels")
    if fixed <= 0 or channels % fixed:
        raise ValueError(f"UNetModel: {name}={fixed} must be positive and divide the width {channels} of every "
                         f"attention level; choose a divisor of all model_channels * channel_mult widths")
    return (fixed, channels // fixed) if name == "num_heads" else (channels // fixed, fixed)
