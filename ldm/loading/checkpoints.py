"""The one place that builds models from files: our training checkpoints and exports, CompVis / SD files,
and `init_from=` weights. LightningModules open no file themselves, so this layer owns every path and
every refusal (weights-only loading; see ldm/utils/files.py)."""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from ldm.loading.compvis import load_any_first_stage
from ldm.loading.exported import (
    load_exported,
    read_exported_config,
    without_weight_sources,
)
from ldm.loading.init_from import load_weights_into
from ldm.loading.stable_diffusion import load_sd_checkpoint
from ldm.loading.state_dicts import load_exact
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.latent_diffusion import LatentDiffusion
from ldm.nets.vae import AutoencoderNet
from ldm.utils.files import load_checkpoint

log = logging.getLogger(__name__)

# `_target_` paths that checkpoints written before the layer reorganisation store in their hyperparameters.
LEGACY_TARGETS = {
    "ldm.conditioning.TextTransformer": "ldm.models.conditioners.TextTransformer",
    "ldm.conditioning.FrozenOpenCLIP": "ldm.models.conditioners.FrozenOpenCLIP",
    "ldm.conditioning.ClassEmbedder": "ldm.models.conditioners.ClassEmbedder",
    "ldm.conditioning.NullConditioner": "ldm.models.conditioners.NullConditioner",
    "ldm.interop.compvis.MissingConditioner": "ldm.models.conditioners.MissingConditioner",
    "ldm.interop.MissingConditioner": "ldm.models.conditioners.MissingConditioner",
    "ldm.LatentDiffusion": "ldm.models.LatentDiffusion",
    "ldm.AutoencoderKL": "ldm.models.AutoencoderKL",
    "ldm.diffusion.LatentDiffusion": "ldm.models.LatentDiffusion",
    "ldm.autoencoder.AutoencoderKL": "ldm.models.AutoencoderKL",
}


def build_model(config: DictConfig | Mapping[str, Any]) -> AutoencoderKL | LatentDiffusion:
    """The model a `model:` config describes (train.py's `cfg.model`); a LatentDiffusion gets its first stage
    from `first_stage_ckpt` here, so the LightningModule itself never reads a file."""
    container = OmegaConf.to_container(config, resolve=True) if OmegaConf.is_config(config) else dict(config)
    target = upgrade_targets(container).get("_target_")
    if hydra.utils.get_class(target) is LatentDiffusion:
        return build_latent_diffusion({k: v for k, v in container.items() if not k.startswith("_")})
    return hydra.utils.instantiate(container)


def build_latent_diffusion(config: Mapping[str, Any]) -> LatentDiffusion:
    """`LatentDiffusion(**config)`, with `first_stage` (architecture) and the autoencoder's weights read from
    `first_stage_ckpt` when the config has no `first_stage` of its own."""
    config = upgrade_targets(dict(config))
    if config.get("first_stage"):
        return LatentDiffusion(**config)
    vae, vae_config = load_first_stage(config.get("first_stage_ckpt"))
    model = LatentDiffusion(**{**config, "first_stage": vae_config})
    model.first_stage.load_state_dict(vae.state_dict())
    return model


def load_first_stage(path: str | None) -> tuple[AutoencoderNet, dict[str, Any]]:
    """The autoencoder net and its constructor arguments, from an ldm AutoencoderKL or LatentDiffusion
    checkpoint, an ldm export, or a CompVis / Stable Diffusion file (architecture read from the weights)."""
    if not path:
        raise ValueError(
            "model.first_stage_ckpt is not set. Pass the stage-1 checkpoint, e.g. "
            "model.first_stage_ckpt=outputs/ae_kl_f8/runs/<date>/checkpoints/last.ckpt "
            "(train one with `python train.py experiment=ae_kl_f8`)."
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"model.first_stage_ckpt={path!r} does not exist. Pass the checkpoint of a stage-1 run "
            "(<run dir>/checkpoints/last.ckpt of `python train.py experiment=ae_kl_f8`)."
        )
    return load_any_first_stage(path)


