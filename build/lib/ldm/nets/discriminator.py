"""PatchGAN discriminator (Isola et al. 2017, pix2pix), as used by the LDM first stage.

It scores overlapping patches instead of whole images, so the adversarial loss pushes the
decoder towards locally realistic texture (Esser et al. 2021, sec. 3.1).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class NLayerDiscriminator(nn.Module):
    """conv4x4/2 + LeakyReLU, (n_layers - 1) x [conv4x4/2 + norm + LeakyReLU],
    conv4x4/1 + norm + LeakyReLU, conv4x4/1 -> one logit per patch, shape (B, 1, h, w)."""

    def __init__(
        self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, use_actnorm: bool = False
    ) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        norm = ActNorm if use_actnorm else nn.BatchNorm2d
        use_bias = use_actnorm  # BatchNorm's affine shift makes a conv bias redundant
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        width = ndf
        for n in range(1, n_layers + 1):
            next_width = ndf * min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(width, next_width, 4, stride=stride, padding=1, bias=use_bias),
                norm(next_width),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            width = next_width
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)


class ActNorm(nn.Module):
    """Per-channel affine layer initialised from the first training batch to zero mean and unit
    variance (Kingma & Dhariwal 2018, Glow sec. 3.1): a batch-size-independent BatchNorm stand-in."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))

    def forward(self, x: Tensor) -> Tensor:
        if self.training and not bool(self.initialized):
            with torch.no_grad():
                mean = x.mean(dim=(0, 2, 3), keepdim=True)
                std = x.std(dim=(0, 2, 3), keepdim=True)
                self.loc.copy_(-mean)
                self.scale.copy_(1.0 / (std + 1e-6))
                self.initialized.fill_(True)
        return self.scale * (x + self.loc)


def _init_weights(module: nn.Module) -> None:
    """DCGAN initialisation (Radford et al. 2016): conv ~ N(0, 0.02), norm gain ~ N(1, 0.02)."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
