"""Per-image metrics of the image-conditioned tasks: PSNR and SSIM (super-resolution), PSNR / L1 inside or
outside a mask (inpainting), and, on the built-in shapes data, the per-pixel agreement of an image with its
semantic map judged by colour (semantic synthesis).

Images are uint8 (B, 3, H, W) or floats in [-1, 1]; every metric is computed on [0, 1] intensities and returned
per image (average them yourself), so the caller decides what a set's number is.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ldm.data.shapes import COLORS, MAX_BACKGROUND_GRAY, SHAPES

SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03  # Wang et al. 2004, Sec. III-C


def to_unit(images: Tensor) -> Tensor:
    """uint8 [0, 255] or float [-1, 1] -> float64 [0, 1]."""
    if images.dtype == torch.uint8:
        return images.double() / 255.0
    return ((images.double() + 1.0) / 2.0).clamp(0.0, 1.0)


def psnr(images: Tensor, references: Tensor, mask: Tensor | None = None) -> Tensor:
    """(B,) PSNR in dB, 10 log10(1 / MSE) on [0, 1]; with `mask` (B, 1, H, W) over the pixels where it is 1
    (all channels). Identical images give +inf."""
    squared = (to_unit(images) - to_unit(references)).pow(2)
    return -10.0 * torch.log10(_masked_mean(squared, mask))


def pooled_psnr(images: Tensor, references: Tensor, mask: Tensor | None = None) -> float:
    """PSNR of one MSE over the (masked) pixels of *all* images. Unlike the mean of per-image PSNRs it stays finite
    and comparable when some images are reproduced exactly (a median fill of a flat background gives +inf on
    every mask that misses the object)."""
    squared = (to_unit(images) - to_unit(references)).pow(2)
    side_by_side = _side_by_side(squared)  # the batch as one image: one masked mean over every pixel
    return float(-10.0 * torch.log10(_masked_mean(side_by_side, None if mask is None else _side_by_side(mask))))


def _side_by_side(images: Tensor) -> Tensor:
    """(B, C, H, W) -> (1, C, H, B * W): the images next to each other."""
    return images.permute(1, 2, 0, 3).reshape(1, images.shape[1], images.shape[2], -1)


def l1(images: Tensor, references: Tensor, mask: Tensor | None = None) -> Tensor:
    """(B,) mean absolute error on [0, 1], over the pixels where `mask` is 1 if given."""
    return _masked_mean((to_unit(images) - to_unit(references)).abs(), mask)


def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return values.flatten(1).mean(1)
    weights = mask.double().expand_as(values)
    total = weights.flatten(1).sum(1)
    if bool((total == 0).any()):
        raise ValueError("a masked metric got an image whose mask selects no pixel.")
    return (values * weights).flatten(1).sum(1) / total


def ssim(images: Tensor, references: Tensor) -> Tensor:
    """(B,) mean structural similarity (Wang et al. 2004, Eq. 13) with an 11x11 Gaussian window of sigma 1.5,
    C1 = (0.01)^2, C2 = (0.03)^2 on [0, 1] intensities, averaged over channels and the valid window positions."""
    x, y = to_unit(images), to_unit(references)
    if min(x.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} px, got {tuple(x.shape[-2:])}.")
    coords = torch.arange(SSIM_WINDOW, dtype=torch.float64) - (SSIM_WINDOW - 1) / 2
    gauss = torch.exp(-coords.pow(2) / (2 * SSIM_SIGMA**2))
    gauss = gauss / gauss.sum()
    channels = x.shape[1]
    window = (gauss[:, None] * gauss[None, :]).expand(channels, 1, SSIM_WINDOW, SSIM_WINDOW).contiguous()

    def blur(values: Tensor) -> Tensor:
        return F.conv2d(values, window, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x.pow(2)
    var_y = blur(y * y) - mu_y.pow(2)
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x.pow(2) + mu_y.pow(2) + c1) * (var_x + var_y + c2))
    return index.flatten(1).mean(1)


# ---------------------------------------------------------------- semantic maps of the shapes data
SHAPES_SEMANTIC_CLASSES = len(COLORS) * len(SHAPES) + 1


def shapes_colour_labels(images: Tensor) -> Tensor:
    """(B, H, W) colour judged per pixel: 0 for background (a dark grey, as shapes draws it), c + 1 for the
    nearest of the shapes colours c. A pixel is background when a grey of level <= MAX_BACKGROUND_GRAY is
    nearer than every object colour."""
    pixels = to_unit(images).permute(0, 2, 3, 1) * 255.0  # (B, H, W, 3)
    palette = torch.tensor(list(COLORS.values()), dtype=torch.float64)
    to_colours = (pixels[..., None, :] - palette).pow(2).sum(-1)  # (B, H, W, 7)
    grey = pixels.mean(-1, keepdim=True).clamp(0, MAX_BACKGROUND_GRAY)
    to_background = (pixels - grey).pow(2).sum(-1, keepdim=True)
    return torch.cat([to_background, to_colours], dim=-1).argmin(-1)


def semantic_colour_agreement(images: Tensor, semantic_maps: Tensor) -> dict[str, Tensor]:
    """Per image: the fraction of pixels whose judged colour (`shapes_colour_labels`) is the colour the map asks
    for (background for class 0, else the colour of class c - 1 = colour x 3 + shape), over all pixels
    (`agreement`) and over the object pixels only (`object_agreement`, NaN without any)."""
    labels = semantic_maps[:, 0] if semantic_maps.ndim == 4 else semantic_maps
    if bool((labels >= SHAPES_SEMANTIC_CLASSES).any()) or bool((labels < 0).any()):
        raise ValueError(f"semantic maps of the shapes data hold classes 0 .. {SHAPES_SEMANTIC_CLASSES - 1}.")
    wanted = torch.where(labels > 0, (labels - 1) // len(SHAPES) + 1, torch.zeros_like(labels))
    hits = (shapes_colour_labels(images) == wanted.to(images.device)).double()
    objects = (labels > 0).double()
    object_pixels = objects.flatten(1).sum(1)
    object_hits = (hits * objects).flatten(1).sum(1) / object_pixels.clamp(min=1)
    return {"agreement": hits.flatten(1).mean(1),
            "object_agreement": torch.where(object_pixels > 0, object_hits, torch.full_like(object_hits, float("nan")))}
