"""WebDataset DataModules: tar shards -> batches, equal steps on every rank, exact mid-epoch resume.

Each dataloader worker reads the shards its ``ShardPlan`` slice names, shuffles samples in a buffer seeded by (seed,
epoch, rank, worker), decodes and batches them, and stops after exactly its planned number of batches. Nothing
depends on a running random stream, so a resumed run can skip the batches already trained on by reading (not
decoding) their samples, and then yields the same batches the straight run would have yielded.

Corrupt samples are dropped from their batch (which gets smaller), warned about, and counted: every batch carries
``num_skipped`` (samples dropped while building it) and ``DataModule.num_skipped`` is the running total in this
process. A batch is built from ``batch_size`` raw samples; only if all of them are corrupt does it read on until it
has a good one. The data position in a checkpoint therefore holds, besides the epoch and the batches consumed, the
raw samples each worker really read, so resuming skips exactly those (reading, not decoding them).

Preemption: SLURM signals every process of a job step. The workers ignore SIGTERM and SIGUSR1 (they are forked with
both blocked), so only the main process reacts: it checkpoints and then stops its workers.
"""
from __future__ import annotations

import functools
import itertools
import os
import random
import warnings
from collections.abc import Callable, Iterator

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ldm.data.degradations import build_degradations
from ldm.data.shapes import NUM_CLASSES, shapes_urls, write_shapes
from ldm.data.sharding import (
    ShardPlan,
    TrainPass,
    WorkerSlice,
    plan_shards,
    resume_point,
)
from ldm.data.shards import expand_urls, is_local, iter_raw_samples, shard_sample_counts
from ldm.data.transforms import (
    CorruptSample,
    ImageTransform,
    collate,
    decode_sample,
    to_model_ranges,
)
from ldm.data.workers import PREEMPTION_SIGNALS, init_worker, signals_blocked
from ldm.utils.ranks import distributed_rank_and_world_size, values_of_every_rank

MAX_WARNINGS_PER_WORKER = 5
MAX_CORRUPT_IN_A_ROW = 10_000
BATCH_ORIGIN = ("_worker", "_num_read")  # which worker built a batch from how many raw samples (popped)