def load_latent_diffusion(path: str, use_ema: bool = True, device: str = "cpu") -> LatentDiffusion:
    """A LatentDiffusion from its checkpoint, EMA weights in place by default; never runs code from the file."""
    if path.endswith(".safetensors"):
        model = load_exported(path)  # an `ldm.cli.export format=safetensors` file: EMA weights already in place
        return model.eval().to(device)
    checkpoint = load_checkpoint(path)
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    if "unet" not in hparams or "first_stage" not in hparams:
        kind = "a stage-1 autoencoder checkpoint" if "vae" in hparams else "not a LatentDiffusion checkpoint"
        raise ValueError(
            f"ckpt={path!r} is {kind}. Pass the checkpoint of a latent-diffusion run "
            "(<run dir>/checkpoints/last.ckpt of `python train.py experiment=ldm_f8_text ...`)."
        )
    hparams = upgrade_targets(hparams)
    if any(key.startswith("conditioner.") for key in checkpoint["state_dict"]):
        hparams["conditioner"] = without_weight_sources(hparams["conditioner"])
    model = LatentDiffusion(**hparams)
    model.load_state_dict(checkpoint["state_dict"])
    if use_ema:
        if model.ema is None:
            raise ValueError(f"ckpt={path!r} was trained without EMA (ema_decay=0); pass use_ema=false.")
        model.ema.copy_to(model.trainable)
    return model.eval().to(device)



def load_autoencoder(path: str, device: str | torch.device = "cpu") -> AutoencoderKL:
    """A stage-1 `AutoencoderKL` from its training checkpoint, in eval mode (weights-only loading)."""
    checkpoint = load_checkpoint(path)
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    if "vae" not in hparams:
        kind = "a LatentDiffusion checkpoint" if "unet" in hparams else "not an AutoencoderKL checkpoint"
        raise ValueError(f"{path!r} is {kind}: pass the checkpoint of a stage-1 run (experiment=ae_kl_f8 ...).")
    model = AutoencoderKL(**hparams)
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval().to(device)


def load_any_latent_diffusion(path: str, use_ema: bool = True, preset: str | None = None) -> LatentDiffusion:
    """Any stage-2 model file we read: an ldm run checkpoint, an ldm export, or (with `preset`) a Stable
    Diffusion release; the weights to use (EMA or raw) in place."""
    if preset is not None:
        return load_sd_checkpoint(path, preset, use_ema=use_ema)
    if read_exported_config(path) is not None:
        return load_exported(path)  # holds one set of weights: those chosen when it was written
    return load_latent_diffusion(path, use_ema=use_ema)


def init_from(model: AutoencoderKL | LatentDiffusion, path: str, use_ema: bool = False) -> None:
    """`train.py init_from=PATH`: start from a file's weights (no optimizer state), exactly or with an error
    listing what does not fit. Stage 2: the UNet (+ first stage and conditioner when the file has them) from a
    CompVis / SD file, an ldm run or an export. Stage 1: the autoencoder from any first-stage file."""
    if isinstance(model, LatentDiffusion):
        load_weights_into(model, path, use_ema)
        return
    if isinstance(model, AutoencoderKL):
        vae, config = load_first_stage(path)
        load_exact(model.vae, vae.state_dict(), path, hint="init_from= needs an autoencoder of this architecture.")
        log.info("Loaded the autoencoder from %s.", path)
        return
    raise TypeError(f"init_from= cannot load weights into a {type(model).__name__}.")


def upgrade_targets(config: dict[str, Any]) -> dict[str, Any]:
    """Rewrite `_target_` paths of older checkpoints (LEGACY_TARGETS), at any depth, to today's modules."""
    def upgrade(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: (LEGACY_TARGETS.get(v, v) if k == "_target_" else upgrade(v)) for k, v in value.items()}
        if isinstance(value, list):
            return [upgrade(v) for v in value]
        return value

    return upgrade(config)
