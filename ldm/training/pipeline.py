"""What `train.py` does with a composed config: build data, model, callbacks, loggers, trainer; fit.

A latent-diffusion config without `model.first_stage_ckpt` first gets its stage-1 autoencoder (stages.py), and
then trains from its data's latents, encoded once (latents_once.py; `cache_latents=false`: from the images).
"""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf, open_dict

from ldm.loading.checkpoints import build_model, init_from
from ldm.training.checkpoint_io import AtomicCheckpointIO
from ldm.training.distributed import cluster_plugins
from ldm.training.latents_once import ensure_latents
from ldm.training.loggers import build_loggers, git_commit, log_run_config
from ldm.training.preemption import (
    exit_status_on_preemption,
    fault_tolerance_callbacks,
    find_resume_checkpoint,
)
from ldm.training.preflight import preflight
from ldm.training.progress_log import progress_bar_enabled
from ldm.training.run_config import resolve_ckpt_path, run_dir_of
from ldm.training.stages import ensure_first_stage, needs_first_stage
from ldm.training.text_vocabulary import resolve_vocabulary
from ldm.utils.ranks import is_global_zero_from_env

log = logging.getLogger(__name__)

# Deliberate here: our IterableDatasets have exact per-rank lengths, and the frozen first stage and
# LPIPS network stay in eval mode during training.
warnings.filterwarnings("ignore", message=r".*IterableDataset.*has `__len__` defined.*")
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
# (Lightning's "dataloader is not resumable" is not silenced: EpochLoader says it resumes, which it does.)

@dataclass
class TrainResult:
    output_dir: str
    last_ckpt: str
    trainer: pl.Trainer


def train(cfg: DictConfig) -> TrainResult:
    """Fit the configured model; returns where the final checkpoint is."""
    datamodule = hydra.utils.instantiate(cfg.data)
    preflight(cfg, datamodule)  # seconds: before a stage-1 model is trained or a step taken
    if needs_first_stage(cfg.model):
        with open_dict(cfg):
            cfg.model.first_stage_ckpt = ensure_first_stage(cfg, train)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.log_dir, cfg.task_name)
    continued = run_dir_of(ckpt_path)
    if continued is not None and continued != os.path.abspath(cfg.paths.output_dir):
        log.info("Continuing the run in %s (its metrics.csv, images and wandb run; this launch's Hydra log is in %s)",
                 continued, cfg.paths.output_dir)
        with open_dict(cfg):
            cfg.paths.output_dir = continued
    output_dir = cfg.paths.output_dir
    os.makedirs(output_dir, exist_ok=True)
    if is_global_zero_from_env():  # DDP ranks share the run directory
        OmegaConf.save(cfg, os.path.join(output_dir, "config_resolved.yaml"), resolve=True)

    pl.seed_everything(cfg.seed, workers=True)
    resolve_vocabulary(cfg, datamodule)  # model.conditioner.vocabulary=data: the train captions' tokens
    model = build_model(cfg.model)
    if cfg.get("init_from"):
        init_from(model, cfg.init_from)
    ensure_latents(cfg, model, datamodule)  # stage 2: the train split from cached latents (cache_latents)
    check_gradient_clipping(model, cfg.trainer)
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    callbacks += fault_tolerance_callbacks(cfg.seed, output_dir)
    loggers = build_loggers(cfg.get("logger"), output_dir)
    log_run_config(loggers, cfg, {"git_commit": git_commit(), **parameter_counts(model)})
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO(), *cluster_plugins()],
        enable_progress_bar=progress_bar_enabled(cfg.trainer.get("enable_progress_bar")),
    )
    if ckpt_path is None and (ckpt_path := find_resume_checkpoint(output_dir)):
        log.info("Resuming the interrupted run in %s from %s", output_dir, ckpt_path)
    with exit_status_on_preemption():
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)

    last_ckpt = os.path.join(output_dir, "checkpoints", "last.ckpt")
    trainer.save_checkpoint(last_ckpt, weights_only=False)  # full: resumable (loading stays weights-only)
    log.info("Finished: %s", last_ckpt)
    if trainer.is_global_zero:
        run_after_training(cfg.get("after_training"), last_ckpt, output_dir)
    return TrainResult(output_dir=output_dir, last_ckpt=last_ckpt, trainer=trainer)


def parameter_counts(model: pl.LightningModule) -> dict[str, int]:
    return {"params_total": sum(p.numel() for p in model.parameters()),
            "params_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


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
    (the quickstart samples a grid and evaluates it this way); a null entry is switched off (an experiment
    built on the quickstart's drops its text-only grid with `samples: null`)."""
    for name, action in (actions or {}).items():
        if action is None:
            continue
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