class ShardStream(IterableDataset):
    """Batches of one rank for one epoch, as planned; ``start_epoch`` sets the epoch and resume point.

    ``decode(raw, epoch=...)`` turns an undecoded sample into a batch row (raising ``CorruptSample``)."""

    def __init__(self, urls: list[str], plan: ShardPlan, rank: int, decode: Callable[..., dict], batch_size: int,
                 shuffle_buffer: int, seed: int) -> None:
        self.urls, self.plan, self.rank = urls, plan, rank
        self.decode, self.batch_size = decode, batch_size
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.epoch, self.worker_skips, self.worker_rotation = 0, [0] * plan.num_workers, 0
        self.worker_reads = [0] * plan.num_workers

    def __len__(self) -> int:
        return self.plan.batches_per_rank

    def start_epoch(self, epoch: int, skip_batches: int, samples_read: list[int] | None = None) -> list[int]:
        """Set the epoch and how many of its batches (in DataLoader order) were already consumed.

        ``samples_read``: the raw samples each worker read for those batches (from a checkpoint); without it
        (or for another worker count) full batches are assumed. Returns the raw samples each worker skips."""
        work = self.plan.slices[self.rank]
        self.epoch = epoch
        self.worker_skips, self.worker_rotation = resume_point([s.num_batches for s in work], skip_batches)
        if samples_read is None or len(samples_read) != len(work):
            samples_read = [min(b * self.batch_size, s.num_samples) for b, s in zip(self.worker_skips, work)]
        self.worker_reads = [int(n) for n in samples_read]
        return list(self.worker_reads)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = ((info.id if info is not None else 0) + self.worker_rotation) % self.plan.num_workers
        work = self.plan.slices[self.rank][worker]
        skipped = {"count": 0, "warned": 0}

        def on_corrupt(reason: object) -> None:
            skipped["count"] += 1
            if skipped["warned"] < MAX_WARNINGS_PER_WORKER:
                skipped["warned"] += 1
                more = " (further ones are counted silently)" if skipped["warned"] == MAX_WARNINGS_PER_WORKER else ""
                warnings.warn(f"skipping corrupt data: {reason}{more}", RuntimeWarning, stacklevel=2)

        samples = self._raw_samples(work, worker, on_corrupt)
        for _ in range(self.worker_reads[worker]):  # resume: read, do not decode
            next(samples)
        # more corrupt samples in a row than two passes over the worker's shards: none will ever decode
        limit = min(MAX_CORRUPT_IN_A_ROW, max(1000, 2 * work.num_samples + self.batch_size))
        for index in range(self.worker_skips[worker], work.num_batches):
            size = min(self.batch_size, work.num_samples - index * self.batch_size)
            batch = self._next_batch(samples, size, skipped, on_corrupt, limit, work)
            batch[BATCH_ORIGIN[0]] = worker
            yield batch

    def _next_batch(self, samples: Iterator[dict], size: int, skipped: dict, on_corrupt: Callable[[object], None],
                    limit: int, work: WorkerSlice) -> dict:
        rows, before = [], skipped["count"]
        for raw in itertools.islice(samples, size):
            rows.append(self._decode(raw, on_corrupt))
        while not any(rows):  # all corrupt: read on rather than yield an empty batch
            if len(rows) >= limit:
                raise RuntimeError(
                    f"{len(rows)} corrupt samples in a row in shards {[self.urls[i] for i in work.shards]}: no "
                    "sample decodes. Check them with data/inspect_shards.py (wrong format or fields? class "
                    "labels outside the model's range?)")
            rows.append(self._decode(next(samples), on_corrupt))
        batch = collate([row for row in rows if row], num_skipped=skipped["count"] - before)
        batch[BATCH_ORIGIN[1]] = len(rows)  # raw samples read, corrupt ones included: what a resume skips
        return batch

    def _decode(self, raw: dict, on_corrupt: Callable[[object], None]) -> dict | None:
        try:
            return self.decode(raw, epoch=self.epoch)
        except CorruptSample as exn:
            on_corrupt(exn)
            return None

    def _raw_samples(self, work: WorkerSlice, worker: int, on_error: Callable[[object], None]) -> Iterator[dict]:
        """Endless raw samples of this worker: its shards pass after pass (only read again if it runs short)."""
        for pass_index in itertools.count():
            rng = random.Random(f"{self.seed}/{self.epoch}/{pass_index}/{self.rank}/{worker}")
            shards = self._pass_shards(work, pass_index, rng)
            samples = iter_raw_samples((self.urls[i] for i in shards), on_error=on_error)
            if work.keep_every > 1:
                samples = itertools.islice(samples, work.keep_offset, None, work.keep_every)
            read = 0
            for sample in _shuffled(samples, self.shuffle_buffer, rng):
                read += 1
                yield sample
            if read == 0:
                raise RuntimeError(f"shards {[self.urls[i] for i in shards]} hold no readable sample")
            if pass_index == 0 and self.plan.exact_epochs:
                warnings.warn(f"shards {[self.urls[i] for i in shards]} held fewer readable samples than their "
                              "sizes say: reading them again to keep every rank at the same number of batches",
                              RuntimeWarning, stacklevel=2)

    def _pass_shards(self, work: WorkerSlice, pass_index: int, rng: random.Random) -> list[int]:
        if self.plan.resampled:
            return [rng.choice(work.shards) for _ in work.shards]
        if self.shuffle_buffer <= 1:
            return list(work.shards)
        # a sample-level split needs the same shard order on every rank and worker
        order_rng = rng if work.keep_every == 1 else random.Random(f"{self.seed}/{self.epoch}/{pass_index}")
        return order_rng.sample(list(work.shards), len(work.shards))


