"""Conditions -> images with a latent diffusion model (LDM paper, Sec. 3.3 and Fig. 3): encode the conditions,
run the reverse process in latent space with classifier-free guidance, decode.

The pipeline holds no weights and knows no LightningModule: `LatentDiffusion.generate` hands it the UNet
(as a function), the conditioner, the schedule and the first stage's encode / decode. The conditioner is
duck-typed (ldm.models.conditioners' interface): `batch_key` (None for unconditional models) and
`conditioner(inputs, drop_mask=None) -> dict` of UNet keyword arguments, where rows with drop_mask get the
null condition, which is also the unconditional half of guidance.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch
from torch import Tensor

from ldm.diffusion.samplers import ModelFn, make_generators, randn_per_sample, sample
from ldm.diffusion.schedule import NoiseSchedule
from ldm.diffusion.settings import SamplerSettings

Conditions = Sequence[str] | Sequence[int] | Tensor | None


class Conditioner(Protocol):
    batch_key: str | None

    def __call__(self, inputs: Conditions, drop_mask: Tensor | None = None) -> dict[str, Tensor]: ...


@dataclass(frozen=True)
class LatentPipeline:
    """`denoiser(z_t, t, cond)` is the UNet; `encode(images, generators)` gives scaled latents (one posterior
    draw per sample from its own generator); `decode(latents)` gives images in about [-1, 1]."""

    denoiser: ModelFn
    conditioner: Conditioner
    schedule: NoiseSchedule
    encode: Callable[[Tensor, list[torch.Generator] | None], Tensor]
    decode: Callable[[Tensor], Tensor]
    latent_channels: int
    downsampling_factor: int
    prediction_type: str
    device: torch.device

    def conditions(self, conditions: Conditions, n: int, cfg_scale: float) -> tuple[dict[str, Tensor], dict | None]:
        """The conditional UNet inputs and, when guidance needs them, the unconditional ones (the null
        condition: the same conditioner with every row dropped)."""
        if isinstance(conditions, Tensor):
            conditions = conditions.to(self.device)
        cond = self.conditioner(conditions, drop_mask=None)
        if cfg_scale == 1.0 or self.conditioner.batch_key is None:
            return cond, None
        return cond, self.conditioner(conditions, drop_mask=torch.ones(n, dtype=torch.bool, device=self.device))

    @torch.no_grad()
    def __call__(
        self,
        conditions: Conditions,
        num_samples: int | None,
        settings: SamplerSettings,
        *,
        image_size: int,
        seed_offset: int = 0,
        init_images: Tensor | None = None,
        strength: float = 1.0,
        progress: bool = False,
    ) -> Tensor:
        """Images in [-1, 1], one per condition (or `num_samples` for unconditional models). Sample i draws
        every random number (img2img posterior draw, initial noise, sampler noise) from a CPU generator
        seeded `settings.seed + seed_offset + i`, so it does not depend on the batch or the device."""
        n = len(conditions) if conditions is not None else num_samples
        if n is None:
            raise ValueError("generate() needs `conditions` (prompts or class labels) or `num_samples`.")
        if image_size % self.downsampling_factor:
            raise ValueError(f"image_size={image_size} must be a multiple of the first stage's factor "
                             f"f={self.downsampling_factor}.")
        size = image_size // self.downsampling_factor
        cond, uncond = self.conditions(conditions, n, settings.cfg_scale)
        generators = make_generators(settings.seed + seed_offset, n)
        init_latent = None
        if init_images is not None:
            init_latent = self.encode(init_images.to(self.device), generators)
        latents = sample(
            self.denoiser, self.schedule, (n, self.latent_channels, size, size),
            cond=cond, uncond=uncond, prediction_type=self.prediction_type, generators=generators,
            init_latent=init_latent, strength=strength, progress=progress, device=self.device,
            **settings.sample_kwargs(),
        )
        return self.decode(latents).clamp(-1, 1)


def posterior_sample(mean: Tensor, std: Tensor, generators: list[torch.Generator] | None) -> Tensor:
    """mean + std * eps with row i of eps from generators[i] (the global RNG without generators)."""
    return mean + std * randn_per_sample(mean.shape, generators, mean.device, mean.dtype)

