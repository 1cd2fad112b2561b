"""Turn raw shard samples into training tensors: decode, resize, crop, flip, collate.

Random crops and flips are drawn from a generator seeded by (seed, epoch, sample key), not from a running
stream, so a sample gets the same augmentation whether the run went straight or resumed mid-epoch.
"""
from __future__ import annotations

import io
import random

import numpy as np
import torch
from PIL import Image

from ldm.utils.images import to_rgb

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")


class CorruptSample(ValueError):
    """A sample that cannot be used (missing field, undecodable bytes, a class outside the model's range);
    the loader skips and counts it."""


class ImageTransform:
    """Shorter side to ``resolution`` (antialiased), then a square crop (random or centred), optional flip."""

    def __init__(self, resolution: int, random_crop: bool, random_flip: bool) -> None:
        if resolution < 1:
            raise ValueError(f"resolution must be positive, got {resolution}")
        self.resolution = resolution
        self.random_crop = random_crop
        self.random_flip = random_flip

    def __call__(self, image: Image.Image, rng: random.Random) -> torch.Tensor:
        """(3, R, R) uint8: a quarter of float32's bytes to ship from the workers (``to_unit_range`` follows)."""
        width, height = image.size
        scale = self.resolution / min(width, height)
        size = (max(self.resolution, round(width * scale)), max(self.resolution, round(height * scale)))
        if size != image.size:
            image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=None)
        left, top = self._crop_origin(size, rng)
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        if self.random_flip and rng.random() < 0.5:
            pixels = pixels.flip(-1)
        return pixels

    def _crop_origin(self, size: tuple[int, int], rng: random.Random) -> tuple[int, int]:
        spare_x, spare_y = size[0] - self.resolution, size[1] - self.resolution
        if self.random_crop:
            return rng.randint(0, spare_x), rng.randint(0, spare_y)
        return spare_x // 2, spare_y // 2


def decode_sample(raw: dict, transform: ImageTransform, seed: int, epoch: int, num_classes: int | None = None) -> dict:
    """One batch row (``image``, ``caption``, ``class_label``, ``key``) from an undecoded sample.

    A sample needs an image and a label: a ``.txt`` caption or a ``.cls`` class (the other one defaults to
    ``""`` / ``-1``); with ``num_classes`` (a class-conditional model) the class is required and must lie in
    [0, num_classes). Anything else raises ``CorruptSample``, so the loader skips and counts it rather than a
    model failing on it steps later.
    """
    key = raw.get("__key__", "?")
    image_bytes = next((raw[ext] for ext in IMAGE_EXTENSIONS if ext in raw), None)
    if image_bytes is None:
        raise CorruptSample(f"sample {key!r} has no image (.png/.jpg/.jpeg/.webp) in {raw.get('__url__')}")
    if "txt" not in raw and "cls" not in raw:
        raise CorruptSample(f"sample {key!r} has neither a caption (.txt) nor a class (.cls)")
    caption, class_label = decode_caption(raw), decode_class_label(raw, num_classes)
    try:
        with Image.open(io.BytesIO(image_bytes)) as opened:
            image = to_rgb(opened)  # forces the full decode: truncated data fails here
    except (OSError, ValueError, Image.DecompressionBombError) as exn:
        raise CorruptSample(f"sample {key!r} in {raw.get('__url__')}: the image cannot be decoded: {exn}") from exn
    rng = random.Random(f"{seed}/{epoch}/{key}")  # str seeds hash with SHA-512: the same in every process
    return {"image": transform(image, rng), "caption": caption, "class_label": class_label, "key": key}


def decode_caption(raw: dict) -> str:
    """The ``.txt`` caption as text (``""`` without one); bytes that are not UTF-8 raise ``CorruptSample``."""
    if "txt" not in raw:
        return ""
    try:
        return raw["txt"].decode("utf-8").strip()
    except UnicodeDecodeError as exn:
        raise CorruptSample(f"sample {raw.get('__key__', '?')!r} in {raw.get('__url__')}: the caption (.txt) is "
                            f"not UTF-8 text: {exn}") from exn


def decode_class_label(raw: dict, num_classes: int | None) -> int:
    """The ``.cls`` class index (``-1``: none). Not an integer, below -1, or, when ``num_classes`` is given,
    missing or outside [0, num_classes): ``CorruptSample``."""
    where = f"sample {raw.get('__key__', '?')!r} in {raw.get('__url__')}"
    if "cls" not in raw:
        if num_classes is not None:
            raise CorruptSample(f"{where} has no class (.cls), but the model is class-conditional "
                                f"({num_classes} classes)")
        return -1
    try:
        label = int(raw["cls"].decode("utf-8").strip())
    except ValueError as exn:  # also UnicodeDecodeError
        raise CorruptSample(f"{where}: the class (.cls) is not an integer: {raw['cls'][:20]!r}") from exn
    valid = label >= -1 if num_classes is None else 0 <= label < num_classes
    if not valid:
        expected = "an index >= 0 (-1: none)" if num_classes is None else f"in [0, {num_classes})"
        raise CorruptSample(f"{where}: class {label} is not {expected}")
    return label


def to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1]."""
    return pixels.float().div_(127.5).sub_(1.0)


def collate(rows: list[dict], num_skipped: int) -> dict:
    """Stack rows into the batch of docs/architecture.md, plus ``num_skipped`` (corrupt samples dropped).

    Tensor fields are stacked, int fields (``class_label``) become an int64 tensor, the rest (``caption``,
    ``key``) stay lists: the same rule serves image rows and cached-latent rows."""
    batch: dict = {}
    for name in rows[0]:
        values = [row[name] for row in rows]
        if isinstance(values[0], torch.Tensor):
            batch[name] = torch.stack(values)
        elif isinstance(values[0], int):
            batch[name] = torch.tensor(values, dtype=torch.int64)
        else:
            batch[name] = values
    batch["num_skipped"] = num_skipped
    return batch
