"""Training throughput as a logged metric, so runs (e.g. of different first-stage factors) compare on speed too."""
from __future__ import annotations

import statistics
import time
from collections import deque
from typing import Any

import pytorch_lightning as pl

from ldm.utils.logged_metrics import TRAIN_SAMPLES_PER_SEC as METRIC


class TrainThroughput(pl.Callback):
    """Logs `perf/train_samples_per_sec`: samples over all ranks per second of training.

    A step's time is the interval between the starts of consecutive training batches, so it holds data
    loading, forward, backward, optimizer and every hook. The median over the last `window` steps leaves
    out the few steps that also sampled a grid, evaluated or saved a checkpoint."""

    def __init__(self, window: int = 50) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1 step, got {window}")
        self.intervals: deque[float] = deque(maxlen=window)
        self._last_start: float | None = None
        self._samples = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last_start is not None:
            self.intervals.append(now - self._last_start)
        self._last_start = now
        self._samples = len(batch["key"]) * trainer.world_size

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.intervals:
            pl_module.log(METRIC, self.samples_per_second(), on_step=True, on_epoch=False, batch_size=1)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._last_start = None  # the pause between epochs (validation, loader restart) is no training step

    def samples_per_second(self) -> float:
        return self._samples / statistics.median(self.intervals)
