"""What `train.py` does with a composed config: build data, model, callbacks, loggers, trainer; fit.

Also chains the two stages: a latent-diffusion config without `model.first_stage_ckpt` gets its
stage-1 autoencoder trained first (or reused from the cache, keyed by the stage-1 config's hash), so
neither the quickstart nor a factor sweep needs a hand-copied path.
"""
from __future__ import annotations

import logging
import os
import re
import warnings
from dataclasses import dataclass

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf, open_dict

from ldm.checkpoint import AtomicCheckpointIO
from ldm.config import config_hash, resolve_ckpt_path
from ldm.distributed import cluster_plugins, is_global_zero_from_env
from ldm.preemption import exit_status_on_preemption, fault_tolerance_callbacks, find_resume_checkpoint

log = logging.getLogger(__name__)

# Deliberate here: our IterableDatasets have exact per-rank lengths, and the frozen first stage and
# LPIPS network stay in eval mode during training.
warnings.filterwarnings("ignore", message=r".*IterableDataset.*has `__len__` defined.*")
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")

LATENT_DIFFUSION_TARGET = "ldm.LatentDiffusion"


@dataclass
class TrainResult:
    output_dir: str
    last_ckpt: str
    trainer: pl.Trainer


def train(cfg: DictConfig) -> TrainResult:
    """Fit the configured model; returns where the final checkpoint is."""
    needs_first_stage = not cfg.model.get("first_stage_ckpt") and not cfg.model.get("first_stage")
    if cfg.model._target_ == LATENT_DIFFUSION_TARGET and needs_first_stage:
        with open_dict(cfg):
            cfg.model.first_stage_ckpt = ensure_first_stage(cfg)
    output_dir = cfg.paths.output_dir
    os.makedirs(output_dir, exist_ok=True)
    if is_global_zero_from_env():  # DDP ranks share the run directory
        OmegaConf.save(cfg, os.path.join(output_dir, "config_resolved.yaml"), resolve=True)

    pl.seed_everything(cfg.seed, workers=True)
    datamodule = hydra.utils.instantiate(cfg.data)
    model = hydra.utils.instantiate(cfg.model)
    if cfg.get("init_from"):
        model.load_weights_from(cfg.init_from)
    check_gradient_clipping(model, cfg.trainer)
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    callbacks += fault_tolerance_callbacks(cfg.seed, output_dir)
    loggers = [hydra.utils.instantiate(c) for c in (cfg.get("logger") or {}).values()]
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO(), *cluster_plugins()]
    )
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.log_dir, cfg.task_name)
    if ckpt_path is None and (ckpt_path := find_resume_checkpoint(output_dir)):
        log.info("Resuming the interrupted run in %s from %s", output_dir, ckpt_path)
    with exit_status_on_preemption():
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)

    last_ckpt = os.path.join(output_dir, "checkpoints", "last.ckpt")
    trainer.save_checkpoint(last_ckpt)
    log.info("Finished: %s", last_ckpt)
    if trainer.is_global_zero:
        run_after_training(cfg.get("after_training"), last_ckpt, output_dir)
    return TrainResult(output_dir=output_dir, last_ckpt=last_ckpt, trainer=trainer)


def check_gradient_clipping(model: pl.LightningModule, trainer_cfg: DictConfig) -> None:
    """Lightning clips gradients only for automatic optimisation; say so before the run starts."""
    if trainer_cfg.get("gradient_clip_val") and not model.automatic_optimization:
        raise ValueError(
            f"trainer.gradient_clip_val={trainer_cfg.gradient_clip_val} cannot apply to {type(model).__name__}: it "
            "steps its optimizers itself (manual optimisation: autoencoder and discriminator in turn), and "
            "Lightning clips only automatically optimised models. Set trainer.gradient_clip_val=null for stage 1."
        )


def run_after_training(actions: DictConfig | None, ckpt: str, output_dir: str) -> None:
    """Call each `after_training.<name>` target with the final checkpoint and `<run dir>/<name>`
    (the quickstart samples a grid and evaluates it this way)."""
    for name, action in (actions or {}).items():
        out = os.path.join(output_dir, name)
        log.info("after training: %s -> %s", name, out)
        hydra.utils.call(action, ckpt=ckpt, out=out)


def optimized_metric(trainer: pl.Trainer, name: str | None) -> float | None:
    """What a sweeper minimises (hparams_search configs set `optimized_metric`): its last logged value."""
    if not name:
        return None
    if name not in trainer.callback_metrics:
        raise ValueError(
            f"optimized_metric={name!r} was not logged (logged: {sorted(trainer.callback_metrics)}); validation "
            "must run at the last step: make trainer.max_steps a multiple of trainer.val_check_interval."
        )
    return float(trainer.callback_metrics[name])


def ensure_first_stage(cfg: DictConfig) -> str:
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
    result = train(stage1)
    with open(done_marker, "w") as f:
        f.write(result.last_ckpt + "\n")
    return result.last_ckpt


# Data keys that are a training stage's own hyperparameters rather than a property of the data set.
STAGE_DATA_KEYS = ("batch_size", "val_batch_size")


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
        stage1.paths = cfg.paths  # a copy; the output_dir is a placeholder until the hash names the directory
        stage1.paths.output_dir = "<first-stage run dir>"
        for key in ("accelerator", "devices", "num_nodes", "precision", "strategy", "use_distributed_sampler"):
            if key in cfg.trainer:  # same processes; the strategy's own keys resolve in the stage-1 config
                stage1.trainer[key] = cfg.trainer[key]
        stage1.logger = cfg.get("logger")
    return stage1
