"""Turn a folder of images into WebDataset shards in the img2dataset layout.

    python data/make_shards.py photos/ shards/ --samples-per-shard 1000 --val-fraction 0.05

Each image becomes ``{key}.{jpg|png|webp}`` (bytes copied, not re-encoded), ``{key}.txt`` (the caption from
a same-named ``.txt`` beside the image, empty if none), ``{key}.json`` (source path, size) and, with
``--classes-from-dirs``, ``{key}.cls`` (index of the parent folder in sorted order; the folders are listed in
``classes.json``). Writes ``train-NNNNNN.tar`` / ``val-NNNNNN.tar`` plus ``sizes.json`` and prints the brace URLs.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections.abc import Iterator

from PIL import Image

from ldm.data.shards import update_sizes, write_classes, write_shard

EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    images = find_images(args.input_dir)
    if not images:
        sys.exit(f"no .jpg/.jpeg/.png/.webp images under {args.input_dir}")
    folders = sorted({os.path.dirname(p) for p in images})
    classes = {folder: index for index, folder in enumerate(folders)} if args.classes_from_dirs else None
    random.Random(args.seed).shuffle(images)
    num_val = round(len(images) * args.val_fraction)
    os.makedirs(args.output_dir, exist_ok=True)
    for split, paths in (("train", images[num_val:]), ("val", images[:num_val])):
        if paths:
            urls = write_split(paths, split, args, classes)
            print(f"{split}: {len(paths)} images -> {urls}")
    if classes is not None:  # the class count train.py reads (model.conditioner.num_classes=null)
        write_classes(args.output_dir, [os.path.relpath(folder, args.input_dir) for folder in folders])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input_dir", help="folder searched recursively for images")
    parser.add_argument("output_dir", help="folder for the tar shards")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--val-fraction", type=float, default=0.0, help="share of images for val shards")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffle before the split")
    parser.add_argument("--classes-from-dirs", action="store_true", help="write .cls from the parent folder")
    args = parser.parse_args(argv)
    if args.samples_per_shard < 1 or not 0 <= args.val_fraction < 1:
        parser.error("--samples-per-shard must be >= 1 and --val-fraction in [0, 1)")
    return args


def find_images(root: str) -> list[str]:
    """Image paths under ``root``, sorted (so the shards do not depend on directory listing order)."""
    found = []
    for directory, _, names in os.walk(root):
        found += [os.path.join(directory, n) for n in names if os.path.splitext(n)[1].lower() in EXTENSIONS]
    return sorted(found)


def write_split(paths: list[str], split: str, args: argparse.Namespace, classes: dict[str, int] | None) -> str:
    """Write one split's shards; return their brace URL."""
    sizes = {}
    shard_starts = range(0, len(paths), args.samples_per_shard)
    for shard, start in enumerate(shard_starts):
        name = f"{split}-{shard:06d}.tar"
        chunk = paths[start:start + args.samples_per_shard]
        samples = encoded_samples(chunk, start, args.input_dir, classes)
        sizes[name] = write_shard(os.path.join(args.output_dir, name), samples)
    update_sizes(args.output_dir, sizes)
    return f"{args.output_dir}/{split}-{{000000..{len(shard_starts) - 1:06d}}}.tar"


def encoded_samples(paths: list[str], first_index: int, root: str,
                    classes: dict[str, int] | None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Samples of one shard; unreadable images are reported and left out."""
    for index, path in enumerate(paths, start=first_index):
        try:
            with Image.open(path) as image:
                width, height = image.size
                image.verify()
        except (OSError, SyntaxError) as exn:
            print(f"skipping unreadable image {path}: {exn}", file=sys.stderr)
            continue
        caption_path = os.path.splitext(path)[0] + ".txt"
        caption = open(caption_path, encoding="utf-8").read().strip() if os.path.exists(caption_path) else ""
        fields = {
            EXTENSIONS[os.path.splitext(path)[1].lower()]: open(path, "rb").read(),
            "txt": caption.encode(),
            "json": json.dumps({"source": os.path.relpath(path, root), "width": width, "height": height,
                                "caption": caption}, sort_keys=True).encode(),
        }
        if classes is not None:
            fields["cls"] = str(classes[os.path.dirname(path)]).encode()
        yield f"{index:09d}", fields


if __name__ == "__main__":
    main()
