"""Image grids on disk and in experiment loggers, shared by both training stages."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.loggers import WandbLogger
from torch import Tensor
from torchvision.utils import make_grid, save_image


def save_image_grid(images: Tensor, path: str | Path, nrow: int) -> Path:
    """Tile (B, C, H, W) images in [-1, 1] into rows of `nrow` and write them as a PNG."""
    if images.ndim != 4:
        raise ValueError(f"expected a (B, C, H, W) batch of images, got shape {tuple(images.shape)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(signed_to_unit(images), path, nrow=nrow, format="png")
    return path


def log_image_grid(
    trainer: pl.Trainer,
    key: str,
    path_or_tensor: str | Path | Tensor,
    step: int,
    caption: str | None = None,
) -> None:
    """Send an image to every attached logger that takes images (today: wandb); skip the others.

    A tensor is an image (C, H, W) or a batch (B, C, H, W) in [-1, 1]; a batch is tiled 8 per row.
    """
    image = path_or_tensor
    if isinstance(image, Tensor):
        batch = image if image.ndim == 4 else image.unsqueeze(0)
        image = make_grid(signed_to_unit(batch), nrow=8)
    elif not Path(image).is_file():
        raise FileNotFoundError(f"no image to log at {image}")
    else:
        image = str(image)
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            extra = {"caption": [caption]} if caption is not None else {}
            logger.log_image(key=key, images=[image], step=step, **extra)


def signed_to_unit(images: Tensor) -> Tensor:
    """[-1, 1] model space -> [0, 1] display space, on the CPU in float32."""
    return ((images.detach().float().cpu() + 1.0) / 2.0).clamp(0.0, 1.0)


def interleave(first: Tensor, second: Tensor) -> Tensor:
    """(B, ...) and (B, ...) -> (2B, ...) as first[0], second[0], first[1], ...: with nrow=2
    this makes a grid whose left column is `first` and right column is `second`."""
    return torch.stack([first, second], dim=1).flatten(0, 1)


def images_to_uint8(images: Tensor) -> Tensor:
    """Quantise float images in [-1, 1] to uint8 [0, 255], as saving them to PNG would (clean-fid)."""
    return ((images.detach().float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # how PIL opens 16-bit grayscale (PNG, TIFF)


def to_rgb(image: Image.Image) -> Image.Image:
    """An opened image as 8-bit RGB, whatever its mode, with 16-bit grayscale *scaled* to 8 bits.

    PIL's ``convert("RGB")`` clips 16-bit values (``I;16``, and ``I`` as 16-bit PNGs open) at 255, so a
    16-bit photo turns almost white; here v -> round(v * 255 / 65535) instead. Forces the full decode, so
    truncated data fails here (OSError)."""
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        gray = np.clip(np.rint(values * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    return image.convert("RGB")
