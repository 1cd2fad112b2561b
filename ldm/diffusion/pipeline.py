"""Conditions -> images with a latent diffusion model (LDM paper, Sec. 3.3 and Fig. 3): encode the conditions,
run the reverse process in latent space with classifier-free guidance, decode.

The pipeline holds no weights and knows no LightningModule: `LatentDiffusion.generate` hands it the denoiser
(its `forward`, which stacks a `concat` condition on z_t), its `conditioning`, the schedule and the first
stage's encode / decode. Conditions arrive as a batch dict ({"caption": [...], "class_label": ..., "lowres": ...,
"image": ..., "mask": ..., "semantic_map": ...}); `conditioning(batch, drop_mask, latent_size) -> dict` gives the
UNet inputs at the latent size, rows with drop_mask getting the null condition of exactly the parts guidance
drops (`droppable` False: nothing to drop, so no unconditional branch).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch
from torch import Tensor

from ldm.diffusion.consistency import enforce_condition
from ldm.diffusion.samplers import (
    ModelFn,
    StepCallback,
    make_generators,
    randn_per_sample,
    sample,
)
from ldm.diffusion.schedule import NoiseSchedule
from ldm.diffusion.settings import SamplerSettings

Batch = Mapping[str, Any]


class Conditioning(Protocol):
    def __call__(self, batch: Batch, drop_mask: Tensor | None, latent_size: Sequence[int]) -> dict[str, Tensor]: ...


@dataclass(frozen=True)
class LatentPipeline:
    """`denoiser(z_t, t, cond)` is the UNet (concat conditions included); `encode(images, generators)` gives
    scaled latents (one posterior draw per sample from its own generator); `decode(latents)` gives images in
    about [-1, 1]."""

    denoiser: ModelFn
    conditioning: Conditioning
    droppable: bool
    schedule: NoiseSchedule
    encode: Callable[[Tensor, list[torch.Generator] | None], Tensor]
    decode: Callable[[Tensor], Tensor]
    latent_channels: int
    downsampling_factor: int
    prediction_type: str
    device: torch.device
    encode_mode: Callable[[Tensor], Tensor] | None = None  # scaled posterior mode (the known region of inpainting)

    def conditions(self, batch: Batch, n: int, latent_size: tuple[int, int], cfg_scale: float,
                   negative_prompt: str | Sequence[str] | None = None) -> tuple[dict[str, Tensor], dict | None]:
        """The conditional UNet inputs and, when guidance needs them, the unconditional ones (the null
        condition: the same conditioning with every row dropped, i.e. the droppable parts only).

        A `negative_prompt` takes the null condition's place in the unconditional branch: the batch with its
        captions replaced, nothing dropped (the other parts of a composite condition stay as they are, which is
        what dropping the text alone leaves too). Guidance then moves away from the negative prompt:
        out = out(neg) + s (out(prompt) - out(neg)), the Ho & Salimans 2022 eq. 6 form with c_neg for the null
        condition (the empty prompt, the default, is the text models' null condition)."""
        cond = self.conditioning(batch, None, latent_size)
        if negative_prompt is not None:
            if "caption" not in batch:
                raise ValueError("negative_prompt applies to text-conditioned models only (this model's conditions "
                                 f"are {sorted(batch) or 'none'}): drop negative_prompt.")
            if cfg_scale == 1.0:
                raise ValueError("negative_prompt needs classifier-free guidance: with sampling.cfg_scale=1 the "
                                 "unconditional branch it replaces is not evaluated. Set sampling.cfg_scale > 1.")
            negatives = [negative_prompt] * n if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negatives) != n:
                raise ValueError(f"negative_prompt: got {len(negatives)} prompts for {n} samples (one, or one each).")
            return cond, self.conditioning({**batch, "caption": negatives}, None, latent_size)
        if cfg_scale == 1.0 or not self.droppable:
            return cond, None
        drop = torch.ones(n, dtype=torch.bool, device=self.device)
        return cond, self.conditioning(batch, drop, latent_size)

    def latent_size(self, image_size: int | Sequence[int]) -> tuple[int, int]:
        """(h, w) of the latent for an image of `image_size` (a side, or (height, width)): each a multiple of
        the first stage's factor f, since the autoencoder maps f x f pixels to one latent position."""
        height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        f = self.downsampling_factor
        for name, value in (("height", height), ("width", width)):
            if value < f or value % f:
                raise ValueError(f"{name}={value} must be a positive multiple of the first stage's factor f={f} "
                                 f"(e.g. {max(f, round(value / f) * f)}).")
        return height // f, width // f

    @torch.no_grad()
    def __call__(
        self,
        conditions: Batch,
        num_samples: int | None,
        settings: SamplerSettings,
        *,
        image_size: int | Sequence[int],
        seed_offset: int = 0,
        init_images: Tensor | None = None,
        strength: float = 1.0,
        progress: bool = False,
        negative_prompt: str | Sequence[str] | None = None,
        callback: StepCallback | None = None,
    ) -> Tensor:
        """Images in [-1, 1], one per row of the `conditions` batch (or `num_samples` for unconditional
        models), of `image_size` (a side, or (height, width)). Sample i draws every random number (img2img
        posterior draw, initial noise, sampler noise) from a CPU generator seeded `settings.seed + seed_offset
        + i`, so it does not depend on the batch or the device. `callback(i, t, z)` sees every step."""
        batch = {key: value.to(self.device) if isinstance(value, Tensor) else value
                 for key, value in conditions.items()}
        n = batch_length(batch) or num_samples
        if n is None:
            raise ValueError("generate() needs `conditions` (prompts or class labels) or `num_samples`.")
        size = self.latent_size(image_size)
        cond, uncond = self.conditions(batch, n, size, settings.cfg_scale, negative_prompt)
        generators = make_generators(settings.seed + seed_offset, n)
        init_latent = None
        if init_images is not None:
            init_latent = self.encode(init_images.to(self.device), generators)
        latents = sample(
            self.denoiser, self.schedule, (n, self.latent_channels, *size),
            cond=cond, uncond=uncond, prediction_type=self.prediction_type, generators=generators,
            init_latent=init_latent, strength=strength, progress=progress, callback=callback, device=self.device,
            known=self.known_region(batch) if settings.keep_known else None, **settings.sample_kwargs(),
        )
        images = self.decode(latents).clamp(-1, 1)
        return enforce_condition(images, batch) if settings.pixel_consistency else images

    def known_region(self, batch: Batch) -> tuple[Tensor, Tensor] | None:
        """For an inpainting batch ("image" and "mask", 1 = fill): the latent of the masked image (posterior mode,
        as the inpainting conditioner encodes it, so nothing under the mask leaks in) and the cells to keep, those
        none of whose f x f pixels is masked. None for every other batch."""
        if self.encode_mode is None or batch.get("mask") is None or batch.get("image") is None:
            return None
        mask = batch["mask"].float()
        latent = self.encode_mode(batch["image"] * (1 - mask))
        keep = 1.0 - torch.nn.functional.max_pool2d(mask, self.downsampling_factor)
        return latent, keep.to(latent.dtype)


def posterior_sample(mean: Tensor, std: Tensor, generators: list[torch.Generator] | None) -> Tensor:
    """mean + std * eps with row i of eps from generators[i] (the global RNG without generators)."""
    return mean + std * randn_per_sample(mean.shape, generators, mean.device, mean.dtype)


def batch_length(batch: Batch) -> int | None:
    """Rows of a conditions batch (None when it holds no condition)."""
    for value in batch.values():
        if value is not None:
            return len(value)
    return None
