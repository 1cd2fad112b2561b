"""Optimisation settings the two LightningModules share, and stage 2's optimizer and LR schedule from config."""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import hydra
import pytorch_lightning as pl
import torch


def global_batch_size(trainer: pl.Trainer, batch_size: int | None) -> int:
    """Samples per optimizer step over all devices (the CompVis learning-rate scaling)."""
    if batch_size is None:
        raise ValueError("scale_lr=true needs model.batch_size (set it to ${data.batch_size}).")
    return batch_size * trainer.world_size * trainer.accumulate_grad_batches


def effective_learning_rate(learning_rate: float, scale_lr: bool, trainer: pl.Trainer | None,
                            batch_size: int | None) -> float:
    """The optimizer's rate. CompVis' `base_learning_rate` semantics: with `scale_lr` the configured rate is
    per sample and is multiplied by the global batch (main.py --scale_lr True); without, it is the rate."""
    return learning_rate * global_batch_size(trainer, batch_size) if scale_lr else learning_rate


# The stage-2 optimizer when a module's hyperparameters name none (checkpoints written before `optimizer`
# was a config): CompVis' torch.optim.AdamW, with the module's betas and weight decay.
DEFAULT_OPTIMIZER = {"_target_": "torch.optim.AdamW", "_partial_": True, "fused": True}
LR_SCHEDULES = ("constant", "linear", "cosine")


def build_optimizer(config: Mapping[str, Any] | None, params: Iterable[torch.nn.Parameter], lr: float,
                    **defaults: Any) -> torch.optim.Optimizer:
    """`config` is a Hydra partial (`_target_` + `_partial_: true`, e.g. configs/model/optimizer/adamw.yaml),
    called as optimizer(params, lr=lr): the rate stays the module's, so `scale_lr` and sweeps of
    `model.learning_rate` keep working whatever the optimizer. None: DEFAULT_OPTIMIZER with `defaults`."""
    if config is None:
        config = {**DEFAULT_OPTIMIZER, **defaults}
    if not config.get("_partial_", False):
        raise ValueError(f"model.optimizer must be a partial (`_partial_: true`), called with the parameters and "
                         f"lr: got {dict(config)}. Add `_partial_: true` or pick a file of configs/model/optimizer/.")
    factory = hydra.utils.instantiate(config)
    return factory(params, lr=lr)


def lr_multiplier(step: int, schedule: str, warmup_steps: int, total_steps: int | None,
                  min_lr_ratio: float = 0.0) -> float:
    """The factor on the rate for optimizer step `step + 1` (LambdaLR counts from 0).

    Linear warm-up, (step + 1) / warmup_steps for the first `warmup_steps` steps (Goyal et al. 2017), then
    with p = (step + 1 - warmup_steps) / (total_steps - warmup_steps) in [0, 1] and r = min_lr_ratio:
      constant  1
      linear    r + (1 - r) (1 - p)
      cosine    r + (1 - r) (1 + cos(pi p)) / 2      (SGDR without restarts, Loshchilov & Hutter 2017, eq. 5)
    so the last step (step + 1 = total_steps) runs at r * lr, and steps after it stay there."""
    warmup = max(1, warmup_steps)
    if step + 1 < warmup or schedule == "constant":
        return min(1.0, (step + 1) / warmup)
    if total_steps is None or total_steps <= warmup_steps:
        raise ValueError(f"lr_schedule={schedule} decays until model.lr_decay_steps (or trainer.max_steps), which "
                         f"must exceed warmup_steps={warmup_steps}: got {total_steps}. Set one of them.")
    progress = min(1.0, (step + 1 - warmup_steps) / (total_steps - warmup_steps))
    if schedule == "linear":
        shape = 1.0 - progress
    elif schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"model.lr_schedule={schedule!r} is unknown: use one of {', '.join(LR_SCHEDULES)}.")
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def check_lr_schedule(schedule: str, min_lr_ratio: float) -> None:
    """At construction, so a typo stops the run before any step."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"model.lr_schedule={schedule!r} is unknown: use one of {', '.join(LR_SCHEDULES)}.")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"model.min_lr_ratio={min_lr_ratio} must be in [0, 1] (the final rate / the peak rate).")
