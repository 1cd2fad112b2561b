"""Surviving interruption: checkpoint on SIGTERM / SIGUSR1, exact RNG streams across resume, finding
the checkpoint to resume from.

Lightning turns SIGTERM into a `SIGTERMException` at the next step boundary, on every rank at the same
step (rank 0 broadcasts the flag each step). `PreemptionCheckpoint` saves `<run>/checkpoints/last.ckpt`
then, and makes SIGUSR1 mean the same outside SLURM (under SLURM, Lightning owns SIGUSR1 for
auto-requeue). `train` turns the exception into exit status 143 (killed by SIGTERM), not 0.

Lightning does not checkpoint random number generators. The training noise (t, eps, the posterior
sample, the CFG drop mask) comes from torch's global generator, so `RNGStateCheckpoint` stores every
rank's generator states and puts them back right before the first resumed step: a resumed run then
draws the same noise as a straight one. It also gives each rank its own stream (seed + rank): with
one seed everywhere, every rank would draw the same t and eps for its i-th sample.
"""
from __future__ import annotations

import glob
import logging
import os
import random
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ldm.models.nonfinite import NonFiniteTrainingError
from ldm.utils.files import remove_stale_temporaries
from ldm.utils.ranks import distributed_rank_and_world_size

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM  # what a shell reports for a process killed by SIGTERM
LAST_CHECKPOINT = "last.ckpt"
HPC_CHECKPOINT_PATTERN = "hpc_ckpt_*.ckpt"  # Lightning's SLURM auto-requeue checkpoints, in the run dir


class PreemptionCheckpoint(pl.Callback):
    """On SIGTERM (or SIGUSR1), finish the current step on every rank, save `dirpath/last.ckpt`, stop.

    Also saves `dirpath/last.ckpt` when the non-finite guard stops the run (the weights are the last good
    ones; the error then names the file), and at start-up removes what killed checkpoint writes left in
    the run's checkpoint directories (partial `.tmp` files)."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath
        self.path = os.path.join(dirpath, LAST_CHECKPOINT)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not trainer.is_global_zero:  # only rank 0 writes checkpoints, and none is being written yet
            return
        directories = {self.dirpath, *(c.dirpath for c in trainer.checkpoint_callbacks if c.dirpath)}
        for directory in sorted(directories):
            for path in remove_stale_temporaries(directory):
                log.warning("Removed %s: a partial checkpoint left by a write that was killed.", path)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After Lightning has registered its handlers (and noted the previous ones, which it restores when
        # fit ends, however it ends): SIGUSR1 -> SIGTERM -> Lightning's graceful stop.
        if not _slurm_requeue_owns_usr1(trainer):
            signal.signal(signal.SIGUSR1, _forward_to_sigterm)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            # full (resumable); every rank takes part (sharded states, barrier)
            trainer.save_checkpoint(self.path, weights_only=False)
            log.warning("Preempted at step %d: saved %s. Resume with ckpt_path=last (or ckpt_path=%s).",
                        trainer.global_step, self.path, self.path)
        elif isinstance(exception, NonFiniteTrainingError):  # raised on every rank at the same step
            trainer.save_checkpoint(self.path)
            exception.checkpoint = self.path


@contextmanager
def exit_status_on_preemption() -> Iterator[None]:
    """Exit with status 143 after a preemption checkpoint (Lightning's SIGTERMException exits with 0)."""
    try:
        yield
    except SIGTERMException:
        raise SystemExit(PREEMPTED_EXIT_CODE) from None


class RNGStateCheckpoint(pl.Callback):
    """Per-rank python / numpy / torch (CPU and CUDA) generator states in the checkpoint; distinct ranks."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._pending: dict[str, Any] | None = None  # restored states, applied before the next step
        self._validation_states: dict[str, Any] | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending is None and trainer.global_step == 0:  # a fresh run: one stream per rank
            _seed_all(self.seed + trainer.global_rank)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # here, not in load_state_dict: starting the dataloader draws from torch's generator in between
        if self._pending is not None:
            set_rng_states(self._pending)
            self._pending = None

    # validation inside fit must not shift the training stream: a run resumed from a checkpoint saved
    # before that validation (ModelCheckpoint saves in on_train_batch_end) never runs it (the val
    # DataLoader's worker seed alone is one draw from torch's generator)
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self._validation_states = get_rng_states()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._validation_states is not None:
            set_rng_states(self._validation_states)
            self._validation_states = None

    def state_dict(self) -> dict[str, Any]:
        """All ranks' states (a collective: Lightning builds checkpoints on every rank)."""
        states = get_rng_states()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, states)
            return {"per_rank": gathered}
        return {"per_rank": [states]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        per_rank = state_dict["per_rank"]
        rank, world_size = distributed_rank_and_world_size()
        if len(per_rank) != world_size:
            log.warning("The checkpoint holds RNG states of %d ranks, this run has another count: the noise "
                        "stream restarts from seed %d + rank (training continues correctly, not bit-exactly).",
                        len(per_rank), self.seed)
            _seed_all(self.seed + rank)
            return
        self._pending = per_rank[rank]


def get_rng_states() -> dict[str, Any]:
    """Generator states as tensors and plain containers (loadable with `weights_only=True`)."""
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(_as_tuples(states["python"]))
    kind, keys, position, has_gauss, cached_gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gauss))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def find_resume_checkpoint(run_dir: str) -> str | None:
    """The newest checkpoint this run directory already holds: `checkpoints/last.ckpt` or a SLURM
    requeue `hpc_ckpt_N.ckpt`. A run directory with a checkpoint is this run, restarted (a requeued
    job, or the same `hydra.run.dir` launched again): it continues instead of starting over."""
    candidates = glob.glob(os.path.join(run_dir, HPC_CHECKPOINT_PATTERN))
    candidates += [p for p in [os.path.join(run_dir, "checkpoints", LAST_CHECKPOINT)] if os.path.isfile(p)]
    return max(candidates, key=os.path.getmtime) if candidates else None


def fault_tolerance_callbacks(seed: int, run_dir: str) -> list[pl.Callback]:
    """The callbacks every training run gets, whatever `callbacks=` says."""
    return [PreemptionCheckpoint(os.path.join(run_dir, "checkpoints")), RNGStateCheckpoint(seed)]


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _as_tuples(value: Any) -> Any:
    """`random.setstate` wants the nested tuples that a checkpoint round trip may have made lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _forward_to_sigterm(signum: int, frame: Any) -> None:
    os.kill(os.getpid(), signal.SIGTERM)


def _slurm_requeue_owns_usr1(trainer: pl.Trainer) -> bool:
    from lightning_fabric.plugins.environments import SLURMEnvironment

    environment = getattr(trainer.strategy, "cluster_environment", None)
    return isinstance(environment, SLURMEnvironment) and environment.auto_requeue
