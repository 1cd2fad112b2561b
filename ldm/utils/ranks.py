"""The one rank lookup: which process of a distributed job this is, with or without a process group."""
from __future__ import annotations

import os

import torch

# Set by the launchers (torchrun, Lightning's subprocess launcher, SLURM, submitit) before any process group exists.
RANK_ENV_VARS = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")


def distributed_rank_and_world_size() -> tuple[int, int]:
    """(global rank, world size) of the initialised process group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def is_global_zero_from_env() -> bool:
    """Whether this process is global rank 0, before a Trainer exists (read from launcher variables)."""
    return all(os.environ.get(name, "0") == "0" for name in RANK_ENV_VARS)


def values_of_every_rank(value: object) -> list:
    """``value`` of every rank, in rank order (all-gathered under DDP)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, value)
        return gathered
    return [value]
