"""`model.conditioner.vocabulary=data`: the from-scratch text encoder's vocabulary, read from the training captions.

Before the model is built, every `vocabulary: data` in the conditioner config (a TextTransformer, alone or inside
a Composite) becomes the sorted token ids of the train split's captions (ldm/models/vocabulary.py), so the
checkpoint's hyperparameters hold the list and the model rebuilds without the data. The list is cached in
`<paths.cache_dir>/vocabulary/<hash>.json`, named by the train shards (as the latent cache) and the tokenizer;
under DDP the first process of each node reads the captions, the others wait for the file.
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Iterator
from typing import Any

from omegaconf import DictConfig, ListConfig

from ldm.data.shards import expand_urls, iter_raw_samples
from ldm.data.transforms import CorruptSample, decode_caption
from ldm.data.webdataset import WebDataModule
from ldm.models.vocabulary import vocabulary_of_captions
from ldm.training.latents_once import cache_root, train_shards_identity, wait_for

log = logging.getLogger(__name__)

FROM_DATA = "data"
DEFAULT_TOKENIZER = "ViT-L-14"  # TextTransformer's default


def data_vocabulary_nodes(node: Any) -> Iterator[DictConfig]:
    """Every config mapping below `node` whose `vocabulary` is `data`."""
    if isinstance(node, DictConfig):
        if node.get("vocabulary") == FROM_DATA:
            yield node
        for value in node.values():
            yield from data_vocabulary_nodes(value)
    elif isinstance(node, ListConfig):
        for value in node:
            yield from data_vocabulary_nodes(value)


def resolve_vocabulary(cfg: DictConfig, datamodule: Any) -> None:
    """Replace each `vocabulary: data` under `cfg.model.conditioner` by the train captions' token ids."""
    nodes = list(data_vocabulary_nodes(cfg.model.get("conditioner")))
    if not nodes:
        return
    if not isinstance(datamodule, WebDataModule):
        raise ValueError(f"model.conditioner.vocabulary=data reads the training captions from shards, but the data "
                         f"module is a {type(datamodule).__name__}: pass model.conditioner.vocabulary=null.")
    for node in nodes:
        ids = cached_vocabulary(cfg.paths.cache_dir, datamodule, node.get("tokenizer", DEFAULT_TOKENIZER))
        node.vocabulary = ids


def cached_vocabulary(cache_dir: str, datamodule: WebDataModule, tokenizer: str) -> list[int]:
    if os.environ.get("LOCAL_RANK", "0") == "0":
        datamodule.prepare_data()  # shapes: written before its captions are read
    identity = {"shards": train_shards_identity(datamodule), "tokenizer": tokenizer}
    path = cache_root(cache_dir, identity, kind="vocabulary") + ".json"
    if not os.path.isfile(path):
        if os.environ.get("LOCAL_RANK", "0") != "0":
            wait_for(path)
        else:
            ids = vocabulary_of_captions(tokenizer, train_captions(datamodule))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(f"{path}.tmp-{os.getpid()}", "w") as handle:
                json.dump({"identity": identity, "ids": ids}, handle)
            os.replace(f"{path}.tmp-{os.getpid()}", path)  # atomic: a reader sees all of it or nothing
    with open(path) as handle:
        ids = json.load(handle)["ids"]
    log.info("Text vocabulary from the training captions: %d token ids + out-of-vocabulary (%s)", len(ids), path)
    return ids


def train_captions(datamodule: WebDataModule) -> Iterator[str]:
    """The captions of the train shards (read, not decoded: images are skipped)."""
    def on_error(reason: object) -> None:
        warnings.warn(f"vocabulary: skipping unreadable data: {reason}", RuntimeWarning, stacklevel=2)

    for raw in iter_raw_samples(expand_urls(datamodule.train_urls), on_error=on_error):
        try:
            yield decode_caption(raw)
        except CorruptSample as error:
            on_error(error)

