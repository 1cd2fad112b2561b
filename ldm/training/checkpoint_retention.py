"""Keep the last K periodic checkpoints plus every M-th step's, delete the rest (`last.ckpt` always stays).

ModelCheckpoint with `save_top_k: -1` keeps every periodic file: at ~16 bytes per trainable parameter each
(weights, EMA, two AdamW moments) plus the frozen parts, a long run fills the disk. `save_top_k: K` needs a
monitored metric, which periodic checkpoints do not have; this callback prunes by step instead (diffusers'
`--checkpoints_total_limit`, with an extra "keep every M-th" for later comparisons).
"""
from __future__ import annotations

import logging
import os
import re
from typing import Any

import pytorch_lightning as pl

log = logging.getLogger(__name__)

PERIODIC_CHECKPOINT = re.compile(r"^step(\d+)\.ckpt$")  # configs/callbacks/default.yaml: filename "step{step:07d}"


class CheckpointRetention(pl.Callback):
    def __init__(self, dirpath: str, keep_last: int | None = 3, keep_every: int | None = None) -> None:
        """`keep_last`: periodic checkpoints kept (newest first; None keeps all); `keep_every`: also keep those
        whose step is a multiple of it (None: none extra)."""
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"checkpoint_retention.keep_last={keep_last}: keep at least 1 (or null to keep all).")
        if keep_every is not None and keep_every < 1:
            raise ValueError(f"checkpoint_retention.keep_every={keep_every} must be a positive step count or null.")
        self.dirpath, self.keep_last, self.keep_every = dirpath, keep_last, keep_every

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.is_global_zero:
            prune_checkpoints(self.dirpath, self.keep_last, self.keep_every)

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.on_train_batch_end(trainer, pl_module, None, None, -1)


def prune_checkpoints(dirpath: str, keep_last: int | None, keep_every: int | None) -> list[str]:
    """Delete the periodic checkpoints in `dirpath` that the policy does not keep; returns the deleted names."""
    if keep_last is None or not os.path.isdir(dirpath):
        return []
    steps = {}
    for name in os.listdir(dirpath):
        match = PERIODIC_CHECKPOINT.match(name)
        if match:
            steps[name] = int(match.group(1))
    newest = sorted(steps, key=steps.get, reverse=True)[:keep_last]
    doomed = [name for name, step in steps.items()
              if name not in newest and not (keep_every and step % keep_every == 0)]
    for name in doomed:
        os.remove(os.path.join(dirpath, name))
    if doomed:
        log.debug("checkpoint retention: deleted %s", ", ".join(sorted(doomed)))
    return sorted(doomed)
