"""Cached first-stage latents: the cache format and `LatentDataModule`, which trains stage 2 from it.

Stage 2 freezes the encoder, so encoding every image at every step repeats the same work; at 256 px
the f=8 encoder costs more than a CPU-sized UNet step. `encode_latents` stores each sample's posterior
N(mean, std) (LDM paper, Sec. 3.1: the KL-regularised latent) as `.npy` arrays in tar shards beside its
caption and class, one latent shard per source shard; `LatentDataModule` reads them with the image
DataModule's machinery (same rank / worker split, equal steps per rank, exact resume), and
`LatentDiffusion.batch_latents` draws z = mean + std * eps from them, as encoding would.

    python -m ldm.cli.encode_latents first_stage_ckpt=PATH data=webdataset data.train_urls=... out=DIR
    python train.py experiment=ldm_f8_text data=latents data.root=DIR data.resolution=256 model.first_stage_ckpt=PATH

The cache records which autoencoder made it (sha256 of its weights, factor, latent channels); training
refuses a cache whose autoencoder is not the model's first stage. Images are centre-cropped when encoded:
random-crop augmentation is given up for the speed (for square images at the data resolution, such as
`shapes`, the crop is the whole image and nothing is lost). Flips: `flip=True` also stores each image's mirror
image's posterior (`mean_flip.npy`, `std_flip.npy`: twice the encoding and the disk), and a reader with
`flip=True` picks one of the two per sample and epoch, seeded by (seed, epoch, key) like the image flips.

`train.py` builds and reuses such a cache by itself for stage 2 (`cache_latents`, ldm/training/latents_once.py):
`train_from_cache` points an image data module's train split at it and leaves its val split on the images.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ldm.data.transforms import CorruptSample, decode_caption, decode_class_label
from ldm.data.webdataset import WebDataModule
from ldm.nets.vae import AutoencoderNet

META_FILE = "latents.json"
CACHE_FORMAT = "ldm-latents-v1"
SPLITS = ("train", "val")


@dataclass(frozen=True)
class FirstStageIdentity:
    """Which autoencoder made a latent cache. `weights_sha256` hashes the weights themselves, so the same
    autoencoder read from its stage-1 run, an LDM checkpoint or an export has one identity."""

    weights_sha256: str
    factor: int
    latent_channels: int
    checkpoint: str | None = None  # the file it was read from (for the messages only)

    def describe(self) -> str:
        return (f"{self.checkpoint or '<in memory>'} (f={self.factor}, {self.latent_channels} latent channels, "
                f"weights sha256 {self.weights_sha256[:16]}...)")


def weights_sha256(module: nn.Module) -> str:
    """sha256 over the state dict (sorted names, dtype, shape and bytes of every tensor)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def first_stage_identity(vae: AutoencoderNet, checkpoint: str | None = None) -> FirstStageIdentity:
    return FirstStageIdentity(weights_sha256(vae), vae.downsampling_factor, vae.latent_channels, checkpoint)


# ---------------------------------------------------------------------------------------------- reading
def read_cache_meta(root: str) -> dict[str, Any]:
    path = os.path.join(root, META_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"data.root={root!r} holds no {META_FILE}: not a (complete) latent cache. Make one with "
            "`python -m ldm.cli.encode_latents first_stage_ckpt=PATH data=... out=DIR`.")
    with open(path) as handle:
        meta = json.load(handle)
    if meta.get("format") != CACHE_FORMAT:
        raise ValueError(f"{path} has format {meta.get('format')!r}, expected {CACHE_FORMAT!r}: re-encode it.")
    return meta


def decode_latent_sample(raw: dict, epoch: int = 0, num_classes: int | None = None, seed: int = 0,
                         flip: bool = False) -> dict:
    """One batch row (`latent_mean`, `latent_std`, `caption`, `class_label`, `key`) from a latent shard sample;
    captions and classes are checked as for images (`decode_caption`, `decode_class_label`). `flip`: the
    mirror image's posterior with probability 1/2 where the cache holds one (`encode_latents(..., flip=True)`)."""
    key = raw.get("__key__", "?")
    missing = [field for field in ("mean.npy", "std.npy", "txt", "cls") if field not in raw]
    if missing:
        raise CorruptSample(f"latent sample {key!r} in {raw.get('__url__')} lacks {missing}")
    flipped = flip and "mean_flip.npy" in raw and random.Random(f"{seed}/{epoch}/{key}").random() < 0.5
    fields = ("mean_flip.npy", "std_flip.npy") if flipped else ("mean.npy", "std.npy")
    try:
        mean, std = (torch.from_numpy(np.load(io.BytesIO(raw[f]), allow_pickle=False)) for f in fields)
    except ValueError as error:  # also a pickled array (allow_pickle=False)
        raise CorruptSample(f"latent sample {key!r} in {raw.get('__url__')} cannot be decoded: {error}") from error
    caption, class_label = decode_caption(raw), decode_class_label(raw, num_classes)
    return {"latent_mean": mean, "latent_std": std, "caption": caption, "class_label": class_label, "key": key}


