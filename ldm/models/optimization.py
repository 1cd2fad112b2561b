"""Optimisation settings the two LightningModules share."""
from __future__ import annotations

import pytorch_lightning as pl


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
