"""Shard I/O: expand brace URLs, write reproducible tar shards, count samples, stream raw samples.

Shards follow the img2dataset layout: one tar member per field, ``{key}.{ext}``, members of one sample
adjacent. Per-shard sample counts live in ``sizes.json`` beside the shards (our writers create it);
img2dataset's ``{shard}_stats.json`` is read too, and local tars without either are scanned. The class count of
a class-labelled set (``{key}.cls``) lives in ``classes.json`` (``{"num_classes": N, "names": [...]}``) beside
them (data/make_shards.py --classes-from-dirs writes it); without it the labels of local shards are scanned.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
import warnings
from collections.abc import Callable, Iterable, Iterator

import webdataset as wds
from webdataset.shardlists import expand_urls as _wds_expand_urls

from ldm.utils.files import write_atomic

SIZES_FILE = "sizes.json"
CLASSES_FILE = "classes.json"
CLASS_FIELD = "cls"


def expand_urls(urls: str) -> list[str]:
    """Brace-expand a shard pattern (``data/{000..009}.tar``; ``::`` joins several patterns)."""
    expanded = _wds_expand_urls(urls)
    if not expanded:
        raise ValueError(f"shard pattern {urls!r} expands to no shard; expected e.g. 'dir/{{000000..000009}}.tar'")
    return expanded


def is_local(url: str) -> bool:
    """Whether a shard URL names a local file (not ``pipe:``, ``http://``, ``s3://`` ...)."""
    return "://" not in url and not url.startswith("pipe:")


def write_shard(path: str, samples: Iterable[tuple[str, dict[str, bytes]]]) -> int:
    """Write ``(key, {ext: bytes})`` samples to a tar at ``path``; return the sample count.

    Member headers carry no time, owner or mode of the writing machine, so the same samples always give a
    byte-identical shard. The tar is written to a temporary name and renamed, so readers never see half a
    shard.
    """
    count = 0

    def write(file) -> None:
        nonlocal count
        with tarfile.open(fileobj=file, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for key, fields in samples:
                if "." in key or "/" in key:
                    raise ValueError(f"sample key {key!r} must not contain '.' or '/' (they separate key and field)")
                for ext, data in fields.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime, info.mode = len(data), 0, 0o444
                    tar.addfile(info, io.BytesIO(data))
                count += 1

    write_atomic(path, write)
    return count


def update_sizes(directory: str, counts: dict[str, int]) -> None:
    """Merge ``{shard file name: sample count}`` into ``directory/sizes.json``."""
    sizes_path = os.path.join(directory, SIZES_FILE)
    sizes = _read_json(sizes_path) or {}
    sizes.update(counts)
    text = json.dumps(dict(sorted(sizes.items())), indent=1)
    write_atomic(sizes_path, lambda file: file.write(text.encode()))


def write_classes(directory: str, names: list[str]) -> None:
    """``directory/classes.json``: the class count (and names, index order) of the shards' ``.cls`` labels."""
    text = json.dumps({"num_classes": len(names), "names": list(names)}, indent=1)
    write_atomic(os.path.join(directory, CLASSES_FILE), lambda file: file.write(text.encode()))


def shard_class_count(urls: list[str]) -> tuple[int | None, str]:
    """(number of classes, where it came from) of the shards' ``.cls`` labels: ``classes.json`` beside them, else
    the largest label + 1 of a scan of local shards (headers and the small ``.cls`` members only). None: no
    ``classes.json`` and no label found (or remote shards, which are not scanned)."""
    for directory in dict.fromkeys(os.path.dirname(url) for url in urls):
        meta = _read_json(os.path.join(directory, CLASSES_FILE))
        if meta and "num_classes" in meta:
            return int(meta["num_classes"]), os.path.join(directory, CLASSES_FILE)
    if not all(is_local(url) for url in urls):
        return None, f"no {CLASSES_FILE} beside the (remote) shards"
    labels: set[int] = set()
    for url in urls:
        labels |= _scan_labels(url)
    if not labels:
        return None, f"no {CLASSES_FILE} and no .{CLASS_FIELD} label in {len(urls)} shard(s)"
    return max(labels) + 1, (f"a scan of the .{CLASS_FIELD} labels of {len(urls)} shard(s): {len(labels)} distinct, "
                             f"{min(labels)}..{max(labels)}")


def shard_sample_counts(urls: list[str]) -> list[int]:
    """Number of samples in each shard, from ``sizes.json``, ``*_stats.json`` or by scanning the tar."""
    sizes_by_dir: dict[str, dict] = {}
    counts = []
    for url in urls:
        directory, name = os.path.split(url)
        if directory not in sizes_by_dir:
            sizes_by_dir[directory] = _read_json(os.path.join(directory, SIZES_FILE)) or {}
        if name in sizes_by_dir[directory]:
            counts.append(int(sizes_by_dir[directory][name]))
            continue
        stats = _read_json(os.path.join(directory, name.rsplit(".", 1)[0] + "_stats.json"))
        counts.append(int(stats["successes"]) if stats and "successes" in stats else _scan_count(url))
    return counts


def iter_raw_samples(urls: Iterable[str], on_error: Callable[[Exception], None]) -> Iterator[dict]:
    """Undecoded samples (``{"__key__", "__url__", ext: bytes}``) of the shards, in order.

    A read error (missing shard, truncated tar) is passed to ``on_error`` and reading goes on with the next
    shard, so one bad file never stops training.
    """

    def handler(exn: Exception) -> bool:
        on_error(exn)
        return True

    yield from wds.tarfile_samples(({"url": url} for url in urls), handler=handler)


def _scan_count(url: str) -> int:
    """Count sample keys of one shard by reading its member headers (local) or streaming it (remote)."""
    if is_local(url):
        keys = set()
        try:
            with tarfile.open(url, "r:") as tar:
                for member in tar:  # headers only: tarfile seeks over the member data of a local file
                    keys.add(member.name.split(".", 1)[0])
        except (tarfile.TarError, OSError):
            pass  # a truncated shard counts the samples it still has
        return len(keys)
    warnings.warn(
        f"no sample count for {url}: streaming the whole shard to count it. Write a {SIZES_FILE} "
        "({shard name: count}) beside the shards to skip this.",
        stacklevel=3,
    )
    return sum(1 for _ in iter_raw_samples([url], on_error=lambda exn: None))


def _scan_labels(path: str) -> set[int]:
    """The integer ``.cls`` labels of one local shard (unreadable ones and -1, "no class", are left out)."""
    labels: set[int] = set()
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if member.name.rsplit(".", 1)[-1] == CLASS_FIELD and (file := tar.extractfile(member)) is not None:
                    try:
                        labels.add(int(file.read().decode().strip()))
                    except (UnicodeDecodeError, ValueError):
                        continue  # the loader skips (and counts) such samples
    except (tarfile.TarError, OSError):
        pass
    labels.discard(-1)
    return {label for label in labels if label >= 0}


def _read_json(path: str) -> dict | None:
    try:
        with wds.gopen(path, "rb") as f:
            return json.load(f)
    except Exception:  # noqa: BLE001 - metadata is optional; gopen's pipes raise assorted errors
        return None
