"""Training callbacks: sample grids for fixed conditions, and periodic evaluation (FID, precision/recall)."""
from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from typing import Any, Callable, Mapping, Sequence

import pytorch_lightning as pl
import torch

from ldm.diffusion.settings import SamplerSettings
from ldm.evaluation.evaluate import (
    EvaluationOptions,
    build_features,
    check_sample_count,
    condition_captions,
    evaluate_images,
    evaluation_conditions,
    reference_statistics_for,
)
from ldm.evaluation.image_sources import (
    DataSplitImages,
    data_identity,
    datamodule_identity,
)
from ldm.evaluation.sweep import (
    TABLE_COLUMNS,
    plot_sweep,
    setting_label,
    sweep_settings,
    sweep_table,
)
from ldm.inference.sampling import as_model_inputs
from ldm.inference.tasks import condition_images, condition_rows
from ldm.metrics import images_to_uint8
from ldm.models.concat_conditioners import concat_parts
from ldm.utils.images import log_image_grid, save_image_grid


class SampleGrid(pl.Callback):
    """Every `every_n_steps` (and at the end), sample a grid with the EMA weights: one row per prompt
    (text models) or class (class models), fixed seeds, so grids are comparable across the run.
    Image-conditioned models (concat) take their conditions from the first training batch's first 4 rows,
    a row showing condition | samples. PNG in `<run dir>/images/samples_step{step}.png` and to the logger.
    `sampling`: a SamplerSettings or a `sampling` config node (configs/sampling/)."""

    def __init__(
        self,
        every_n_steps: int = 500,
        sampling: SamplerSettings | Mapping[str, Any] | None = None,
        prompts: Sequence[str] = (),
        classes: Sequence[int] = (),
        samples_per_condition: int = 4,
    ) -> None:
        self.every_n_steps = every_n_steps
        self.settings = SamplerSettings.of(sampling)
        self.prompts = list(prompts)
        self.classes = list(classes or ())  # null in the config: train.py derives them (ldm/training/preflight.py)
        self.samples_per_condition = samples_per_condition
        self._last_logged_step = -1
        self._fixed_conditions: dict[str, Any] | None = None  # concat models: conditions from a training batch

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._fixed_conditions is None and concat_parts(pl_module.conditioner):
            self._fixed_conditions = condition_rows(pl_module, batch, rows=4, repeat=self.samples_per_condition)
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
        if self._fixed_conditions is not None:
            conditions = self._fixed_conditions
        elif concat_parts(pl_module.conditioner):
            return None  # no training batch seen yet (the end of a run that never trained)
        num_samples = None if conditions is not None else per_row * 4
        was_training = pl_module.training
        pl_module.eval()
        # every rank samples (FSDP needs all ranks in a forward); only rank 0 writes
        with pl_module.ema_weights():
            images = pl_module.generate(conditions, num_samples, self.settings)
        pl_module.train(was_training)
        if not trainer.is_global_zero:
            return None
        path = os.path.join(trainer.default_root_dir, "images", f"samples_step{step:07d}.png")
        if isinstance(conditions, dict):  # condition | its samples, per row
            shown = condition_images(pl_module, conditions, images.shape[-1])[::per_row]
            rows = [torch.cat([shown[i:i + 1], images[i * per_row:(i + 1) * per_row].cpu()]) for i in range(len(shown))]
            images, per_row = torch.cat(rows), per_row + 1
        save_image_grid(images, path, nrow=per_row)
        caption = "; ".join(self.prompts) if isinstance(conditions, list) else None
        log_image_grid(trainer, "samples", path, step=step, caption=caption)
        return path


# ---------------------------------------------------------------------------- periodic evaluation