class EpochLoader(DataLoader):
    """A DataLoader that calls ``start_pass(stream)`` (which calls ``stream.start_epoch``) when iteration
    really starts, and ``on_batch(batch, worker, num_read)`` for each batch it yields.

    The start is at the first ``next()``, not at ``iter()``: Lightning creates the iterator before it
    advances the epoch counter when it resumes from an end-of-epoch checkpoint. Workers ignore the
    preemption signals (``ldm.data.workers``); they draw no random numbers from torch's generators.
    """

    def __init__(self, stream: ShardStream, num_workers: int, start_pass: Callable[[ShardStream], None],
                 on_batch: Callable[[dict, int, int], None], on_end: Callable[[], None]) -> None:
        # its own generator: each iterator draws a base seed, which must not shift the global stream the
        # training noise comes from (a resume at an epoch boundary would then draw different noise)
        super().__init__(stream, batch_size=None, num_workers=num_workers, persistent_workers=False,
                         worker_init_fn=init_worker if num_workers > 0 else None,
                         generator=torch.Generator().manual_seed(stream.seed))
        self._start_pass, self._on_batch, self._on_end = start_pass, on_batch, on_end

    def __len__(self) -> int:
        return len(self.dataset)

    def state_dict(self) -> dict:
        """Empty: the data module's state_dict holds the position. Having it says "resumable" to Lightning."""
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        """Nothing: the data module restores the position (``WebDataModule.load_state_dict``)."""

    def __iter__(self) -> Iterator[dict]:
        self._start_pass(self.dataset)
        with signals_blocked(PREEMPTION_SIGNALS if self.num_workers > 0 else ()):
            batches = super().__iter__()  # starts the workers, which inherit the blocked signals
        for batch in batches:
            worker, num_read = (batch.pop(key) for key in BATCH_ORIGIN)
            to_model_ranges(batch)  # in this process: workers ship uint8
            self._on_batch(batch, worker, num_read)
            yield batch
        self._on_end()


