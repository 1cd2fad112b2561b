"""Our shareable format: one `.safetensors` file with the (EMA) weights and the resolved config.

Nothing but tensors and a JSON string: no optimizer state, no pickled objects, so it is small
and safe to share, and `load_exported` rebuilds the model from the file alone. The config is made
self-contained on the way out: the first stage and a pretrained text encoder are stored as
weights, so the loader never needs `first_stage_ckpt` or a download.
"""
from __future__ import annotations

import json
from contextlib import nullcontext
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ldm.loading.state_dicts import load_exact
from ldm.models.latent_diffusion import LatentDiffusion
from ldm.utils.config import to_container
from ldm.utils.files import safetensors_metadata

CONFIG_METADATA_KEY = "ldm_config"
WEIGHT_SOURCES = ("pretrained", "checkpoint_path")  # conditioner options that point at weights elsewhere


def save_exported(model, path: str, use_ema: bool = True) -> dict[str, Any]:
    """Write `model` (a LatentDiffusion) to `path`; returns the config stored with it.
    `use_ema`: store the EMA weights as the model's weights (what one samples with)."""
    state = {key: value.detach().contiguous().clone() for key, value in model_weights(model, use_ema).items()}
    config = exported_config(model, has_conditioner_weights=any(k.startswith("conditioner.") for k in state))
    save_file(state, path, metadata={"format": "pt", CONFIG_METADATA_KEY: json.dumps(config)})
    return config


def load_exported(path: str):
    """The LatentDiffusion stored by `save_exported` (or `python -m ldm.cli.export format=safetensors`),
    in eval mode, without an EMA copy (its weights already are the exported ones)."""
    config = read_exported_config(path)
    if config is None:
        raise ValueError(
            f"{path} is not an ldm export (no '{CONFIG_METADATA_KEY}' metadata). Write one with "
            "`python -m ldm.cli.export ckpt=PATH format=safetensors out=FILE.safetensors`; CompVis / SD files load "
            "with ldm.loading.load_sd_checkpoint."
        )
    model = LatentDiffusion(**{**config, "ema_decay": 0.0})
    load_exact(model, load_file(path), path)
    return model.eval()


def read_exported_config(path: str) -> dict[str, Any] | None:
    """The config stored in an export, or None for any other file."""
    if not str(path).endswith(".safetensors"):
        return None
    text = safetensors_metadata(path).get(CONFIG_METADATA_KEY)
    return json.loads(text) if text is not None else None


def model_weights(model, use_ema: bool) -> dict[str, torch.Tensor]:
    """The model's state dict without the EMA buffers; with `use_ema`, the EMA weights in their place."""
    if use_ema and model.ema is None:
        raise ValueError("This model has no EMA weights (trained with ema_decay=0): export with use_ema=false.")
    with model.ema_weights() if use_ema else nullcontext():
        return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("ema.")}


def exported_config(model, has_conditioner_weights: bool) -> dict[str, Any]:
    """The model's hyperparameters as plain JSON-able data, pointing at no other file."""
    config = json.loads(json.dumps(dict(model.hparams), default=to_container))  # DictConfig values -> plain
    config["first_stage_ckpt"] = None  # the first stage travels as weights, with its config in `first_stage`
    config["scale_factor"] = float(model.scale_factor)
    if has_conditioner_weights:
        config["conditioner"] = without_weight_sources(config["conditioner"])
    return config


def without_weight_sources(conditioner: dict[str, Any]) -> dict[str, Any]:
    """A conditioner config that builds weight-less, for when its weights come with the model's (a Composite's
    parts too)."""
    cleared = {k: (None if k in WEIGHT_SOURCES else v) for k, v in conditioner.items()}
    if isinstance(cleared.get("parts"), dict):
        cleared["parts"] = {name: without_weight_sources(part) if isinstance(part, dict) else part
                            for name, part in cleared["parts"].items()}
    return cleared
