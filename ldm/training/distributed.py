"""Scale-out plumbing: the FSDP wrap policy, the FSDP2 strategy (`trainer=fsdp2`, CPU or GPU), the cluster
plugins, and one run directory per DDP run.

Lightning does the distributed work (DDP / FSDP strategies, SLURM detection, requeue); this module only
supplies what Lightning cannot know about this project, and fixes what Lightning 2.6 gets wrong under
Hydra:

- Its subprocess launcher re-runs `sys.argv` for ranks > 0 with `hydra.run.dir=<hydra.run.dir>`. In a
  multirun that re-runs the whole sweep (`-m` and every swept value) into a second, newly time-stamped
  directory, because `hydra.run.dir` is not the job's directory. `hydra_ddp_job` points `hydra.run.dir`
  at the job's own output directory and replaces `sys.argv` by the job's own overrides, so every rank of
  a job writes into that job's directory; afterwards it undoes the launcher's environment so the next
  job of a sweep launches its own ranks.
- submitit's local executor starts `tasks_per_node` processes itself (as SLURM does) but says so only in
  its own variables: `hydra_ddp_job` exports them as the torch.distributed variables Lightning reads.
"""
from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from omegaconf import read_write
from pytorch_lightning.strategies import ModelParallelStrategy

from ldm.models.sharding import fsdp_unit_classes, fsdp_unit_names, fully_shard_units  # noqa: F401 (re-exported)

# Environment variables Lightning's subprocess launcher sets in the launching process.
LAUNCHER_ENV_VARS = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
# Hydra overrides a DDP child may keep; launcher, sweeper, mode and directories are the parent's business.
CHILD_HYDRA_OVERRIDE_PREFIXES = ("hydra.job.", "hydra.verbose", "hydra/job_logging", "hydra/hydra_logging")


def fsdp_wrap_policy():
    """The `auto_wrap_policy` of `configs/trainer/fsdp.yaml`: one FSDP unit per block of `fsdp_unit_classes`
    (ldm/models/sharding.py: the units FSDP2 shards at too)."""
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    return ModuleWrapPolicy(fsdp_unit_classes())


def fsdp_mixed_precision(param_dtype: str = "bfloat16", reduce_dtype: str = "float32",
                         buffer_dtype: str = "float32"):
    """FSDP `MixedPrecision` from dtype names (YAML has no dtypes).

    Lightning's `bf16-mixed` casts buffers to bf16 too, which would round the EMA shadows (updates of
    (1 - 0.9999) * delta vanish in bf16) and the latent scale_factor: buffers stay fp32 here, and
    gradients are reduced in fp32 so summing over many ranks loses nothing."""
    from torch.distributed.fsdp import MixedPrecision

    def dtype(name: str) -> torch.dtype:
        value = getattr(torch, name, None)
        if not isinstance(value, torch.dtype):
            raise ValueError(f"{name!r} is not a torch dtype; use e.g. bfloat16, float16 or float32")
        return value

    return MixedPrecision(param_dtype=dtype(param_dtype), reduce_dtype=dtype(reduce_dtype),
                          buffer_dtype=dtype(buffer_dtype))


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy with every process in one sharding group (FSDP2, no tensor parallel).

    ModelParallelStrategy runs on CPU (gloo) as on GPU, where FSDPStrategy refuses the CPU accelerator;
    its "auto" sizes would make the processes of a node a tensor-parallel group, so the data-parallel size
    is set to the world size here. LatentDiffusion.configure_model shards at the mesh it is given."""

    def __init__(self, save_distributed_checkpoint: bool = False, **kwargs) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


def cluster_plugins() -> list:
    """Under SLURM (a batch job, not an interactive shell), auto-requeue on SIGUSR1: Lightning saves
    `<run dir>/hpc_ckpt_N.ckpt`, runs `scontrol requeue`, and the requeued job resumes from it
    (sbatch must send the signal: `configs/hydra/launcher/slurm.yaml` sets `--signal=USR1@delay`).
    After the launcher's `max_num_timeout` requeues (SLURM counts them in SLURM_RESTART_COUNT) the
    signal only checkpoints and stops (ldm/preemption.py), so a run that never finishes ends."""
    from lightning_fabric.plugins.environments import SLURMEnvironment

    if not SLURMEnvironment.detect():
        return []
    limit = max_requeues()
    requeue = limit is None or int(os.environ.get("SLURM_RESTART_COUNT", "0")) < limit
    return [SLURMEnvironment(auto_requeue=requeue, requeue_signal=signal.SIGUSR1)]


def max_requeues() -> int | None:
    """`hydra.launcher.max_num_timeout` of a submitit launcher (None: no launcher config, no limit)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    value = (HydraConfig.get().get("launcher") or {}).get("max_num_timeout")
    return None if value is None else int(value)


@contextmanager
def hydra_ddp_job() -> Iterator[None]:
    """Run one Hydra job so that DDP ranks started by Lightning share its run directory (see module doc).

    A process started by a launcher (LOCAL_RANK set: a DDP child, SLURM/torchrun/submitit task) runs
    unchanged; the process that launches ranks gets its launcher variables and process group removed
    afterwards, so the next job of a multirun starts a fresh group."""
    export_submitit_local_ranks()
    launching = "LOCAL_RANK" not in os.environ
    saved_env = {name: os.environ.get(name) for name in LAUNCHER_ENV_VARS}
    saved_argv = list(sys.argv)
    pin_run_dir_for_ddp_children()
    try:
        yield
    finally:
        sys.argv[:] = saved_argv
        if launching:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
            for name, value in saved_env.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def pin_run_dir_for_ddp_children() -> None:
    """Make Lightning's DDP child command re-run *this job* into *this job's* directory."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    with read_write(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir  # a literal: no ${now:...} to re-evaluate
    kept = [o for o in hydra_cfg.overrides.hydra if o.startswith(CHILD_HYDRA_OVERRIDE_PREFIXES)]
    sys.argv[:] = [sys.argv[0], *hydra_cfg.overrides.task, *kept]


def export_submitit_local_ranks() -> None:
    """Tasks of submitit's local executor -> MASTER_ADDR/PORT, RANK, LOCAL_RANK, WORLD_SIZE (no-op elsewhere)."""
    if int(os.environ.get("SUBMITIT_LOCAL_NTASKS", "1")) <= 1 or "LOCAL_RANK" in os.environ:
        return
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
