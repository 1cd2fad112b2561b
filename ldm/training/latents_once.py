"""Latents once: stage 2 encodes its (finite, local) shard set with the frozen first stage once, into the latent
cache of ldm/data/latent_cache.py, and trains from it; `cache_latents=false` trains on the images as before.

The first stage is frozen in stage 2 (LDM paper, Sec. 3.2), so its encoding of an image never changes; only the
posterior draw z = mean + std * eps does, and that is still drawn per step from the cached mean / std
(`LatentDiffusion.batch_latents`). The cache lives in `<paths.cache_dir>/latents/<hash>`, the hash naming what
decides its content: the first stage's weights (sha256), the data's shards (the `shapes` arguments, or every
local shard's path, size and modification time), the resolution and whether flipped copies are stored. A second
run reuses it; another autoencoder, data set or resolution gets its own.

What the cache keeps: each image centre-cropped (random crops are given up; for square images at the data
resolution, as `shapes`, the crop is the whole image) and, when the data flips (`data.random_flip=true`), also
the mirrored image's posterior, one of the two read per sample and epoch. Only the train split is cached: the
val split (validation loss, the evaluation callback's reference images) stays on the images, and so does the
data module's type (what `features: auto` reads). Stage 2 stays on the images, saying why, for concat-conditioned
tasks (super-resolution, inpainting, semantic maps: their conditions are computed from each image crop), for
remote shards (encode those deliberately: `python -m ldm.cli.encode_latents`, then `data=latents`) and for data
modules that are not shard sets.

Under DDP the first process of each node encodes into a temporary directory renamed into place (a rename is
atomic: two nodes on a shared disk cannot mix their shards); the other processes wait for `latents.json`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from typing import Any

from omegaconf import DictConfig

from ldm.data.latent_cache import (
    CACHE_FORMAT,
    META_FILE,
    LatentDataModule,
    train_from_cache,
    weights_sha256,
)
from ldm.data.shards import expand_urls, is_local
from ldm.data.webdataset import ShapesDataModule, WebDataModule
from ldm.inference.latent_cache import encode_latents_with
from ldm.models.concat_conditioners import concat_parts
from ldm.models.latent_diffusion import LatentDiffusion
from ldm.utils.devices import resolve_device

log = logging.getLogger(__name__)

WAIT_LOG_SECONDS = 60  # how often a waiting process says it still waits


def why_images(model: Any, datamodule: Any) -> str | None:
    """Why this run cannot train from cached latents (None: it can)."""
    if not isinstance(model, LatentDiffusion):
        return "not a stage-2 model"
    if isinstance(datamodule, LatentDataModule):
        return "data=latents already reads a cache"
    if not isinstance(datamodule, WebDataModule):
        return f"{type(datamodule).__name__} is not a shard set"
    if concat_parts(model.conditioner) or datamodule.degradations or datamodule.semantic_map:
        return "its concat conditions (low-res image, mask, semantic map) are computed from each image crop"
    remote = [url for url in expand_urls(datamodule.train_urls) if not is_local(url)]
    if remote:
        return (f"the train shards are remote (e.g. {remote[0]}): encode them deliberately with `python -m "
                "ldm.cli.encode_latents`, then train with data=latents")
    return None


def cache_identity(model: LatentDiffusion, datamodule: WebDataModule) -> dict[str, Any]:
    """What decides a cache's content. `shapes` is a function of its arguments (its shards may not be written
    yet on a waiting process); other shard sets are named by their files."""
    return {"format": CACHE_FORMAT, "first_stage": weights_sha256(model.first_stage),
            "shards": train_shards_identity(datamodule), "resolution": datamodule.resolution,
            "flipped_copies": bool(datamodule.random_flip)}


def train_shards_identity(datamodule: WebDataModule) -> Any:
    """What names a data module's train shards: the `shapes` arguments, else each shard's path, size and time."""
    if isinstance(datamodule, ShapesDataModule):
        return dict(datamodule.shapes_args)
    return [[url, os.path.getsize(url), os.stat(url).st_mtime_ns] for url in expand_urls(datamodule.train_urls)]


def cache_root(cache_dir: str, identity: dict[str, Any], kind: str = "latents") -> str:
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(cache_dir, kind, digest)


def ensure_latents(cfg: DictConfig, model: Any, datamodule: Any) -> str | None:
    """Point `datamodule`'s train split at the cached latents of its data under `model`'s first stage, encoding
    them first unless an identical cache exists. Returns the cache directory, or None (training reads images)."""
    if not cfg.get("cache_latents", True):
        if isinstance(model, LatentDiffusion):
            log.info("cache_latents=false: stage 2 encodes every training batch with the first stage")
        return None
    reason = why_images(model, datamodule)
    if reason is not None:
        if isinstance(model, LatentDiffusion) and not isinstance(datamodule, LatentDataModule):
            log.info("Stage 2 trains on images, not on cached latents: %s", reason)
        return None
    identity = cache_identity(model, datamodule)
    root = cache_root(cfg.paths.cache_dir, identity)
    meta_path = os.path.join(root, META_FILE)
    if os.path.isfile(meta_path):
        log.info("Training from the cached latents in %s", root)
    elif os.environ.get("LOCAL_RANK", "0") == "0":
        _encode(model, datamodule, root, identity, batch_size=int(cfg.data.get("batch_size", 32)))
    else:
        wait_for(meta_path)
    train_from_cache(datamodule, root, model.first_stage)
    return root


def _encode(model: LatentDiffusion, datamodule: WebDataModule, root: str, identity: dict[str, Any],
            batch_size: int) -> None:
    """Encode into `<root>.tmp-<pid>`, then rename it to `root` (atomic; a concurrent writer's copy wins)."""
    flip = bool(datamodule.random_flip)
    log.info("Encoding the train split once with the frozen first stage into %s (centre crop%s; "
             "cache_latents=false trains on the images instead)", root, ", plus flipped copies" if flip else "")
    start = time.perf_counter()
    tmp = f"{root}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    meta = encode_latents_with(model.first_stage, datamodule, tmp, batch_size=batch_size,
                               device=str(resolve_device("auto")), splits=("train",), flip=flip,
                               checkpoint=model.hparams.get("first_stage_ckpt"))
    with open(os.path.join(tmp, "identity.json"), "w") as handle:
        json.dump(identity, handle, indent=1)
    try:
        os.rename(tmp, root)
    except OSError:  # another process renamed its identical copy first
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("Encoded %d images in %.1f s", meta["num_samples"]["train"], time.perf_counter() - start)


def wait_for(meta_path: str) -> None:
    """Wait for the node's first process to finish the cache."""
    waited = 0.0
    while not os.path.isfile(meta_path):
        time.sleep(1.0)
        waited += 1.0
        if waited % WAIT_LOG_SECONDS == 0:
            log.info("waiting %.0f s for the first process to write %s", waited, meta_path)
