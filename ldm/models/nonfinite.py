"""Skip optimizer steps with non-finite gradients, without a host-device sync per step.

A NaN or inf loss must not poison the weights, and a week-long run must not die on one bad batch.
The check runs on the device: the fused Adam/AdamW kernels read `optimizer.found_inf` (the hook
GradScaler uses) and leave parameters, moments and the step count untouched when it is 1. The counts
are read on the host only when they are logged, which is also when a run of too many bad steps in a
row stops training with a clear error (`NonFiniteTrainingError`, which names the checkpoint of the last good
weights once the trainer has saved it).

Sharded gradients (FSDP2 DTensors): each rank sees only its shard, so the verdict is all-reduced (MAX of
"bad" over ranks): every rank skips the same steps and the shards never disagree about a step.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch


class NonFiniteTrainingError(FloatingPointError):
    """Too many optimizer steps in a row had a NaN/inf loss or gradients; the run stops.

    Skipped steps leave the weights alone, so the model still holds the last good weights: the trainer's
    fault-tolerance callback saves them to this run's `checkpoints/last.ckpt` and sets `checkpoint`, which
    the message then names."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.checkpoint: str | None = None

    def __str__(self) -> str:
        if self.checkpoint is None:
            return self.message
        return (f"{self.message} The last good weights are saved in {self.checkpoint}; once fixed, resume from "
                f"them with ckpt_path={self.checkpoint}.")


class NonFiniteGradientGuard:
    def __init__(self, max_consecutive: int = 10) -> None:
        self.max_consecutive = max_consecutive
        self._consecutive: torch.Tensor | None = None
        self._longest_run: torch.Tensor | None = None
        self._total: torch.Tensor | None = None

    def arm(self, optimizer: torch.optim.Optimizer, params: Iterable[torch.nn.Parameter]) -> torch.Tensor:
        """Flag the coming `optimizer.step()` to be skipped if any gradient is not finite."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return torch.ones((), dtype=torch.bool)
        sharded = [g for g in grads if hasattr(g, "_local_tensor")]
        local = [g._local_tensor if hasattr(g, "_local_tensor") else g for g in grads]
        finite = torch.isfinite(torch.stack(torch._foreach_norm(local)).sum())
        if sharded:
            finite = all_ranks_finite(finite, sharded[0].device_mesh.get_group())
        if not optimizer.defaults.get("fused"):
            raise ValueError("NonFiniteGradientGuard needs a fused optimizer (Adam/AdamW with fused=True).")
        optimizer.found_inf = (~finite).float()
        optimizer.grad_scale = None
        self._count(~finite)
        return finite

    def _count(self, bad: torch.Tensor) -> None:
        bad = bad.long()
        if self._consecutive is None:
            self._consecutive = torch.zeros_like(bad)
            self._longest_run = torch.zeros_like(bad)
            self._total = torch.zeros_like(bad)
        self._consecutive = (self._consecutive + 1) * bad
        self._longest_run = torch.maximum(self._longest_run, self._consecutive)
        self._total = self._total + bad

    def skipped_steps(self) -> int:
        """Total skipped steps so far (a host sync: call at the logging interval only)."""
        return 0 if self._total is None else int(self._total.item())

    def check(self) -> None:
        """Raise if `max_consecutive` steps in a row had non-finite gradients (a host sync)."""
        if self._longest_run is None:
            return
        longest = int(self._longest_run.item())
        self._longest_run.zero_()
        if longest >= self.max_consecutive:
            raise NonFiniteTrainingError(
                f"{longest} optimizer steps in a row had NaN/inf gradients (limit max_nonfinite_steps="
                f"{self.max_consecutive}); they were skipped and the run is stopped. Lower the learning rate, "
                "enable gradient clipping (trainer.gradient_clip_val=1.0), or check the data."
            )


def all_ranks_finite(finite: torch.Tensor, group) -> torch.Tensor:
    """True only where every rank of `group` found its gradient shards finite (one all-reduce of a scalar)."""
    import torch.distributed as dist

    bad = (~finite).to(torch.float32)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=group)
    return bad == 0
