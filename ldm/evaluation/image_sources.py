"""Where evaluation images come from: a folder of image files, or the val split of a data module.

Both sources offer the same small interface: `identity()` (what keys the reference-statistics cache),
`batches(batch_size, size, limit)` (uint8 (B, 3, H, W)), `captions(limit)` (prompts for text models and
prompt fidelity), `is_shapes` (the built-in shapes data: its classifier is the default extractor),
`split` and `resolution`.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterator, Mapping, Sequence

import hydra
import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm.metrics import images_to_uint8, resize_uint8

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Data-loader settings change how fast images arrive, never which: they stay out of the cache identity.
LOADER_KEYS = ("batch_size", "val_batch_size", "num_workers", "pin_memory", "persistent_workers", "prefetch_factor",
               "degradations", "semantic_map")  # the last two add condition fields; the images stay the same


def reference_images(data: Any = None, real_dir: str | None = None) -> ImageSource:
    """`real_dir` as a folder, else the val split of `data`: a data config (instantiated here; it also
    names the cache entry) or an already built data module."""
    if real_dir:
        return ImageFolder(real_dir, "real_dir")
    if data is None:
        raise ValueError("no reference images: pass real_dir=DIR or a data config (data=shapes).")
    if isinstance(data, pl.LightningDataModule):
        return DataSplitImages(data, datamodule_identity(data))
    return DataSplitImages(hydra.utils.instantiate(data), data_identity(data))


class ImageFolder:
    """Images under a folder. A folder `sample.py` / `evaluate.py` wrote holds the images its `samples.json`
    lists (not `grid.png`), captioned by their prompts; any other folder holds every image below it (sorted
    by path), captioned by a `<name>.txt` beside each image where there is one (the img2dataset layout)."""

    is_shapes, resolution, split = False, None, "folder"

    def __init__(self, path: str, option: str = "fake_dir") -> None:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{option}={path!r} is not a directory; pass a folder of images.")
        self.path = os.path.abspath(path)
        records_path = os.path.join(self.path, "samples.json")
        self._prompts: dict[str, str] | None = None
        if os.path.isfile(records_path):
            with open(records_path) as handle:
                self._prompts = {record["file"]: record.get("prompt") or "" for record in json.load(handle)}
            self.files = list(self._prompts)
        else:
            self.files = sorted(
                os.path.relpath(os.path.join(root, name), self.path)
                for root, _, names in os.walk(self.path) for name in names if name.lower().endswith(IMAGE_SUFFIXES)
            )
        if not self.files:
            raise ValueError(f"{option}={path!r} holds no images ({', '.join(IMAGE_SUFFIXES)}); check the path.")

    def identity(self) -> dict[str, Any]:
        """Path, file names, sizes and modification times: editing the folder is a cache miss."""
        digest = hashlib.sha256()
        for name in self.files:
            status = os.stat(os.path.join(self.path, name))
            digest.update(f"{name}\0{status.st_size}\0{status.st_mtime_ns}\n".encode())
        return {"folder": self.path, "num_files": len(self.files), "digest": digest.hexdigest()[:20]}

    def batches(self, batch_size: int, size: int | None = None, limit: int | None = None) -> Iterator[torch.Tensor]:
        """uint8 (B, 3, H, W) batches; `size` resizes each image (PIL bicubic, as the extractors do)
        so that folders of mixed sizes batch."""
        files = self.files[:limit]
        for start in range(0, len(files), batch_size):
            arrays = [_read_rgb(os.path.join(self.path, name), size) for name in files[start:start + batch_size]]
            if len({array.shape for array in arrays}) > 1:
                raise ValueError(f"images in {self.path} differ in size; pass a size to resize them to.")
            yield torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()

    def condition_rows(self, keys: Sequence[str], limit: int | None = None) -> list[dict[str, Any]]:
        raise ValueError(f"the reference folder {self.path} holds images only, no {', '.join(keys)}: an "
                         "image-conditioned model is evaluated on a data config's val split, whose loader computes "
                         "its conditions (data.degradations / data.semantic_map).")

    def captions(self, limit: int | None = None) -> list[str]:
        """One caption per image ("" where none is known)."""
        files = self.files[:limit]
        if self._prompts is not None:
            return [self._prompts[name] for name in files]
        return [_read_text(os.path.join(self.path, os.path.splitext(name)[0] + ".txt")) for name in files]


class DataSplitImages:
    """The val split of a data module (batches with `image` in [-1, 1] and `caption`).

    `identity` names the data for the statistics cache (e.g. the data config, see `data_identity`);
    `prepare=True` runs `prepare_data()` and `setup()` before the first read (a trainer has done it)."""

    split = "val"

    def __init__(self, datamodule: Any, identity: Any, prepare: bool = True) -> None:
        self.datamodule, self._identity, self._prepare = datamodule, identity, prepare
        self.is_shapes = type(datamodule).__name__ == "ShapesDataModule"
        self.resolution = identity.get("resolution") if isinstance(identity, Mapping) else None

    def identity(self) -> Any:
        return self._identity

    def batches(self, batch_size: int, size: int | None = None, limit: int | None = None) -> Iterator[torch.Tensor]:
        """uint8 batches of the split in loader order (the loader's own batch size)."""
        for batch in self._limited(limit):
            images = images_to_uint8(batch["image"])
            yield resize_uint8(images, size) if size else images

    def captions(self, limit: int | None = None) -> list[str]:
        return [caption for batch in self._limited(limit) for caption in batch["caption"]][:limit]

    def condition_rows(self, keys: Sequence[str], limit: int | None = None) -> list[dict[str, Any]]:
        """The first `limit` val samples' condition entries (`keys`, e.g. lowres, mask, caption), one dict per
        sample, tensors on the CPU: the conditions an image-conditioned model is evaluated on."""
        rows = []
        for batch in self._limited(limit, keys):
            missing = [key for key in keys if key not in batch]
            if missing:
                raise ValueError(f"the val split has no {missing[0]!r} for this image-conditioned model: give the data "
                                 "config the field (data.degradations.lowres / .mask, data.semantic_map=true) as in "
                                 "training.")
            values = {key: batch[key].cpu() if isinstance(batch[key], torch.Tensor) else list(batch[key])
                      for key in keys}
            rows += [{key: value[i] for key, value in values.items()} for i in range(len(batch["image"]))]
        return rows

    def _limited(self, limit: int | None, keys: Sequence[str] = ()) -> Iterator[dict[str, Any]]:
        if self._prepare:  # once: shards are written (shapes) or checked before the first read
            self.datamodule.prepare_data()
            self.datamodule.setup("validate")
            self._prepare = False
        seen = 0
        for batch in self.datamodule.val_dataloader():
            keep = len(batch["image"]) if limit is None else min(len(batch["image"]), limit - seen)
            yield {key: batch[key][:keep] if isinstance(batch[key], torch.Tensor) else list(batch[key])[:keep]
                   for key in {"image", "caption", *keys} if key in batch}
            seen += keep
            if limit is not None and seen >= limit:
                return


ImageSource = ImageFolder | DataSplitImages


def data_identity(data_config: Any) -> Any:
    """A data config as a plain, JSON-able cache identity, without its loader-only settings."""
    container = OmegaConf.to_container(data_config, resolve=True) if OmegaConf.is_config(data_config) else data_config
    if isinstance(container, Mapping):
        return {key: value for key, value in container.items() if key not in LOADER_KEYS}
    return container


def datamodule_identity(datamodule: pl.LightningDataModule) -> dict[str, Any]:
    """A built data module's cache identity: its class and saved hyperparameters, or else its public
    plain-valued attributes (URLs, resolution, seed, ...), so another data set is never a stale hit."""
    plain = (str, int, float, bool, type(None), list, tuple, dict)
    values = dict(datamodule.hparams) or {
        key: value for key, value in vars(datamodule).items() if not key.startswith("_") and isinstance(value, plain)}
    return {"datamodule": f"{type(datamodule).__module__}.{type(datamodule).__qualname__}", **data_identity(values)}


def _read_rgb(path: str, size: int | None) -> np.ndarray:
    with Image.open(path) as image:
        image = image.convert("RGB")
        if size is not None and image.size != (size, size):
            image = image.resize((size, size), Image.BICUBIC)
        return np.asarray(image)


def _read_text(path: str) -> str:
    """The caption file's text, "" where there is none."""
    if not os.path.isfile(path):
        return ""
    with open(path) as handle:
        return handle.read().strip()
