"""The first stage's posterior q(z|x): a Gaussian with diagonal covariance."""
from __future__ import annotations

import math

import torch
from torch import Tensor

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


class DiagonalGaussian:
    """N(mean, diag(exp(logvar))) over (B, C, H, W) latents.

    `parameters` is the encoder output (B, 2C, H, W): the first C channels are the mean, the
    last C the log-variance, as in the CompVis checkpoints. The log-variance is clamped to
    [-30, 20] so that exp() can neither underflow to a zero std nor overflow.
    """

    def __init__(self, parameters: Tensor) -> None:
        if parameters.ndim < 2 or parameters.shape[1] % 2:
            raise ValueError(
                "DiagonalGaussian expects (B, 2C, ...) parameters (mean and log-variance stacked on "
                f"dim 1), got shape {tuple(parameters.shape)}"
            )
        self.parameters = parameters
        self.mean, logvar = parameters.chunk(2, dim=1)
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        self.var = self.logvar.exp()
        self.std = (0.5 * self.logvar).exp()

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """Reparameterised draw z = mean + std * eps (Kingma & Welling 2014, eq. 10)."""
        noise = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * noise

    def mode(self) -> Tensor:
        return self.mean

    def kl(self, other: DiagonalGaussian | None = None) -> Tensor:
        """KL(self || other) per sample, summed over all non-batch dims; `other=None` is N(0, I).

        Closed form for Gaussians (Kingma & Welling 2014, appendix B):
        0.5 * sum((mu1 - mu2)^2 / var2 + var1 / var2 - 1 - logvar1 + logvar2).
        """
        if other is None:
            terms = self.mean.pow(2) + self.var - 1.0 - self.logvar
        else:
            terms = (
                (self.mean - other.mean).pow(2) / other.var
                + self.var / other.var
                - 1.0
                - self.logvar
                + other.logvar
            )
        return 0.5 * terms.sum(dim=self._event_dims())

    def nll(self, sample: Tensor) -> Tensor:
        """Negative log-likelihood of `sample` per batch element, summed over non-batch dims."""
        terms = math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var
        return 0.5 * terms.sum(dim=self._event_dims())

    def _event_dims(self) -> tuple[int, ...]:
        return tuple(range(1, self.mean.ndim))