class EvaluationCallback(pl.Callback):
    """Every `every_n_steps` (and at the end of training): FID, precision / recall, density / coverage, IS
    and (shapes) prompt fidelity of `num_samples` images drawn with the EMA weights, against the
    datamodule's val split; logged as `eval/<metric>` and appended to `<run dir>/eval/metrics.jsonl`.
    Image-conditioned models (concat) are sampled for the val samples' own conditions (low-res image, mask, map).

    `cfg_scales` (e.g. [1.5, 3, 5]) adds the quality-diversity curve of `ldm.evaluation.sweep` at each
    evaluation: the same samples (same conditions and seeds) drawn at each guidance scale, against the same
    reference statistics, logged as `eval/<metric>@cfg<s>` (FID, KID, precision, recall, density, coverage, IS,
    prompt fidelity, seconds per image), with the table and plot in `<run dir>/eval/cfg_step<step>.md|.png`
    (`evaluate.py sweep.cfg_scale=...` on the checkpoint gives the same numbers).

    The extractor, the reference statistics (cached under `cache_dir`) and the conditions are ready at
    fit start, so a missing weight file stops the run before training, not after `every_n_steps`.

    Distributed: every rank samples an equal share (sample i keeps seed + i, so the set is the one a
    single process draws, and FSDP sees every rank in every forward); rank 0 gathers the images and alone
    computes features and metrics; the other ranks wait for its result in a broadcast, which is the
    barrier. An error on rank 0 is broadcast too and raised on every rank, so none is left waiting.
    """

    def __init__(
        self,
        every_n_steps: int = 1000,
        num_samples: int = 256,
        sampling: SamplerSettings | Mapping[str, Any] | None = None,
        batch_size: int = 32,
        features: Mapping[str, Any] | str = "auto",
        k: int = 3,
        density_k: int = 5,
        num_real: int | None = 1000,
        cache_dir: str = ".cache/metrics",
        data_identity: Any = None,
        cfg_scales: Sequence[float] | None = None,
    ) -> None:
        """`sampling` as SampleGrid's; `features` as in configs/features/ (a name or `{name: ..., **kwargs}`);
        `data_identity` names the reference data for the statistics cache (the data config), default: the
        datamodule's hparams."""
        self.every_n_steps, self.num_samples, self.batch_size = every_n_steps, num_samples, batch_size
        self.settings = SamplerSettings.of(sampling)
        scales = [float(scale) for scale in cfg_scales or ()]
        self.cfg_settings = sweep_settings(self.settings, {"cfg_scale": scales}) if scales else []
        features = {"name": features} if isinstance(features, str) else dict(features)
        self.options = EvaluationOptions(features=features, k=k, density_k=density_k, num_real=num_real,
                                         cache_dir=cache_dir, batch_size=batch_size)
        check_sample_count(num_samples, self.options)
        self.data_identity = data_identity
        self.history: list[dict[str, Any]] = []  # rank 0: the metrics of every evaluation
        self._last_step = -1
        self._conditions: list[str | int | None] | None = None
        self._extractor = self._reference = None

    def setup(self, trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
        if trainer.datamodule is None:
            raise ValueError("EvaluationCallback compares samples with the datamodule's val split: pass "
                             "trainer.fit(model, datamodule=...), or drop the `evaluation` callback.")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._conditions = self._on_rank_zero(trainer, lambda: self._prepare(trainer, pl_module))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.evaluate(trainer, pl_module)

    @torch.no_grad()
    def evaluate(self, trainer: pl.Trainer, pl_module: Any) -> dict[str, Any] | None:
        """Sample, gather on rank 0, compute and log; every rank returns rank 0's metrics."""
        step = trainer.global_step
        if step == self._last_step:
            return None
        self._last_step = step
        was_training = pl_module.training
        pl_module.eval()
        drawn = [self.settings] + [setting for setting in self.cfg_settings if setting != self.settings]
        with pl_module.ema_weights():
            results = [self._evaluate_setting(trainer, pl_module, setting) for setting in drawn]
        pl_module.train(was_training)
        metrics = results[0]
        curve = [{"setting": setting.as_dict(), "label": setting_label(setting), **results[drawn.index(setting)]}
                 for setting in self.cfg_settings]
        self._log(trainer, metrics, step, curve)
        return metrics

    def _evaluate_setting(self, trainer: pl.Trainer, pl_module: Any, settings: SamplerSettings) -> dict[str, Any]:
        """The metrics of the evaluation samples drawn with `settings` (every rank returns rank 0's)."""
        start = time.perf_counter()
        images = self._sample_share_and_gather(trainer, pl_module, settings)
        seconds = (time.perf_counter() - start) / len(self._conditions)
        captions = condition_captions(self._conditions)
        metrics = self._on_rank_zero(trainer, lambda: evaluate_images(
            images, self._reference, self._extractor, k=self.options.k, density_k=self.options.density_k,
            captions=captions, batch_size=self.batch_size))
        return {**metrics, "seconds_per_image": seconds}

    @staticmethod
    def _on_rank_zero(trainer: pl.Trainer, compute: Callable[[], Any]) -> Any:
        """`compute()` on rank 0, its result (or its error, raised everywhere) broadcast to every rank."""
        outcome = None
        if trainer.is_global_zero:
            try:
                outcome = compute()
            except Exception as error:  # noqa: BLE001 - re-raised below, on every rank
                outcome = error
        outcome = trainer.strategy.broadcast(outcome, src=0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def _prepare(self, trainer: pl.Trainer, pl_module: Any) -> list[str | int | None]:
        """Rank 0: the extractor (which may first train the shapes classifier), the reference statistics
        and the conditions every rank will sample."""
        reference = self._reference_images(trainer)
        options = replace(self.options, device=str(pl_module.device))
        self._extractor = build_features(options.features, reference_is_shapes=reference.is_shapes,
                                         image_size=pl_module.hparams.image_size, cache_dir=options.cache_dir,
                                         device=pl_module.device)
        # loaders that split shards by rank (webdataset) show rank 0 a 1/world part of the split
        self._reference = reference_statistics_for(reference, self._extractor, options,
                                                   reference_ranks=trainer.world_size)
        return evaluation_conditions(pl_module, self.num_samples, reference.captions, rows=reference.condition_rows)

    def _sample_share_and_gather(self, trainer: pl.Trainer, pl_module: Any, settings: SamplerSettings) -> torch.Tensor:
        """uint8 (num_samples, 3, H, W) on every rank; rank r draws samples [r*share, (r+1)*share)."""
        conditions = self._conditions
        share = -(-len(conditions) // trainer.world_size)
        first = trainer.global_rank * share
        # the last rank pads its share with extra samples (dropped after gathering): equal shares for all_gather
        mine = (conditions[first:first + share] + conditions)[:share]
        batches = []
        for offset in range(0, share, self.batch_size):
            chunk = mine[offset:offset + self.batch_size]
            images = pl_module.generate(as_model_inputs(chunk), len(chunk), settings, seed_offset=first + offset)
            batches.append(images_to_uint8(images))
        local = torch.cat(batches)
        gathered = trainer.strategy.all_gather(local)  # (world, share, 3, H, W); unchanged on one device
        return gathered.reshape(-1, *local.shape[1:])[: len(conditions)].cpu()

    def _reference_images(self, trainer: pl.Trainer) -> DataSplitImages:
        datamodule = trainer.datamodule
        identity = datamodule_identity(datamodule) if self.data_identity is None else data_identity(self.data_identity)
        return DataSplitImages(datamodule, identity, prepare=False)

    def _log(self, trainer: pl.Trainer, metrics: dict[str, Any], step: int, curve: list[dict[str, Any]]) -> None:
        """To every logger at this exact step (self.log would wait for a logging step), and to a JSONL file;
        the cfg curve's table and plot beside it."""
        scalars = {f"eval/{key}": float(value) for key, value in metrics.items() if _is_number(value)}
        for record in curve:
            scalars.update({f"eval/{key}@cfg{record['setting']['cfg_scale']:g}": float(record[key])
                            for key in CURVE_METRICS if _is_number(record.get(key))})
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
        if not trainer.is_global_zero:
            return
        entry = {"step": step, **metrics, **({"cfg_curve": curve} if curve else {})}
        self.history.append(entry)
        folder = os.path.join(trainer.default_root_dir, "eval")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "metrics.jsonl"), "a") as handle:
            handle.write(json.dumps(entry, default=str) + "\n")
        if curve:
            with open(os.path.join(folder, f"cfg_step{step:07d}.md"), "w") as handle:
                handle.write(sweep_table(curve))
            plot = plot_sweep(curve, os.path.join(folder, f"cfg_step{step:07d}.png"))
            log_image_grid(trainer, "eval/cfg_curve", plot, step=step)


CURVE_METRICS = tuple(key for key, _ in TABLE_COLUMNS)  # the sweep table's columns (interval columns: not scalars)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
