"""The LDM first stage: a convolutional KL-regularised autoencoder (Rombach et al. 2022, sec. 3.1).

Module attribute names reproduce the CompVis / Stability state-dict layout exactly
(`encoder.down.L.block.B.norm1`, `decoder.up.L.upsample.conv`, `quant_conv`, ...), so a
released `first_stage_model.*` checkpoint loads after stripping its prefix. `decoder.up` is
indexed by resolution level (0 = full resolution) and therefore runs in reverse order.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.nets.attention import AttnBlock
from ldm.nets.posterior import DiagonalGaussian
from ldm.nets.unet import Upsample  # nearest x2 + 3x3 conv: the same layer in both nets

GROUP_NORM_EPS = 1e-6  # CompVis autoencoder GroupNorm eps (the UNet uses 1e-5)


class AutoencoderNet(nn.Module):
    """Encoder -> diagonal Gaussian posterior over latents -> decoder.

    Latents are (B, embed_dim, H/f, W/f) with f = 2 ** (len(ch_mult) - 1).
    `attention_resolutions` are downsampling rates (1 = full resolution, f = the lowest level):
    each listed level gets a self-attention block after every ResNet block, in addition to
    the attention block that the middle of the encoder and of the decoder always has.
    """

    def __init__(
        self,
        embed_dim: int,
        z_channels: int,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (),
        dropout: float = 0.0,
        in_channels: int = 3,
        out_channels: int = 3,
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        ch_mult = tuple(ch_mult)
        _check_sizes(ch, ch_mult, z_channels, attention_resolutions, norm_groups)
        attention_levels = {int(rate).bit_length() - 1 for rate in attention_resolutions}
        shared = dict(
            ch=ch,
            ch_mult=ch_mult,
            num_res_blocks=num_res_blocks,
            attention_levels=attention_levels,
            dropout=dropout,
            z_channels=z_channels,
            norm_groups=norm_groups,
        )
        self.embed_dim = embed_dim
        self.encoder = Encoder(in_channels=in_channels, **shared)
        self.decoder = Decoder(out_channels=out_channels, **shared)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.encoder.down) - 1)

    @property
    def latent_channels(self) -> int:
        return self.embed_dim

    def encode(self, x: Tensor) -> DiagonalGaussian:
        factor = self.downsampling_factor
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(
                f"image size {tuple(x.shape[-2:])} is not divisible by the downsampling factor "
                f"{factor}: crop or resize images to a multiple of {factor}"
            )
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior


class Encoder(nn.Module):
    """Image -> 2 * z_channels maps (mean and log-variance) at 1/f resolution."""

    def __init__(
        self,
        in_channels: int,
        ch: int,
        ch_mult: tuple[int, ...],
        num_res_blocks: int,
        attention_levels: set[int],
        dropout: float,
        z_channels: int,
        norm_groups: int,
    ) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        width = ch
        for level, mult in enumerate(ch_mult):
            stage = ResolutionLevel(
                width, ch * mult, num_res_blocks, level in attention_levels, dropout, norm_groups
            )
            width = ch * mult
            if level < len(ch_mult) - 1:
                stage.downsample = Downsample(width)
            self.down.append(stage)
        self.mid = MidBlock(width, dropout, norm_groups)
        self.norm_out = group_norm(width, norm_groups)
        self.conv_out = nn.Conv2d(width, 2 * z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        last = len(self.down) - 1
        for level, stage in enumerate(self.down):
            h = stage(h)
            if level < last:
                h = stage.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """z_channels latent maps -> image; one more ResNet block per level than the encoder."""

    def __init__(
        self,
        out_channels: int,
        ch: int,
        ch_mult: tuple[int, ...],
        num_res_blocks: int,
        attention_levels: set[int],
        dropout: float,
        z_channels: int,
        norm_groups: int,
    ) -> None:
        super().__init__()
        width = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, width, 3, padding=1)
        self.mid = MidBlock(width, dropout, norm_groups)
        stages: list[ResolutionLevel] = []
        for level in reversed(range(len(ch_mult))):
            stage = ResolutionLevel(
                width,
                ch * ch_mult[level],
                num_res_blocks + 1,
                level in attention_levels,
                dropout,
                norm_groups,
            )
            width = ch * ch_mult[level]
            if level > 0:
                stage.upsample = Upsample(width)
            stages.insert(0, stage)
        self.up = nn.ModuleList(stages)  # indexed by level: up[0] is full resolution, runs last
        self.norm_out = group_norm(width, norm_groups)
        self.conv_out = nn.Conv2d(width, out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(range(len(self.up))):
            stage = self.up[level]
            h = stage(h)
            if level > 0:
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # no tanh: outputs are not squashed


class ResolutionLevel(nn.Module):
    """ResNet blocks at one resolution, each followed by self-attention when enabled.

    The owner attaches the resampler as `downsample` or `upsample` (the CompVis key names).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_blocks: int,
        use_attention: bool,
        dropout: float,
        norm_groups: int,
    ) -> None:
        super().__init__()
        widths = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(
            ResnetBlock(widths[i], out_channels, dropout, norm_groups) for i in range(num_blocks)
        )
        self.attn = nn.ModuleList(
            AttnBlock(out_channels, norm_groups) for _ in range(num_blocks if use_attention else 0)
        )

    def forward(self, h: Tensor) -> Tensor:
        for index, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[index](h)
        return h


class MidBlock(nn.Module):
    """ResNet block, self-attention, ResNet block at the lowest resolution."""

    def __init__(self, channels: int, dropout: float, norm_groups: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, norm_groups)
        self.attn_1 = AttnBlock(channels, norm_groups)
        self.block_2 = ResnetBlock(channels, channels, dropout, norm_groups)

    def forward(self, h: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class ResnetBlock(nn.Module):
    """Pre-activation residual block (GroupNorm, SiLU, 3x3 conv) x 2; 1x1 shortcut on width change."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float, norm_groups: int) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # Identity has no parameters, so the key only exists where the width changes (as in CompVis).
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class Downsample(nn.Module):
    """Halve H and W: zero-pad right/bottom by one, then a stride-2 3x3 conv without padding."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=GROUP_NORM_EPS)


def _check_sizes(
    ch: int,
    ch_mult: tuple[int, ...],
    z_channels: int,
    attention_resolutions: Sequence[int],
    norm_groups: int,
) -> None:
    """Fail at construction, with the fix, instead of deep inside a forward pass."""
    if not ch_mult:
        raise ValueError("ch_mult must list at least one level, e.g. [1, 2, 4, 4] for f = 8")
    widths = [ch * mult for mult in ch_mult]
    if any(width % norm_groups for width in widths):
        raise ValueError(
            f"every width ch * ch_mult = {widths} must be a multiple of norm_groups={norm_groups} "
            "(GroupNorm): change ch, ch_mult or norm_groups"
        )
    if z_channels < 1:
        raise ValueError(f"z_channels must be positive, got {z_channels}")
    factor = 2 ** (len(ch_mult) - 1)
    valid_rates = [2**level for level in range(len(ch_mult))]
    bad = [rate for rate in attention_resolutions if rate not in valid_rates]
    if bad:
        raise ValueError(
            f"attention_resolutions {bad} are not downsampling rates of this autoencoder "
            f"(f = {factor}); use values from {valid_rates} (1 = full resolution), not pixel sizes"
        )
