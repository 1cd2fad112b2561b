"""Turn raw shard samples into training tensors: decode, resize, crop, flip, collate.

Random crops and flips are drawn from a generator seeded by (seed, epoch, sample key), not from a running
stream, so a sample gets the same augmentation whether the run went straight or resumed mid-epoch. A semantic
map takes the image's crop and flip (nearest resampling); degradations (ldm/data/degradations.py) are computed
from the cropped image.
"""
from __future__ import annotations

import io
import random

import numpy as np
import torch
from PIL import Image

from ldm.data.degradations import Degradation, degrade
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
        """(3, R, R) uint8: a quarter of float32's bytes to ship from the workers (``uint8_to_signed`` follows)."""
        return self.with_map(image, None, rng)[0]

    def with_map(self, image: Image.Image, labels: Image.Image | None,
                 rng: random.Random) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The image as ``__call__`` and a same-sized label map ("L") with the same resize (nearest), crop and
        flip: uint8 (1, R, R), or None without one."""
        width, height = image.size
        scale = self.resolution / min(width, height)
        size = (max(self.resolution, round(width * scale)), max(self.resolution, round(height * scale)))
        left, top = self._crop_origin(size, rng)
        box = (left, top, left + self.resolution, top + self.resolution)
        flip = self.random_flip and rng.random() < 0.5
        outputs = []
        for picture, resample in ((image, Image.Resampling.BICUBIC), (labels, Image.Resampling.NEAREST)):
            if picture is None:
                outputs.append(None)
                continue
            if size != picture.size:
                picture = picture.resize(size, resample, reducing_gap=None)
            array = np.asarray(picture.crop(box), dtype=np.uint8)
            pixels = torch.from_numpy(array.copy()).reshape(*array.shape[:2], -1).permute(2, 0, 1)
            outputs.append(pixels.flip(-1) if flip else pixels)
        return outputs[0], outputs[1]

    def _crop_origin(self, size: tuple[int, int], rng: random.Random) -> tuple[int, int]:
        spare_x, spare_y = size[0] - self.resolution, size[1] - self.resolution
        if self.random_crop:
            return rng.randint(0, spare_x), rng.randint(0, spare_y)
        return spare_x // 2, spare_y // 2


def decode_sample(raw: dict, transform: ImageTransform, seed: int, epoch: int, num_classes: int | None = None,
                  degradations: dict[str, Degradation] | None = None, semantic_map: bool = False) -> dict:
    """One batch row (``image``, ``caption``, ``class_label``, ``key``) from an undecoded sample, plus
    ``semantic_map`` (from the sample's ``.seg.png``) and the ``degradations``' fields when asked for.

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
    labels = _semantic_map(raw, key, image.size) if semantic_map else None
    rng = random.Random(f"{seed}/{epoch}/{key}")  # str seeds hash with SHA-512: the same in every process
    pixels, labels = transform.with_map(image, labels, rng)
    row = {"image": pixels, "caption": caption, "class_label": class_label, "key": key}
    if labels is not None:
        row["semantic_map"] = labels
    row.update(degrade(pixels, degradations or {}, seed, epoch, key))
    return row


SEMANTIC_MAP_EXTENSION = "seg.png"


def _semantic_map(raw: dict, key: str, size: tuple[int, int]) -> Image.Image:
    """The sample's label map (8-bit grey, one class index per pixel, the image's size)."""
    if SEMANTIC_MAP_EXTENSION not in raw:
        raise CorruptSample(f"sample {key!r} has no semantic map ({key}.{SEMANTIC_MAP_EXTENSION}) but the data "
                            "config asks for one (semantic_map: true)")
    try:
        with Image.open(io.BytesIO(raw[SEMANTIC_MAP_EXTENSION])) as opened:
            if opened.mode not in ("L", "P"):
                raise ValueError(f"mode {opened.mode}, expected 8-bit grey class indices (L)")
            labels = opened.convert("L") if opened.mode == "L" else Image.fromarray(np.asarray(opened))
    except (OSError, ValueError) as exn:
        raise CorruptSample(f"sample {key!r}: semantic map cannot be decoded: {exn}") from exn
    if labels.size != size:
        raise CorruptSample(f"sample {key!r}: semantic map is {labels.size}, its image {size}")
    return labels


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


def uint8_to_signed(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1]."""
    return pixels.float().div_(127.5).sub_(1.0)


def to_model_ranges(batch: dict) -> dict:
    """uint8 fields as the model takes them, in the main process (workers ship uint8): ``image`` and
    ``lowres`` to [-1, 1], ``mask`` to float {0, 1}, ``semantic_map`` to int64 class indices."""
    for name in ("image", "lowres"):
        if name in batch:
            batch[name] = uint8_to_signed(batch[name])
    if "mask" in batch:
        batch["mask"] = batch["mask"].float()
    if "semantic_map" in batch:
        batch["semantic_map"] = batch["semantic_map"].long()
    return batch


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
