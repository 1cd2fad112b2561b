"""Chaining the two stages: a latent-diffusion config without `model.first_stage_ckpt` gets its stage-1
autoencoder trained first, or reused from the cache (keyed by the stage-1 config's hash), so neither the
quickstart nor a factor sweep needs a hand-copied path."""
from __future__ import annotations

import logging
import os
import re
from typing import Any, Callable

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from ldm.models.latent_diffusion import LatentDiffusion
from ldm.training.run_config import config_hash

log = logging.getLogger(__name__)


def needs_first_stage(model_cfg: DictConfig) -> bool:
    """A LatentDiffusion config that names neither a stage-1 checkpoint nor a built-in first stage."""
    is_stage_two = hydra.utils.get_class(model_cfg._target_) is LatentDiffusion
    return is_stage_two and not model_cfg.get("first_stage_ckpt") and not model_cfg.get("first_stage")


def ensure_first_stage(cfg: DictConfig, train: Callable[[DictConfig], Any]) -> str:
    """Train the stage-1 experiment `cfg.first_stage` names, unless an identical one is cached.

    The cache directory is named by the hash of the stage-1 config (`first_stage_config`), so a sweep over
    `experiment=ldm_f4_text,ldm_f8_text,...` trains each factor's autoencoder once and reuses it.
    """
    stage1 = first_stage_config(cfg)
    first_stage = cfg.first_stage
    run_dir = os.path.join(cfg.paths.cache_dir, "first_stage", f"{first_stage.experiment}_{config_hash(stage1)}")
    done_marker = os.path.join(run_dir, "DONE")
    last_ckpt = os.path.join(run_dir, "checkpoints", "last.ckpt")
    if os.path.exists(done_marker) and os.path.exists(last_ckpt):
        log.info("Reusing the stage-1 model %s", last_ckpt)
        return last_ckpt
    log.info("Training the stage-1 model %s into %s", first_stage.experiment, run_dir)
    with open_dict(stage1):
        stage1.paths.output_dir = run_dir
    result = train(stage1)  # the pipeline's own train(): stage 1 is a run like any other
    with open(done_marker, "w") as f:
        f.write(result.last_ckpt + "\n")
    return result.last_ckpt


# Data keys that are a training stage's own hyperparameters rather than a property of the data set.
STAGE_DATA_KEYS = ("batch_size", "val_batch_size")
# Data keys that add stage-2 conditions (ldm/data/degradations.py, semantic maps): not read by stage 1.
CONDITION_DATA_KEYS = ("degradations", "semantic_map", "num_classes")  # stage-2 conditions: stage 1 reads images only


def first_stage_config(cfg: DictConfig) -> DictConfig:
    """The stage-1 run's config: `first_stage.experiment` at this run's size and seed, then `first_stage.overrides`.

    It reads this run's data set (the parent's `data` config) and uses its accelerator, processes and
    logger, but keeps its own batch sizes (the stage-1 size preset's, e.g. 8 for `size=small`) and any
    `data.*` key that `first_stage.overrides` sets explicitly.
    """
    if cfg.data._target_.endswith("LatentDataModule"):
        raise ValueError(
            "data=latents needs model.first_stage_ckpt=<the autoencoder that wrote the cache: see its latents.json>; "
            "a stage-1 model cannot be trained from latents."
        )
    first_stage = cfg.get("first_stage")
    if not first_stage or not first_stage.get("experiment"):
        raise ValueError(
            "model.first_stage_ckpt is not set and the config names no `first_stage.experiment` to train. "
            "Pass model.first_stage_ckpt=PATH (a stage-1 checkpoint, e.g. outputs/ae_kl_f8/runs/.../last.ckpt)."
        )
    overrides = list(first_stage.get("overrides") or [])
    stage1 = hydra.compose(
        config_name="train",
        overrides=[f"experiment={first_stage.experiment}", f"size={cfg.size.name}", f"seed={cfg.seed}", *overrides],
    )
    explicit = {match.group(1) for match in map(re.compile(r"^\+*data\.(\w+)").match, overrides) if match}
    own_data = {key: stage1.data[key] for key in {*STAGE_DATA_KEYS, *explicit} if key in stage1.data}
    with open_dict(stage1):
        stage1.data = OmegaConf.merge(cfg.data, own_data)
        for key in CONDITION_DATA_KEYS:  # stage 1 reads images only: one autoencoder (one cache entry) per task
            if key in stage1.data and key not in explicit:
                del stage1.data[key]  # removed, not switched off: the config (and its hash) is that of before
        stage1.paths = cfg.paths  # a copy; the output_dir is a placeholder until the hash names the directory
        stage1.paths.output_dir = "<first-stage run dir>"
        for key in ("accelerator", "devices", "num_nodes", "precision", "strategy", "use_distributed_sampler"):
            if key in cfg.trainer:  # same processes; the strategy's own keys resolve in the stage-1 config
                stage1.trainer[key] = cfg.trainer[key]
        strategy = cfg.trainer.get("strategy")
        if OmegaConf.is_dict(strategy) and str(strategy.get("_target_", "")).endswith("FSDP2Strategy"):
            # FSDP2 shards stage 2 only (LatentDiffusion.configure_model); the discriminator idles before disc_start
            stage1.trainer.strategy = "ddp_find_unused_parameters_true"
        stage1.logger = cfg.get("logger")
        stage1.pop("cache_latents", None)  # a stage-2 switch: out of the stage-1 config and its hash
    return stage1
