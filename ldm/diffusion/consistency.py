"""Pixel consistency: make a decoded sample agree with what its condition fixes exactly.

A latent model cannot reproduce the pixels its condition already determines: whatever it generates passes through
the decoder, so the known region of an inpainting sample, or the low frequencies of a super-resolved one, come out
at best at the autoencoder's reconstruction quality (`python evaluate.py task=...` reports that ceiling). Both
conditions are measurements of the image, so the sample can be projected back onto the set of images that explain
them, in pixel space, after decoding:

- inpainting (`image`, `mask` with 1 = fill): the known pixels are pasted back, x <- m x + (1 - m) y, as CompVis'
  `scripts/inpaint.py` composites its output;
- super-resolution (`lowres`): iterative back-projection (Irani & Peleg 1991), x <- x + U(y - D(x)), with D the
  degradation's antialiased bicubic downsampling to the low-res size and U bicubic upsampling back. Each iteration
  moves D(x) towards y (D(U(.)) is close to the identity); `BACK_PROJECTION_ITERATIONS` of them bring the low-res
  error below 1e-3 of the [-1, 1] range while the high frequencies stay the model's. It is exact for plain bicubic
  degradations (the default); with blur, noise or JPEG in `data.degradations.lowres` D is only their bicubic part.

`sampling.pixel_consistency` (default true) applies it in `LatentPipeline`; evaluation reports the model's own
output beside it (`*_raw`).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch.nn.functional as F
from torch import Tensor

BACK_PROJECTION_ITERATIONS = 5


def paste_known(images: Tensor, known: Tensor, mask: Tensor) -> Tensor:
    """`images` with the pixels where `mask` is 0 (known) taken from `known`; all in the same range, mask
    (B, 1, H, W) with 1 = filled by the model."""
    mask = mask.to(images.dtype)
    return mask * images + (1 - mask) * known.to(images.dtype)


def back_project(images: Tensor, lowres: Tensor, iterations: int = BACK_PROJECTION_ITERATIONS) -> Tensor:
    """Iterative back-projection of `images` (B, C, H, W) onto the low-res observation `lowres` (B, C, h, w): the
    result's antialiased bicubic downsampling to (h, w) approaches `lowres` (Irani & Peleg 1991, eq. 2 with the
    bicubic kernel as the back-projection filter)."""
    if images.shape[:2] != lowres.shape[:2] or any(s < l for s, l in zip(images.shape[-2:], lowres.shape[-2:])):
        raise ValueError(f"back_project: images {tuple(images.shape)} cannot be the high-res version of lowres "
                         f"{tuple(lowres.shape)} (same batch and channels, sides at least the low-res ones).")
    size, low_size = images.shape[-2:], lowres.shape[-2:]
    lowres = lowres.to(images.dtype)
    for _ in range(iterations):
        residual = lowres - F.interpolate(images, size=low_size, mode="bicubic", antialias=True, align_corners=False)
        images = images + F.interpolate(residual, size=size, mode="bicubic", align_corners=False)
    return images


def enforce_condition(images: Tensor, batch: Mapping[str, Any]) -> Tensor:
    """Decoded `images` in [-1, 1] made consistent with the batch's pixel conditions (inpainting: `image` and
    `mask`; SR: `lowres`); returned unchanged for every other batch."""
    if batch.get("image") is not None and batch.get("mask") is not None:
        images = paste_known(images, batch["image"], batch["mask"])
    if batch.get("lowres") is not None:
        images = back_project(images, batch["lowres"])
    return images.clamp(-1, 1)