class WebDataModule(pl.LightningDataModule):
    """Train / val loaders over WebDataset shards (img2dataset layout) with the batch of docs/architecture.md."""

    def __init__(
        self,
        train_urls: str,
        val_urls: str | None = None,
        resolution: int = 64,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        random_flip: bool = False,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        samples_per_epoch: int | None = None,
        seed: int = 0,
        num_classes: int | None = None,
        degradations: dict | None = None,
        semantic_map: bool = False,
    ) -> None:
        """``num_classes``: the class-conditional model's class count (configs interpolate it from
        ``model.conditioner.num_classes``; train.py derives it from the data when null: preflight.py); samples
        whose ``.cls`` is missing or outside [0, num_classes) are then skipped as corrupt. None: not checked.
        `degradations`: conditions computed from each crop (`lowres`, `mask`: ldm/data/degradations.py);
        `semantic_map`: also read each sample's `{key}.seg.png` label map (shapes writes one)."""
        super().__init__()
        if batch_size < 1 or num_workers < 0 or (samples_per_epoch is not None and samples_per_epoch < 1):
            raise ValueError(f"need batch_size >= 1, num_workers >= 0, samples_per_epoch >= 1 or None; got "
                             f"{batch_size}, {num_workers}, {samples_per_epoch}")
        self.train_urls, self.val_urls = train_urls, val_urls
        self.resolution, self.batch_size = resolution, batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers, self.random_flip, self.shuffle_buffer = num_workers, random_flip, shuffle_buffer
        self.resampled, self.samples_per_epoch, self.seed = resampled, samples_per_epoch, seed
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"data.num_classes must be >= 1 or null, got {num_classes}")
        self.num_classes = num_classes
        self.degradations = build_degradations(degradations, resolution)  # checked here: fail before training
        self.semantic_map = semantic_map
        self.num_skipped = 0  # corrupt samples dropped from the batches this process has yielded
        self._pass: TrainPass | None = None  # the training pass under way (None: none yet)
        self._epoch = 0  # the data epoch of the next pass when no Trainer drives this module
        self._resume: dict | None = None  # a checkpoint's data position, for the next pass
        self._train_decoder: Callable[..., dict] | None = None  # set by read_train_from

    def read_train_from(self, urls: str, decode: Callable[..., dict]) -> None:
        """Train on other shards of the same samples (their cached latents: ldm/data/latent_cache.py); val stays."""
        self.train_urls, self._train_decoder = urls, decode

    def train_dataloader(self) -> EpochLoader:
        length = (self.samples_per_epoch, self.resampled)
        return self._loader(self.train_urls, self.batch_size, train=True, length=length)

    def val_dataloader(self) -> EpochLoader | list:
        if not self.val_urls:
            return []
        return self._loader(self.val_urls, self.val_batch_size, train=False, length=(None, False))

    def set_epoch(self, epoch: int) -> None:
        """Epoch of the next training pass when no Trainer drives this module."""
        self._epoch, self._pass, self._resume = epoch, None, None

    def state_dict(self) -> dict[str, int | list | None]:
        """The data position: epoch, training batches consumed in it and, per rank, the raw samples each worker
        read for them (``samples_read[rank][worker]``; ranks meet different corrupt samples). Enough to resume
        exactly from any checkpoint: mid-epoch, at a preemption, after ``fit`` ended. Under DDP a collective,
        as Lightning builds checkpoints on every rank."""
        position = self._position()
        position["samples_read"] = values_of_every_rank(position["samples_read"])
        return position

    def load_state_dict(self, state_dict: dict[str, int | list | None]) -> None:
        rank, world_size = distributed_rank_and_world_size()
        per_rank = state_dict.get("samples_read")  # absent in checkpoints written before it was recorded
        reads = per_rank[rank] if per_rank is not None and len(per_rank) == world_size else None
        self._resume = {"epoch": int(state_dict["epoch"]), "batches_consumed": int(state_dict["batches_consumed"]),
                        "samples_read": None if reads is None else [int(n) for n in reads]}

    def _position(self) -> dict[str, int | list[int] | None]:
        """This rank's data position (``samples_read``: per worker of this rank)."""
        if self._resume is not None:  # loaded and not started yet: still where the checkpoint left off
            return dict(self._resume)
        if self._pass is None:
            return {"epoch": self._epoch, "batches_consumed": 0, "samples_read": None}
        trainer = self._trainer_or_none()
        if trainer is None:
            return self._pass.position(self._pass.yielded)
        # the batches whose training step ran (the loader may have fetched further)
        return self._pass.position(self._pass.start + self._trainer_processed(trainer) - self._pass.trainer_base)

    def _loader(self, urls: str, batch_size: int, train: bool, length: tuple[int | None, bool]) -> EpochLoader:
        shard_urls = expand_urls(urls)
        missing = [url for url in shard_urls if is_local(url) and not os.path.exists(url)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} of {len(shard_urls)} shards of {urls!r} do not exist, e.g. "
                                    f"{missing[0]}; check the pattern (or run prepare_data / data/make_shards.py)")
        rank, world_size = distributed_rank_and_world_size()
        samples_per_epoch, resampled = length
        counts = None if samples_per_epoch is not None else shard_sample_counts(shard_urls)
        if counts is not None and sum(counts) == 0:
            raise ValueError(f"{'train' if train else 'val'} shards {urls!r} hold no readable sample "
                             f"({len(shard_urls)} shard(s), empty or not tar files): nothing to train on. Check "
                             f"them with `python data/inspect_shards.py '{urls}'`.")
        plan = plan_shards(counts, len(shard_urls), world_size, self.num_workers, batch_size,
                           samples_per_epoch=samples_per_epoch, resampled=resampled)
        notes = plan.warnings + (plan.notes if train else ())  # fewer val workers is no news worth a warning
        for note in notes if rank == 0 else ():  # every rank has the same plan: say it once
            warnings.warn(f"{'train' if train else 'val'} shards {urls}: {note}", UserWarning, stacklevel=3)
        stream = ShardStream(shard_urls, plan, rank, self.sample_decoder(train), batch_size,
                             shuffle_buffer=self.shuffle_buffer if train else 0, seed=self.seed)
        workers = plan.num_workers if self.num_workers > 0 else 0
        if train:
            return EpochLoader(stream, workers, self._start_train_pass, self._count_train_batch, self._end_train_pass)
        return EpochLoader(stream, workers, lambda s: s.start_epoch(0, 0), self._count_skipped, lambda: None)

    def sample_decoder(self, train: bool) -> Callable[..., dict]:
        """``decode(raw, epoch=...)`` -> batch row; subclasses reading other fields override it."""
        if train and self._train_decoder is not None:
            return self._train_decoder
        transform = ImageTransform(self.resolution, random_crop=train, random_flip=train and self.random_flip)
        return functools.partial(decode_sample, transform=transform, seed=self.seed, num_classes=self.num_classes,
                                 degradations=self.degradations, semantic_map=self.semantic_map)

    def _start_train_pass(self, stream: ShardStream) -> None:
        """Which data epoch this pass reads, from which batch: a checkpoint's position; else, under a Trainer,
        the rest of the previous pass's epoch if Lightning ended that one early, or the next epoch.

        The data stream thus depends only on the batches trained, not on Lightning's epoch counter, which
        does not follow the data after a restart: ``fit`` stopped by ``max_steps`` mid-epoch counts the epoch
        as done (a continuation runs its remaining batches as the next epoch), and a run resumed from a
        checkpoint written after its epoch ended runs one batch as an epoch of its own."""
        trainer = self._trainer_or_none()
        previous = self._pass
        if self._resume is not None:
            resume, self._resume = self._resume, None
            epoch, start, reads = resume["epoch"], resume["batches_consumed"], resume["samples_read"]
        elif trainer is None or previous is None:
            epoch, start, reads = (self._epoch if trainer is None else trainer.current_epoch), 0, None
        elif previous.yielded < previous.length and trainer.num_training_batches >= previous.length:
            # (not cut short by limit_train_batches): continue it
            epoch, start, reads = previous.epoch, previous.yielded, previous.position(previous.yielded)["samples_read"]
        else:
            epoch, start, reads = previous.epoch + 1, 0, None
        if start >= len(stream):  # saved at the end of its epoch: the next one starts
            epoch, start, reads = epoch + 1, 0, None
        start_reads = stream.start_epoch(epoch, start, reads)
        base = self._trainer_processed(trainer) if trainer is not None else 0
        self._pass = TrainPass(epoch, start, len(stream), start_reads, trainer_base=base)

    def _count_train_batch(self, batch: dict, worker: int, num_read: int) -> None:
        self._pass.reads.append((worker, num_read))
        self._count_skipped(batch, worker, num_read)

    def _count_skipped(self, batch: dict, worker: int, num_read: int) -> None:
        self.num_skipped += batch["num_skipped"]

    def _end_train_pass(self) -> None:
        self._epoch = self._pass.epoch + 1

    @staticmethod
    def _trainer_processed(trainer: pl.Trainer) -> int:
        return trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def _trainer_or_none(self) -> pl.Trainer | None:
        return getattr(self, "trainer", None)


