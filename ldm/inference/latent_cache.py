"""Write a latent cache: encode a shard set once with a frozen first stage (format: ldm/data/latent_cache.py).

    python -m ldm.cli.encode_latents first_stage_ckpt=PATH data=webdataset data.train_urls=... out=DIR
"""
from __future__ import annotations

import copy
import io
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from ldm.data.latent_cache import CACHE_FORMAT, META_FILE, SPLITS, first_stage_identity
from ldm.data.shards import expand_urls, iter_raw_samples, update_sizes, write_shard
from ldm.data.transforms import (
    CorruptSample,
    ImageTransform,
    decode_sample,
    uint8_to_signed,
)
from ldm.data.webdataset import WebDataModule
from ldm.loading.checkpoints import load_first_stage
from ldm.nets.vae import AutoencoderNet

log = logging.getLogger(__name__)


def encode_latents(first_stage_ckpt: str, datamodule: WebDataModule, out: str, batch_size: int = 32,
                   device: str = "cpu", splits: tuple[str, ...] = SPLITS, flip: bool = False) -> dict[str, Any]:
    """Encode the `splits` of `datamodule` (images centre-cropped to its resolution) with the autoencoder of
    `first_stage_ckpt` into `out/<split>/NNNNNN.tar` (one per source shard) and `out/latents.json`;
    `flip`: also each mirrored image's posterior (read by data modules that flip).

    The meta file is written last: a cache without it is incomplete and is refused when read."""
    vae, _ = load_first_stage(first_stage_ckpt)
    return encode_latents_with(vae, datamodule, out, batch_size, device, splits, flip,
                               checkpoint=os.path.abspath(first_stage_ckpt))


def encode_latents_with(vae: AutoencoderNet, datamodule: WebDataModule, out: str, batch_size: int = 32,
                        device: str = "cpu", splits: tuple[str, ...] = SPLITS, flip: bool = False,
                        checkpoint: str | None = None) -> dict[str, Any]:
    """`encode_latents` with an autoencoder in memory (a stage-2 model's own first stage: train.py's
    `cache_latents`); `vae` itself is left where it is (a copy encodes on another device)."""
    unknown = set(splits) - set(SPLITS)
    if unknown:
        raise ValueError(f"splits={list(splits)}: unknown {sorted(unknown)}; choose from {list(SPLITS)}.")
    identity = first_stage_identity(vae, checkpoint)
    on_device = next(vae.parameters()).device == torch.device(device)
    vae = (vae if on_device else copy.deepcopy(vae).to(device)).eval()
    datamodule.prepare_data()
    transform = ImageTransform(datamodule.resolution, random_crop=False, random_flip=False)
    meta: dict[str, Any] = {"format": CACHE_FORMAT, "first_stage": asdict(identity),
                            "resolution": datamodule.resolution, "dtype": "float32", "splits": {},
                            "num_samples": {}, "num_corrupt": {}, "source": {}, "flipped_copies": flip}
    for split in splits:
        urls = datamodule.train_urls if split == "train" else datamodule.val_urls
        if not urls:
            continue
        shard_urls = expand_urls(urls)
        split_dir = os.path.join(out, split)
        os.makedirs(split_dir, exist_ok=True)
        corrupt = {"count": 0}
        counts = {}
        for index, url in enumerate(shard_urls):
            name = f"{index:06d}.tar"
            samples = _encoded_samples(url, vae, transform, batch_size, corrupt, flip)
            counts[name] = write_shard(os.path.join(split_dir, name), samples)
            log.info("%s: %s -> %s/%s (%d samples)", split, url, split, name, counts[name])
        update_sizes(split_dir, counts)
        meta["splits"][split] = f"{split}/{{000000..{len(shard_urls) - 1:06d}}}.tar"
        meta["num_samples"][split] = sum(counts.values())
        meta["num_corrupt"][split] = corrupt["count"]
        meta["source"][split] = urls
    with open(os.path.join(out, META_FILE), "w") as handle:
        json.dump(meta, handle, indent=1)
    return meta


@torch.no_grad()
def _encoded_samples(url: str, vae: AutoencoderNet, transform: ImageTransform, batch_size: int,
                     corrupt: dict[str, int], flip: bool) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, fields) of every readable sample of one shard: posterior mean / std, caption, class."""

    def on_error(reason: object) -> None:
        corrupt["count"] += 1
        log.warning("skipping unreadable data in %s: %s", url, reason)

    rows: list[dict] = []
    for raw in iter_raw_samples([url], on_error=on_error):
        try:
            rows.append(decode_sample(raw, transform, seed=0, epoch=0))  # centre crop: the seed draws nothing
        except CorruptSample as error:
            on_error(error)
        if len(rows) == batch_size:
            yield from _encode_rows(rows, vae, flip)
            rows = []
    if rows:
        yield from _encode_rows(rows, vae, flip)


def _encode_rows(rows: list[dict], vae: AutoencoderNet, flip: bool) -> Iterator[tuple[str, dict[str, bytes]]]:
    device = next(vae.parameters()).device
    images = uint8_to_signed(torch.stack([row["image"] for row in rows])).to(device)
    posterior = vae.encode(images)
    mirrored = vae.encode(images.flip(-1)) if flip else None
    for index, row in enumerate(rows):
        fields = {"mean.npy": _npy_bytes(posterior.mean[index]), "std.npy": _npy_bytes(posterior.std[index]),
                  "txt": row["caption"].encode("utf-8"), "cls": str(row["class_label"]).encode()}
        if mirrored is not None:
            fields |= {"mean_flip.npy": _npy_bytes(mirrored.mean[index]), "std_flip.npy": _npy_bytes(mirrored.std[index])}
        yield row["key"], fields


def _npy_bytes(tensor: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, tensor.float().cpu().numpy(), allow_pickle=False)
    return buffer.getvalue()
