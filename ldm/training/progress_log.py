"""Progress as log lines, readable where a progress bar is not (`make quickstart | tee log`, CI, SLURM logs):

    step 150/1000 (15%) | loss 0.1043 | val_loss 0.0987 | 2.31 steps/s | ETA 0:06:08

Stage 1 leads with what says how good the autoencoder is: its reconstruction loss and the PSNR of the
current batch's reconstruction (from the posterior mode, as validation does), also logged as `train/psnr`.
Its total loss (with the learned log-variance, LDM paper Eq. 25 of App. G) falls without bound and says
nothing of quality, so it is left to the loggers.

Lightning's progress bar is switched off when stdout is not a terminal (`progress_bar_enabled`): there it
would write carriage-return redraws into the log.
"""
from __future__ import annotations

import logging
import sys
import time
from datetime import timedelta
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import FSDPStrategy

from ldm.models.autoencoder import AutoencoderKL, psnr

log = logging.getLogger(__name__)


def progress_bar_enabled(setting: bool | None) -> bool:
    """`trainer.enable_progress_bar`: as set, or (null) only when stdout is a terminal."""
    return sys.stdout.isatty() if setting is None else bool(setting)


class ProgressLog(pl.Callback):
    """A log line every `every_n_steps` optimizer steps and at the end: step / max_steps, the headline
    metrics, steps/s since the previous line and the ETA from the mean rate of this fit."""

    def __init__(self, every_n_steps: int = 50) -> None:
        if every_n_steps < 1:
            raise ValueError(f"callbacks.progress_log.every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self._start = self._last = (0.0, 0)  # (time, step) at the fit's start and at the last line
        self._logged_step = -1

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._start = self._last = (time.perf_counter(), trainer.global_step)  # resumed runs start mid-way

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._logged_step or step % self.every_n_steps:
            return  # gradient accumulation: several batches per step
        self._logged_step = step
        metrics = self.headline(trainer, pl_module, batch)  # every rank: the PSNR forward is collective-safe
        if trainer.is_global_zero:
            log.info("%s", self.format_line(trainer, metrics))

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if not trainer.is_global_zero:
            return
        seconds = time.perf_counter() - self._start[0]
        steps = trainer.global_step - self._start[1]
        rate = f" ({steps / seconds:.2f} steps/s)" if seconds > 0 and steps > 0 else ""
        log.info("finished at step %d: %d steps in %s%s", trainer.global_step, steps, _duration(seconds), rate)

    def headline(self, trainer: pl.Trainer, pl_module: Any, batch: Any) -> dict[str, float]:
        """Name -> value of what the line shows (stage 1: rec_loss, psnr; else: loss), then val metrics."""
        logged = trainer.callback_metrics
        if isinstance(pl_module, AutoencoderKL):
            metrics = _present(logged, {"rec_loss": "train/rec_loss"})
            if (value := self._batch_psnr(trainer, pl_module, batch)) is not None:
                metrics["psnr"] = value
                for logger in trainer.loggers:
                    logger.log_metrics({"train/psnr": value}, step=trainer.global_step)
            return metrics | _present(logged, {"val_psnr": "val/psnr"})
        return _present(logged, {"loss": "train/loss", "val_loss": "val/loss"})

    @torch.no_grad()
    def _batch_psnr(self, trainer: pl.Trainer, pl_module: AutoencoderKL, batch: Any) -> float | None:
        """PSNR (dB) of this batch's reconstruction, averaged over ranks. Not under FSDP, where a forward
        outside the wrapped module's own would see sharded parameters (there: the validation PSNR only)."""
        if isinstance(trainer.strategy, FSDPStrategy) or not isinstance(batch, dict) or "image" not in batch:
            return None
        images = batch["image"]
        was_training = pl_module.vae.training
        pl_module.vae.eval()
        reconstructions = pl_module.vae.decode(pl_module.vae.encode(images).mode())
        pl_module.vae.train(was_training)
        value = trainer.strategy.reduce(psnr(images, reconstructions), reduce_op="mean")
        return float(value)

    def format_line(self, trainer: pl.Trainer, metrics: dict[str, float]) -> str:
        now, step = time.perf_counter(), trainer.global_step
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        parts = [f"step {step}/{total} ({100 * step / total:.0f}%)" if total else f"step {step}"]
        parts += [_format_metric(name, value) for name, value in metrics.items()]
        (last_time, last_step), (start_time, start_step) = self._last, self._start
        if now > last_time and step > last_step:
            parts.append(f"{(step - last_step) / (now - last_time):.2f} steps/s")
        if total and now > start_time and step > start_step:
            remaining = (total - step) * (now - start_time) / (step - start_step)
            parts.append(f"ETA {_duration(remaining)}")
        self._last = (now, step)
        return " | ".join(parts)


def _present(logged: dict[str, Any], names: dict[str, str]) -> dict[str, float]:
    return {short: float(logged[key]) for short, key in names.items() if key in logged}


PSNR_LABELS = {"psnr": "PSNR", "val_psnr": "val PSNR"}


def _format_metric(name: str, value: float) -> str:
    if name in PSNR_LABELS:
        return f"{PSNR_LABELS[name]} {value:.2f} dB"
    return f"{name} {value:.4g}"


def _duration(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))