class ShapesDataModule(WebDataModule):
    """The built-in shapes data set (written once under ``root`` by ``prepare_data``) as a WebDataModule."""

    def __init__(self, root: str, resolution: int = 64, num_train: int = 10000, num_val: int = 1000,
                 num_objects: int = 1, seed: int = 0, samples_per_shard: int = 1000, **loader_args) -> None:
        urls = shapes_urls(root, num_train, num_val, samples_per_shard)
        super().__init__(urls["train"], urls["val"], resolution=resolution, seed=seed, **loader_args)
        self.shapes_args = {"root": root, "resolution": resolution, "num_train": num_train, "num_val": num_val,
                            "num_objects": num_objects, "seed": seed, "samples_per_shard": samples_per_shard}

    def class_count(self) -> tuple[int, str]:  # known (the shards exist only after prepare_data): not scanned
        return NUM_CLASSES, "the built-in shapes data set (colour x shape)"

    def prepare_data(self) -> None:
        write_shapes(**self.shapes_args)


def _shuffled(samples: Iterator[dict], buffer_size: int, rng: random.Random) -> Iterator[dict]:
    """Shuffle a stream through a buffer of ``buffer_size`` samples (no-op for sizes <= 1)."""
    if buffer_size <= 1:
        yield from samples
        return
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        index = rng.randrange(buffer_size)
        yield buffer[index]
        buffer[index] = sample
    rng.shuffle(buffer)
    yield from buffer
