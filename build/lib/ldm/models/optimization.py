"""Optimisation settings the two LightningModules share."""
from __future__ import annotations

import pytorch_lightning as pl


def global_batch_size(trainer: pl.Trainer, batch_size: int | None) -> int:
    """Samples per optimizer step over all devices (the CompVis learning-rate scaling)."""
    if batch_size is None:
        raise ValueError("scale_lr=true needs model.batch_size (set it to ${data.batch_size}).")
    return batch_size * trainer.world_size * trainer.accumulate_grad_batches
