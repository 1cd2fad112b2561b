"""Summarise a shard set and draw a contact sheet of its first images.

    python data/inspect_shards.py 'shards/train-{000000..000009}.tar' --sheet sheet.png

Prints the shard and sample counts, image sizes, caption lengths, class labels and how many samples the
loader would skip as corrupt (same checks as training), then writes a grid of thumbnails.
"""
from __future__ import annotations

import argparse
import io
import statistics
from collections import Counter

from PIL import Image

from ldm.data.shards import expand_urls, iter_raw_samples
from ldm.data.transforms import (
    IMAGE_EXTENSIONS,
    CorruptSample,
    ImageTransform,
    decode_sample,
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("urls", help="brace pattern of the shards (quote it in the shell)")
    parser.add_argument("--sheet", default="contact_sheet.png", help="where to write the contact sheet")
    parser.add_argument("--sheet-size", type=int, default=8, help="thumbnails per row and column")
    parser.add_argument("--thumb", type=int, default=96, help="thumbnail side in pixels")
    parser.add_argument("--limit", type=int, default=None, help="stop after this many samples")
    args = parser.parse_args(argv)
    urls = expand_urls(args.urls)
    summary, thumbnails = inspect(urls, args.limit, args.sheet_size ** 2, args.thumb)
    print(format_summary(len(urls), summary))
    contact_sheet(thumbnails, args.sheet_size, args.thumb).save(args.sheet)
    print(f"contact sheet: {args.sheet}")


def inspect(urls: list[str], limit: int | None, num_thumbnails: int, thumb: int) -> tuple[dict, list]:
    """Read every sample (up to ``limit``); collect statistics and the first thumbnails."""
    read_errors: list[Exception] = []
    summary = {"samples": 0, "corrupt": 0, "sizes": [], "caption_words": [], "classes": Counter(), "formats": Counter()}
    transform = ImageTransform(thumb, random_crop=False, random_flip=False)
    thumbnails = []
    for raw in iter_raw_samples(urls, on_error=read_errors.append):
        if limit is not None and summary["samples"] >= limit:
            break
        summary["samples"] += 1
        try:
            row = decode_sample(raw, transform, seed=0, epoch=0)
        except CorruptSample:
            summary["corrupt"] += 1
            continue
        ext = next(e for e in IMAGE_EXTENSIONS if e in raw)
        summary["formats"][ext] += 1
        summary["sizes"].append(Image.open(io.BytesIO(raw[ext])).size)
        summary["caption_words"].append(len(row["caption"].split()))
        summary["classes"][row["class_label"]] += 1
        if len(thumbnails) < num_thumbnails:
            thumbnails.append(row["image"])
    summary["read_errors"] = len(read_errors)
    return summary, thumbnails


def format_summary(num_shards: int, s: dict) -> str:
    lines = [f"shards: {num_shards}", f"samples: {s['samples']} ({s['corrupt']} corrupt, "
             f"{s['read_errors']} shard read errors)"]
    if s["sizes"]:
        widths, heights = zip(*s["sizes"])
        lines.append(f"formats: {dict(s['formats'])}")
        for name, values in (("width", widths), ("height", heights), ("caption words", s["caption_words"])):
            lines.append(f"{name}: min {min(values)}, median {statistics.median(values):g}, "
                         f"mean {statistics.fmean(values):.1f}, max {max(values)}")
        lines.append(f"empty captions: {s['caption_words'].count(0)}")
        labelled = {k: v for k, v in s["classes"].items() if k >= 0}
        lines.append(f"class labels: {len(labelled)} distinct over {sum(labelled.values())} samples"
                     if labelled else "class labels: none")
    return "\n".join(lines)


def contact_sheet(thumbnails: list, size: int, thumb: int) -> Image.Image:
    """A size x size grid of (3, T, T) uint8 tensors; empty cells stay black."""
    sheet = Image.new("RGB", (size * thumb, size * thumb))
    for i, image in enumerate(thumbnails):
        sheet.paste(Image.fromarray(image.permute(1, 2, 0).numpy()), ((i % size) * thumb, (i // size) * thumb))
    return sheet


if __name__ == "__main__":
    main()
