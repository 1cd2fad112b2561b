"""Stable Diffusion 1.x / 2.x releases as a `LatentDiffusion`: the architecture from a preset config
(`configs/model/sd1.yaml`, `sd2.yaml`), the weights by the CompVis prefix rename (compvis.py)."""
from __future__ import annotations

import logging
from typing import Any, Mapping

import hydra
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from ldm.loading.compvis import OPENCLIP_PREFIX, UNET_PREFIX, state_dict_of
from ldm.loading.exported import without_weight_sources
from ldm.loading.init_from import load_state_into
from ldm.loading.state_dicts import CheckpointMismatchError
from ldm.models.conditioners import MissingConditioner
from ldm.models.latent_diffusion import LatentDiffusion
from ldm.utils.config import CONFIG_DIR
from ldm.utils.files import load_checkpoint

log = logging.getLogger(__name__)

SD_PRESETS = ("sd1", "sd2")


def load_sd_checkpoint(
    path: str, preset: str, size_overrides: dict[str, Any] | None = None, use_ema: bool = False
) -> LatentDiffusion:
    """A `LatentDiffusion` holding a Stable Diffusion 1.x / 2.x checkpoint, in eval mode.

    The architecture comes from `configs/model/<preset>.yaml`; `size_overrides` is merged into it
    (nested dict: {"unet": {...}, "first_stage": {...}, "conditioner": {"width": ...},
    "prediction_type": "eps", ...}). The SD 2.x OpenCLIP text tower is loaded when the file has
    it; otherwise (SD 1.x's transformers CLIP, or no text weights) the conditioner is a
    `MissingConditioner` placeholder that names the encoder to supply: the UNet and the
    autoencoder work, `generate()` explains what is missing. `use_ema` takes the `model_ema.*` UNet."""
    state_dict = state_dict_of(load_checkpoint(path))
    if not any(key.startswith(UNET_PREFIX) for key in state_dict):
        raise CheckpointMismatchError(
            f"{path} has no Stable Diffusion UNet (keys model.diffusion_model.*). ldm checkpoints load with "
            "LatentDiffusion.load_from_checkpoint, exports with ldm.loading.load_exported."
        )
    config = sd_model_config(preset, size_overrides)
    config["conditioner"] = _conditioner_for(config["conditioner"], state_dict, preset)
    model = LatentDiffusion(**{**config, "ema_decay": 0.0})
    load_state_into(model, state_dict, path, use_ema=use_ema, hint=preset_hint(state_dict, preset))
    return model.eval()


def sd_model_config(preset: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """LatentDiffusion constructor arguments of a preset with `overrides` merged in: exactly what
    `train.py model=<preset>` composes (configs/model/<preset>.yaml over latent_diffusion.yaml)."""
    if preset not in SD_PRESETS:
        raise ValueError(f"Unknown preset {preset!r}: use one of {SD_PRESETS} (Stable Diffusion 1.x or 2.x).")
    cfg = compose_train_config(["~experiment", f"model={preset}"])
    cfg.model = OmegaConf.merge(cfg.model, overrides or {})
    resolved = OmegaConf.to_container(cfg.model, resolve=True)  # interpolations resolve against the whole config
    return {key: value for key, value in resolved.items() if not key.startswith("_")}


def compose_train_config(overrides: list[str]) -> DictConfig:
    """train.yaml composed with `overrides`, inside a running Hydra app (the export tool) or outside one."""
    if GlobalHydra.instance().is_initialized():
        return hydra.compose(config_name="train", overrides=overrides)
    with hydra.initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra.compose(config_name="train", overrides=overrides)


def preset_hint(state_dict: Mapping[str, Tensor], preset: str) -> str:
    """Which preset the file's layout points to: SD 2.x has Linear proj_in (2-D), SD 1.x a 1x1 conv."""
    proj_in = next((v for k, v in state_dict.items() if k.startswith(UNET_PREFIX) and k.endswith("proj_in.weight")), None)
    if proj_in is None:
        return "The file's UNet has no transformer blocks: it is not a Stable Diffusion checkpoint."
    detected = "sd2" if proj_in.ndim == 2 else "sd1"
    if detected != preset:
        layout = "Linear proj_in/proj_out" if detected == "sd2" else "1x1-conv proj_in/proj_out"
        return f"The file has {layout}, the SD {detected[-1]}.x layout: try preset='{detected}'."
    return (f"Its layout matches preset '{preset}': check size_overrides (widths, channel_mult, context width) "
            "against the checkpoint's shapes above.")


def _conditioner_for(conditioner: dict[str, Any], state_dict: Mapping[str, Tensor], preset: str) -> dict[str, Any]:
    """The preset's text encoder built weight-less when the file carries its OpenCLIP weights,
    else a placeholder naming it (SD 1.x files carry transformers' CLIP, which we do not map)."""
    if any(key.startswith(OPENCLIP_PREFIX) for key in state_dict):
        return without_weight_sources(conditioner)
    described = ", ".join(f"{k}={v!r}" for k, v in conditioner.items() if k not in ("_target_", "width"))
    needed = f"{conditioner['_target_']}({described})"
    others = sorted({key.split(".")[1] for key in state_dict if key.startswith("cond_stage_model.")})
    found = f" (the file's cond_stage_model.{others[0]}.* is not in a layout we load)" if others else ""
    log.warning("%s: no loadable text encoder in the checkpoint%s; supply %s.", preset, found, needed)
    return {
        "_target_": f"{MissingConditioner.__module__}.MissingConditioner",
        "output_dim": conditioner["width"],
        "needed": needed,
    }
