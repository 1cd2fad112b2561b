"""Data pipeline throughput: images/s through read + decode + augment + collate, by worker count.

Contenders, on the same shards (built-in shapes PNGs drawn at 1.25x the resolution so that the resize runs,
8 shards per resolution, written once to a temp dir):
- ``raw tar read``: reading the tar bytes and grouping them into samples, nothing decoded (the ceiling);
- ``webdataset stock``: the peer, webdataset's own pipeline (``WebDataset -> decode("pil") -> map ->
  batched``) with the same resize / crop / to-tensor transform, in the main process;
- ``ldm, N workers``: ``WebDataModule.train_dataloader()`` with 0, 1 and 2 workers (random crop and flip,
  shuffle buffer), epoch after epoch, worker start-up included as a real epoch pays it.

One torch thread per process; contenders alternate in rounds and the median epoch is reported.

    python benchmarks/dataloader.py [--rounds 3] [--samples 1024 512] [--resolutions 64 256]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import webdataset as wds

from ldm.data.shapes import write_shapes
from ldm.data.shards import expand_urls, iter_raw_samples
from ldm.data.transforms import ImageTransform, collate, uint8_to_signed
from ldm.data.webdataset import WebDataModule

BATCH_SIZE = 32
NUM_SHARDS = 8
RESULTS = Path(__file__).parent / "results" / "dataloader.json"


def raw_read(urls: str) -> Callable[[], int]:
    def run() -> int:
        return sum(1 for _ in iter_raw_samples(expand_urls(urls), on_error=lambda exn: None))
    return run


def webdataset_stock(urls: str, resolution: int) -> Callable[[], int]:
    transform = ImageTransform(resolution, random_crop=True, random_flip=True)

    def to_row(sample: dict) -> dict:
        rng = random.Random(sample["__key__"])
        return {"image": uint8_to_signed(transform(sample["png"], rng)), "caption": sample["txt"],
                "class_label": int(sample["cls"]), "key": sample["__key__"]}

    def run() -> int:
        pipeline = (wds.WebDataset(urls, shardshuffle=False, empty_check=False).shuffle(1000)
                    .decode("pil").map(to_row).batched(BATCH_SIZE, collation_fn=lambda rows: collate(rows, 0)))
        return sum(len(batch["key"]) for batch in pipeline)
    return run


def ours(urls: str, resolution: int, workers: int) -> Callable[[], int]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loader = WebDataModule(urls, resolution=resolution, batch_size=BATCH_SIZE, num_workers=workers,
                               random_flip=True).train_dataloader()
    return lambda: sum(len(batch["key"]) for batch in loader)


def measure(contenders: dict[str, Callable[[], int]], rounds: int) -> dict[str, float]:
    """Median images/s per contender, contenders alternating in each round."""
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    for name, run in contenders.items():  # warm-up: page cache, imports
        run()
    for _ in range(rounds):
        for name, run in contenders.items():
            start = time.perf_counter()
            images = run()
            rates[name].append(images / (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--samples", type=int, nargs="+", default=[1024, 512], help="samples per resolution")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {"threads": 1, "batch_size": BATCH_SIZE, "cpu_count": os.cpu_count(), "rounds": args.rounds,
               "images_per_second": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for resolution, samples in zip(args.resolutions, args.samples, strict=True):
            root = os.path.join(tmp, f"shapes_{resolution}")
            urls = write_shapes(root, resolution=resolution * 5 // 4, num_train=samples, num_val=0,
                                samples_per_shard=samples // NUM_SHARDS)["train"]
            contenders = {"raw tar read": raw_read(urls),
                          "webdataset stock (0 workers)": webdataset_stock(urls, resolution)}
            contenders |= {f"ldm ({w} workers)": ours(urls, resolution, w) for w in args.workers}
            results["images_per_second"][f"{resolution}px"] = measure(contenders, args.rounds)
    print_table(results["images_per_second"])
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1))
    print(f"wrote {RESULTS}")


def print_table(rates: dict[str, dict[str, float]]) -> None:
    columns = list(rates)
    print(f"| contender | {' | '.join(f'{c} img/s' for c in columns)} |")
    print(f"|---|{'---:|' * len(columns)}")
    for name in rates[columns[0]]:
        print(f"| {name} | {' | '.join(f'{rates[c][name]:,.0f}' for c in columns)} |")


if __name__ == "__main__":
    main()
