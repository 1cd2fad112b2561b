"""Experiment loggers that belong to a run directory: a resumed run appends to its own metrics.csv and
continues its own wandb run instead of starting a second one.

Lightning's CSVLogger deletes an existing `metrics.csv` when its directory is reused (a resume, a SLURM requeue),
and WandbLogger starts a new wandb run each launch. Here the CSV is appended to (new columns rewrite the header,
as Lightning does), and the wandb run id is stored in `<run dir>/wandb_run_id` and reused with `resume="allow"`.
wandb is offline unless `WANDB_MODE=online` (Lightning's `offline: true` would otherwise override it).
"""
from __future__ import annotations

import csv
import importlib.util
import logging
import os
import subprocess
import uuid
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter

log = logging.getLogger(__name__)

WANDB_ID_FILE = "wandb_run_id"


class LoggerUnavailableError(ImportError):
    """A configured logger whose package is not installed (a user error: install it or pick another logger)."""


def tensorboard_available() -> bool:
    """Lightning's TensorBoardLogger writes with `tensorboard` or, failing that, `tensorboardX`."""
    return any(importlib.util.find_spec(name) is not None for name in ("tensorboard", "tensorboardX"))


class AppendingExperimentWriter(ExperimentWriter):
    """Keeps an existing metrics.csv and its columns: the run it belongs to is being continued."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = sorted(next(csv.reader(file), []))


class RunCSVLogger(CSVLogger):
    """`CSVLogger` that appends to the run's metrics.csv instead of deleting it."""

    @property
    def experiment(self) -> AppendingExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment


def build_loggers(logger_cfgs: DictConfig | None, output_dir: str) -> list[Logger]:
    """The configured loggers; wandb with this run's stable id and the documented offline/online switch."""
    loggers = []
    for cfg in (logger_cfgs or {}).values():
        kwargs: dict[str, Any] = {}
        logger_class = hydra.utils.get_class(cfg._target_)
        if issubclass(logger_class, TensorBoardLogger) and not tensorboard_available():
            raise LoggerUnavailableError(
                "logger=tensorboard needs the `tensorboard` package, which is not installed: "
                "pip install -e '.[tensorboard]' (or pip install tensorboard), or use logger=csv / logger=wandb.")
        if logger_class is WandbLogger:
            kwargs["offline"] = os.environ.get("WANDB_MODE", "").lower() != "online" and cfg.get("offline", True)
            if not cfg.get("id"):
                kwargs.update(id=wandb_run_id(output_dir), resume="allow")
        loggers.append(hydra.utils.instantiate(cfg, **kwargs))
    return loggers


def wandb_run_id(output_dir: str) -> str:
    """This run directory's wandb id: read from `wandb_run_id`, or made and written there on first use."""
    path = os.path.join(output_dir, WANDB_ID_FILE)
    if os.path.isfile(path):
        with open(path) as handle:
            return handle.read().strip()
    run_id = uuid.uuid4().hex[:12]
    os.makedirs(output_dir, exist_ok=True)
    with open(path, "w") as handle:
        handle.write(run_id + "\n")
    return run_id


def git_commit() -> str | None:
    """The commit of the checkout `ldm` runs from (None outside a git checkout, e.g. an installed wheel)."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None


def log_run_config(loggers: list[Logger], cfg: DictConfig, extra: dict[str, Any]) -> None:
    """The whole resolved config (data, trainer, seed ..., not only the model's hyperparameters) and `extra`
    (parameter counts, git commit) to every logger that takes hyperparameters."""
    params = {**OmegaConf.to_container(cfg, resolve=True), **extra}
    params.pop("hydra", None)
    for logger in loggers:
        try:
            logger.log_hyperparams(params)
        except NotImplementedError:  # loggers without hyperparameter support
            log.debug("%s takes no hyperparameters", type(logger).__name__)
