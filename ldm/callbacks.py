"""Training callbacks: sample grids for fixed conditions during latent-diffusion training."""
from __future__ import annotations

import os
from typing import Any, Sequence

import pytorch_lightning as pl
import torch

from ldm.visualize import log_image_grid, save_image_grid


class SampleGrid(pl.Callback):
    """Every `every_n_steps` (and at the end), sample a grid with the EMA weights: one row per prompt
    (text models) or class (class models), fixed seeds, so grids are comparable across the run.
    PNG in `<run dir>/images/samples_step{step}.png` and to the logger."""

    def __init__(
        self,
        every_n_steps: int = 500,
        sampler: str = "ddim",
        steps: int = 50,
        cfg_scale: float = 5.0,
        seed: int = 0,
        prompts: Sequence[str] = (),
        classes: Sequence[int] = (),
        samples_per_condition: int = 4,
    ) -> None:
        self.every_n_steps = every_n_steps
        self.sampling = dict(sampler=sampler, steps=steps, cfg_scale=cfg_scale, seed=seed)
        self.prompts = list(prompts)
        self.classes = list(classes)
        self.samples_per_condition = samples_per_condition
        self._last_logged_step = -1

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self.log_samples(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.log_samples(trainer, pl_module)

    def conditions(self, pl_module: Any) -> tuple[list[str] | torch.Tensor | None, int]:
        """The conditions of the grid, each repeated `samples_per_condition` times."""
        k = self.samples_per_condition
        key = pl_module.conditioner.batch_key
        if key == "caption":
            return [p for p in self.prompts for _ in range(k)], k
        if key == "class_label":
            return torch.tensor([c for c in self.classes for _ in range(k)]), k
        return None, k

    @torch.no_grad()
    def log_samples(self, trainer: pl.Trainer, pl_module: Any) -> str | None:
        step = trainer.global_step
        if step == self._last_logged_step:
            return None
        self._last_logged_step = step
        conditions, per_row = self.conditions(pl_module)
        num_samples = None if conditions is not None else per_row * 4
        was_training = pl_module.training
        pl_module.eval()
        # every rank samples (FSDP needs all ranks in a forward); only rank 0 writes
        with pl_module.ema_weights():
            images = pl_module.generate(conditions, num_samples, **self.sampling)
        pl_module.train(was_training)
        if not trainer.is_global_zero:
            return None
        path = os.path.join(trainer.default_root_dir, "images", f"samples_step{step:07d}.png")
        save_image_grid(images, path, nrow=per_row)
        caption = "; ".join(self.prompts) if isinstance(conditions, list) else None
        log_image_grid(trainer, "samples", path, step=step, caption=caption)
        return path
