"""Who reads what: split shards over ranks and dataloader workers so every rank runs the same steps.

DDP hangs forever when one rank runs out of batches before the others, which happens as soon as shards
(or their sample counts) do not divide evenly over ranks. The plan computed here fixes, for every
(rank, worker), which shards it reads and exactly how many batches it yields, and says in plain words
what an uneven shard set costs.

Modes:
- exact epochs (default): shard i goes to rank ``i % R``, worker ``(i // R) % K``; each worker yields
  ceil(samples / batch) batches, so every sample is seen once per epoch. If the rank totals differ, each
  worker index is cut to its smallest count over ranks (some samples wait for a later epoch; warned).
- fewer shards than ranks: every rank reads all shards and keeps every (R*K)-th sample.
- fixed length (``samples_per_epoch``) or ``resampled``: each rank yields samples_per_epoch / R samples,
  repeating its shards (or drawing shards at random) as needed.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class WorkerSlice:
    """What one dataloader worker of one rank reads and yields in an epoch."""

    shards: tuple[int, ...]  # indices into the shard list
    num_batches: int  # exactly this many batches per epoch ...
    num_samples: int  # ... built from this many raw samples (only the last batch may be smaller)
    keep_every: int = 1  # sample-level split: keep the raw samples j with j % keep_every == keep_offset
    keep_offset: int = 0


@dataclass(frozen=True)
class ShardPlan:
    slices: tuple[tuple[WorkerSlice, ...], ...]  # [rank][worker]
    resampled: bool  # draw shards at random with replacement instead of reading each once
    warnings: tuple[str, ...] = ()  # what the shard count costs in data (samples left out or read twice)
    notes: tuple[str, ...] = ()  # what it costs in speed (fewer workers)
    exact_epochs: bool = True  # each sample once per epoch (False: a fixed length that may repeat shards)

    @property
    def num_workers(self) -> int:
        return len(self.slices[0])

    @property
    def batches_per_rank(self) -> int:
        return sum(s.num_batches for s in self.slices[0])


def plan_shards(
    counts: list[int] | None,
    num_shards: int,
    world_size: int,
    num_workers: int,
    batch_size: int,
    samples_per_epoch: int | None = None,
    resampled: bool = False,
) -> ShardPlan:
    """Plan an epoch for ``num_shards`` shards holding ``counts`` samples (None: unknown, needs a length)."""
    if batch_size < 1 or world_size < 1 or num_shards < 1:
        raise ValueError(f"need batch_size, world_size and num_shards >= 1, "
                         f"got {batch_size}, {world_size}, {num_shards}")
    workers = max(1, num_workers)
    if resampled:
        every = tuple(range(num_shards))
        quotas = _fixed_quotas(counts, samples_per_epoch, world_size, workers, batch_size)
        return ShardPlan(tuple(tuple(WorkerSlice(every, q, q * batch_size) for q in quotas)
                               for _ in range(world_size)), resampled=True, exact_epochs=False)
    slices, warning, notes = _assign_shards(num_shards, world_size, workers)
    if samples_per_epoch is not None:
        quotas = _fixed_quotas(counts, samples_per_epoch, world_size, len(slices[0]), batch_size)
        budgets = [[q * batch_size for q in quotas]] * world_size
    elif counts is None:
        raise ValueError("sample counts are needed for exact epochs: give samples_per_epoch or write a sizes.json")
    else:
        budgets, cut_warning = _exact_budgets(slices, counts, batch_size)
        warning = warning or cut_warning
    planned = tuple(
        tuple(WorkerSlice(s.shards, _ceil_div(n, batch_size), n, s.keep_every, s.keep_offset)
              for s, n in zip(rank, rank_budgets))
        for rank, rank_budgets in zip(slices, budgets)
    )
    return ShardPlan(planned, resampled=False, warnings=(warning,) if warning else (), notes=tuple(notes),
                     exact_epochs=samples_per_epoch is None)


def resume_point(num_batches: list[int], skip: int) -> tuple[list[int], int]:
    """Where a DataLoader over workers yielding ``num_batches`` stands after its first ``skip`` batches.

    torch's DataLoader takes batches from its workers round-robin and passes over exhausted ones. Returns
    the batches taken from each worker and the worker whose turn is next: a resumed DataLoader must start
    its round-robin there (rotate the workers) to continue in the same order.
    """
    taken, worker = [0] * len(num_batches), 0
    for _ in range(min(skip, sum(num_batches))):
        while taken[worker] >= num_batches[worker]:
            worker = (worker + 1) % len(num_batches)
        taken[worker] += 1
        worker = (worker + 1) % len(num_batches)
    return taken, worker


@dataclass
class TrainPass:
    """Where a training pass over a data epoch stands: it started at batch ``start`` (raw samples
    ``start_reads`` per worker were read to get there; None: unknown) and has since yielded batches built
    from ``reads`` = [(worker, raw samples read)] in DataLoader order. A pass of ``length`` batches."""

    epoch: int = 0
    start: int = 0
    length: int = 0
    start_reads: list[int] | None = None
    reads: list[tuple[int, int]] = field(default_factory=list)
    trainer_base: int = 0  # the Trainer's count of processed batches in its epoch when this pass started

    @property
    def yielded(self) -> int:
        """Batches of the epoch consumed by the loader: those before ``start`` and the ones yielded since."""
        return self.start + len(self.reads)

    def position(self, consumed: int) -> dict[str, int | list[int] | None]:
        """The checkpointed data position after the first ``consumed`` batches of the epoch (``start`` <=
        consumed <= ``yielded``): epoch, batches, raw samples per worker; a finished epoch is the next one."""
        consumed = max(self.start, min(consumed, self.yielded))
        if self.length and consumed >= self.length:
            return {"epoch": self.epoch + 1, "batches_consumed": 0, "samples_read": None}
        reads = None if self.start_reads is None else list(self.start_reads)
        for worker, num_read in self.reads[:consumed - self.start] if reads is not None else ():
            reads[worker] += num_read
        return {"epoch": self.epoch, "batches_consumed": consumed, "samples_read": reads}


def _assign_shards(num_shards: int, world_size: int, workers: int
                   ) -> tuple[list[list[WorkerSlice]], str | None, list[str]]:
    """Which shards each (rank, worker) reads (quotas still 0), and what the shard count costs."""
    if num_shards < world_size:  # some rank would get no shard: split at the sample level instead
        slots = world_size * workers
        everything = tuple(range(num_shards))
        slices = [[WorkerSlice(everything, 0, 0, keep_every=slots, keep_offset=r * workers + w)
                   for w in range(workers)] for r in range(world_size)]
        return slices, (
            f"{num_shards} shard(s) over {world_size} ranks: every rank reads all shards and keeps 1/{slots} of "
            f"the samples ({world_size}x the reading work). Use a multiple of {world_size * workers} shards."
        ), []
    notes = []
    workers_per_rank = max(1, min(workers, num_shards // world_size))
    if workers_per_rank < workers:
        notes.append(
            f"{num_shards} shards over {world_size} rank(s) leave fewer shards than the {workers} dataloader "
            f"workers per rank: using {workers_per_rank} worker(s). Write at least {world_size * workers} shards "
            "(data/make_shards.py --samples-per-shard) to use them all."
        )
    owners: dict[tuple[int, int], list[int]] = {}
    for shard in range(num_shards):
        owners.setdefault((shard % world_size, (shard // world_size) % workers_per_rank), []).append(shard)
    slices = [[WorkerSlice(tuple(owners.get((r, w), ())), 0, 0) for w in range(workers_per_rank)]
              for r in range(world_size)]
    return slices, None, notes


def _exact_budgets(slices: list[list[WorkerSlice]], counts: list[int], batch_size: int
                   ) -> tuple[list[list[int]], str | None]:
    """Raw samples per (rank, worker) that read each sample once, cut to equal rank batch totals if needed."""
    total = sum(counts)

    def samples(s: WorkerSlice) -> int:
        if s.keep_every == 1:
            return sum(counts[i] for i in s.shards)
        return total // s.keep_every + (s.keep_offset < total % s.keep_every)

    natural = [[_ceil_div(samples(s), batch_size) for s in rank] for rank in slices]
    rank_totals = [sum(rank) for rank in natural]
    if len(set(rank_totals)) == 1:
        return [[samples(s) for s in rank] for rank in slices], None
    smallest = [min(column) for column in zip(*natural)]  # per worker index: equal rank totals
    budgets = [[min(samples(s), n * batch_size) for s, n in zip(rank, smallest)] for rank in slices]
    kept = sum(map(sum, budgets))
    note = (
        f"{len(counts)} shards over {len(slices)} ranks x {len(slices[0])} workers give the ranks unequal batch "
        f"counts {rank_totals}, which would hang DDP: every rank now runs {sum(smallest)} batches per epoch and "
        f"{total - kept} of {total} samples are left out each epoch. Use a multiple of "
        f"{len(slices) * len(slices[0])} shards of equal size (data/make_shards.py --samples-per-shard)."
    )
    return budgets, note


def _fixed_quotas(counts: list[int] | None, samples_per_epoch: int | None, world_size: int, workers: int,
                  batch_size: int) -> list[int]:
    """Per-worker batches for a fixed epoch of ``samples_per_epoch`` samples over all ranks."""
    if samples_per_epoch is None:
        if counts is None:
            raise ValueError("resampled mode without sample counts needs samples_per_epoch")
        samples_per_epoch = sum(counts)
    per_rank = max(1, samples_per_epoch // (world_size * batch_size))
    return [per_rank // workers + (w < per_rank % workers) for w in range(workers)]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)