class LatentDataModule(WebDataModule):
    """Batches of cached latents (`latent_mean`, `latent_std`, `caption`, `class_label`, `key`, `num_skipped`)
    from a cache written by `encode_latents`, split over ranks and workers and resumed like the images.

    At setup it checks that the model's first stage is the autoencoder that made the cache."""

    def __init__(self, root: str, resolution: int, batch_size: int = 32, val_batch_size: int | None = None,
                 num_workers: int = 2, shuffle_buffer: int = 1000, resampled: bool = False,
                 samples_per_epoch: int | None = None, seed: int = 0, num_classes: int | None = None) -> None:
        self.meta = read_cache_meta(root)
        if resolution != self.meta["resolution"]:
            raise ValueError(f"data.resolution={resolution}, but the latent cache {root} was encoded from "
                             f"{self.meta['resolution']} px images: pass data.resolution={self.meta['resolution']}.")
        splits = {name: os.path.join(root, pattern) for name, pattern in self.meta["splits"].items()}
        if "train" not in splits:
            raise ValueError(f"the latent cache {root} has no train split (encoded splits: {sorted(splits)}).")
        super().__init__(splits["train"], splits.get("val"), resolution=resolution, batch_size=batch_size,
                         val_batch_size=val_batch_size, num_workers=num_workers, random_flip=False,
                         shuffle_buffer=shuffle_buffer, resampled=resampled, samples_per_epoch=samples_per_epoch,
                         seed=seed, num_classes=num_classes)
        self.root = root
        self.first_stage = FirstStageIdentity(**self.meta["first_stage"])

    def sample_decoder(self, train: bool):
        flip = train and bool(self.meta.get("flipped_copies"))
        return functools.partial(decode_latent_sample, num_classes=self.num_classes, seed=self.seed, flip=flip)

    def setup(self, stage: str) -> None:
        model = self.trainer.lightning_module if self._trainer_or_none() is not None else None
        if model is not None:
            self.check_first_stage(model.first_stage, model.hparams.get("first_stage_ckpt"))

    def check_first_stage(self, vae: AutoencoderNet, checkpoint: str | None = None) -> None:
        check_first_stage(self.root, self.meta, vae, checkpoint)


def check_first_stage(root: str, meta: dict[str, Any], vae: AutoencoderNet, checkpoint: str | None = None) -> None:
    """Refuse to train a model whose first stage is not the autoencoder that made the cache at `root`."""
    cached, configured = FirstStageIdentity(**meta["first_stage"]), first_stage_identity(vae, checkpoint)
    if configured.weights_sha256 == cached.weights_sha256:
        return
    raise ValueError(
        f"The latent cache {root} was made by the autoencoder {cached.describe()}, but this "
        f"model's first stage is {configured.describe()}. Latents of another autoencoder (or factor) are "
        f"meaningless to this model: pass model.first_stage_ckpt={cached.checkpoint}, or re-encode "
        f"with `python -m ldm.cli.encode_latents first_stage_ckpt={checkpoint or 'PATH'} ...`.")


def train_from_cache(datamodule: WebDataModule, root: str, vae: AutoencoderNet) -> dict[str, Any]:
    """Point `datamodule`'s train split at the latent cache `root` (made by `vae`, checked, at its resolution);
    its val split stays on the images. Flipped copies are read when the cache has them and the data flips."""
    meta = read_cache_meta(root)
    check_first_stage(root, meta, vae)
    if meta["resolution"] != datamodule.resolution or "train" not in meta["splits"]:
        raise ValueError(f"the latent cache {root} holds {sorted(meta['splits'])} at {meta['resolution']} px, not "
                         f"the train split at data.resolution={datamodule.resolution}: delete it to re-encode.")
    flip = datamodule.random_flip and bool(meta.get("flipped_copies"))
    decode = functools.partial(decode_latent_sample, num_classes=datamodule.num_classes, seed=datamodule.seed,
                               flip=flip)
    datamodule.read_train_from(os.path.join(root, meta["splits"]["train"]), decode)
    return meta
