"""The training objective of a latent diffusion model (LDM paper, Eq. 2):

    L = E_{z0, c, eps ~ N(0, I), t} [ w(t) || target(z0, eps, t) - net(z_t, t, c) ||^2 ],
    z_t = sqrt(ab_t) z0 + sqrt(1 - ab_t) eps,

with target = eps (DDPM) or v (Salimans & Ho 2022), w(t) = 1 (the "simple" loss) or min-SNR-gamma
(Hang et al. 2023). Three optional departures from the paper, all off by default: offset noise, a
non-uniform timestep distribution, and an L1 loss. The objective knows nothing of conditioning: the
caller hands it a denoiser with the condition already bound, `denoiser(z_t, t) -> prediction`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ldm.diffusion.schedule import (
    LOSS_TYPES,
    PREDICTION_TYPES,
    NoiseSchedule,
    diffusion_loss,
)

Denoiser = Callable[[Tensor, Tensor], Tensor]
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal", "shifted")


@dataclass(frozen=True)
class DiffusionObjective:
    """Everything that turns clean latents into per-sample losses.

    - `noise_offset` (Guttenberg 2023, "Diffusion with Offset Noise"): eps gets an extra per-sample,
      per-channel constant offset * N(0, 1), so the model can learn to change an image's mean brightness,
      which plain eps at SD's terminal SNR hides (Lin et al. 2024, Sec. 2); 0 disables it (0.05-0.1 typical).
    - `timestep_sampling`: "uniform" t ~ U{0, ..., T-1} (DDPM, LDM); "logit_normal": t/T = sigmoid(u),
      u ~ N(logit_mean, logit_std^2) (Esser et al. 2024, SD3, Sec. 3.1, Eq. 19), more weight on middle t;
      "shifted": t/T = s u / (1 + (s - 1) u), u ~ U(0, 1), with s = `timestep_shift` (SD3 Sec. 5.3.2,
      Eq. 23), s > 1 moves training towards high noise, where layout is decided.
    """

    prediction_type: str = "eps"
    loss_type: str = "l2"
    min_snr_gamma: float | None = None
    noise_offset: float = 0.0
    timestep_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    timestep_shift: float = 1.0

    def __post_init__(self) -> None:
        for name, value, valid in (("prediction_type", self.prediction_type, PREDICTION_TYPES),
                                   ("loss_type", self.loss_type, LOSS_TYPES),
                                   ("timestep_sampling", self.timestep_sampling, TIMESTEP_SAMPLINGS)):
            if value not in valid:
                raise ValueError(f"unknown {name} {value!r}; valid values are: {', '.join(valid)}")
        if self.noise_offset < 0:
            raise ValueError(f"noise_offset must be >= 0 (0 disables offset noise), got {self.noise_offset}")
        if self.logit_std <= 0 or self.timestep_shift <= 0:
            raise ValueError(f"logit_std and timestep_shift must be positive, got {self.logit_std} and "
                             f"{self.timestep_shift}")
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be positive (e.g. 5.0) or None, got {self.min_snr_gamma}")

    def sample_timesteps(self, n: int, num_timesteps: int, generator: torch.Generator | None = None,
                         device: torch.device | str | None = None) -> Tensor:
        """(n,) int64 timesteps from the configured distribution; continuous draws u in (0, 1) map to
        floor(u * T), so every distribution covers 0 ... T-1."""
        if self.timestep_sampling == "uniform":
            return torch.randint(0, num_timesteps, (n,), device=device, generator=generator)
        if self.timestep_sampling == "logit_normal":
            normal = torch.randn(n, device=device, generator=generator, dtype=torch.float64)
            u = torch.sigmoid(self.logit_mean + self.logit_std * normal)
        else:
            uniform = torch.rand(n, device=device, generator=generator, dtype=torch.float64)
            u = self.timestep_shift * uniform / (1.0 + (self.timestep_shift - 1.0) * uniform)
        return (u * num_timesteps).long().clamp(0, num_timesteps - 1)

    def sample_noise(self, shape: torch.Size | tuple[int, ...], generator: torch.Generator | None = None,
                     device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """eps ~ N(0, I), plus noise_offset * N(0, 1) per sample and channel when offset noise is on."""
        noise = torch.randn(shape, device=device, generator=generator, dtype=dtype)
        if self.noise_offset > 0:
            offset_shape = (shape[0], shape[1], *([1] * (len(shape) - 2)))
            noise = noise + self.noise_offset * torch.randn(offset_shape, device=device, generator=generator,
                                                            dtype=dtype)
        return noise

    def weights(self, schedule: NoiseSchedule, t: Tensor) -> Tensor | None:
        """w(t): None for the simple loss, else min-SNR-gamma in this parameterisation's loss."""
        if self.min_snr_gamma is None:
            return None
        return schedule.loss_weights(t, self.prediction_type, self.min_snr_gamma)

    def losses_at(self, denoiser: Denoiser, schedule: NoiseSchedule, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Per-sample losses (B,) at given timesteps and noise: w(t) * mean |target - denoiser(z_t, t)|^p."""
        noisy = schedule.q_sample(x0, t, noise)
        prediction = denoiser(noisy, t)
        target = schedule.training_target(x0, noise, t, self.prediction_type)
        return diffusion_loss(prediction, target, self.weights(schedule, t), self.loss_type)

    def __call__(self, denoiser: Denoiser, schedule: NoiseSchedule, x0: Tensor,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """A Monte-Carlo draw of Eq. 2 for the batch x0: per-sample losses (B,) and their timesteps (B,).
        t is drawn before the noise, both from `generator` (None: the global RNG)."""
        t = self.sample_timesteps(x0.shape[0], schedule.num_timesteps, generator, x0.device)
        noise = self.sample_noise(x0.shape, generator, x0.device, x0.dtype)
        return self.losses_at(denoiser, schedule, x0, t, noise), t


def timestep_density(objective: DiffusionObjective, num_timesteps: int) -> Tensor:
    """The probability of each timestep 0 ... T-1 under `objective.timestep_sampling` (float64, sums to 1),
    from the closed-form CDF of u evaluated at the bin edges k / T; for tests and plots."""
    edges = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    if objective.timestep_sampling == "uniform":
        cdf = edges
    elif objective.timestep_sampling == "logit_normal":
        logits = torch.logit(edges.clamp(1e-300, 1 - 1e-16))
        cdf = 0.5 * (1 + torch.erf((logits - objective.logit_mean) / (objective.logit_std * math.sqrt(2))))
        cdf[0], cdf[-1] = 0.0, 1.0
    else:  # u' = s u / (1 + (s - 1) u)  <=>  u = u' / (s - (s - 1) u')
        s = objective.timestep_shift
        cdf = edges / (s - (s - 1) * edges)
    return cdf[1:] - cdf[:-1]
