"""A small class-labelled data set as WebDataset shards: handwriting-style digits 0-9 at 32 px (README "Your own data").

    python data/make_digits.py digits/ --num-train 2000 --num-val 200

With scikit-learn installed, the images are its `load_digits()` scans (1,797 8x8 images, 16 grey levels) upscaled
to 32 px and drawn in a random colour; without it (or with `--source rendered`), each digit is drawn with Pillow's
built-in font at a random size, position, stroke width, rotation and colour. Each sample: ``{key}.png``,
``{key}.cls`` (the digit), ``{key}.txt`` ("the digit 3"), ``{key}.json``. Writes ``train-NNNNNN.tar`` /
``val-NNNNNN.tar``, ``sizes.json`` and ``classes.json`` (10 classes: what `model.conditioner.num_classes=null`
reads) with the project's shard writer (``ldm.data.shards``), and prints the brace URLs to train on.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
from collections.abc import Iterator

from PIL import Image, ImageDraw, ImageFont

from ldm.data.shards import update_sizes, write_classes, write_shard

NUM_DIGITS = 10


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    source = args.source
    if source == "auto":
        try:
            import sklearn.datasets  # noqa: F401 - only to know whether it is there
            source = "sklearn"
        except ImportError:
            source = "rendered"
    draw = sklearn_digits() if source == "sklearn" else render_digit
    os.makedirs(args.output_dir, exist_ok=True)
    rng = random.Random(args.seed)
    for split, count in (("train", args.num_train), ("val", args.num_val)):
        if count:
            urls = write_split(args.output_dir, split, count, args.samples_per_shard, draw, rng, args.resolution)
            print(f"{split}: {count} images ({source}) -> {urls}")
    write_classes(args.output_dir, [str(digit) for digit in range(NUM_DIGITS)])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", help="folder for the tar shards")
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-val", type=int, default=200)
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--source", choices=("auto", "sklearn", "rendered"), default="auto",
                        help="auto: scikit-learn's digits if it is installed, else rendered ones")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if min(args.num_train, args.samples_per_shard, args.resolution) < 1 or args.num_val < 0:
        parser.error("--num-train, --samples-per-shard and --resolution must be >= 1, --num-val >= 0")
    return args


def render_digit(digit: int, rng: random.Random, resolution: int) -> Image.Image:
    """One digit in a random colour on a dark background, random size / place / stroke / rotation."""
    big = resolution * 4  # drawn at 4x and downsampled: smooth edges
    canvas = Image.new("L", (big, big), 0)
    font = ImageFont.load_default(size=int(big * rng.uniform(0.55, 0.8)))
    draw = ImageDraw.Draw(canvas)
    stroke = rng.randint(0, big // 32)
    left, top, right, bottom = draw.textbbox((0, 0), str(digit), font=font, stroke_width=stroke)
    margin = big // 10  # room for the rotation: the digit stays whole
    x = rng.uniform(margin, max(margin, big - margin - (right - left))) - left
    y = rng.uniform(margin, max(margin, big - margin - (bottom - top))) - top
    draw.text((x, y), str(digit), fill=255, font=font, stroke_width=stroke, stroke_fill=255)
    mask = canvas.rotate(rng.uniform(-15, 15), resample=Image.BILINEAR).resize((resolution, resolution), Image.BOX)
    return _colourise(mask, rng)


def sklearn_digits():
    """`draw(digit, rng, resolution)` over scikit-learn's digit scans (a random scan of that digit)."""
    from sklearn.datasets import (
        load_digits,  # optional dependency: imported only when chosen
    )

    data = load_digits()
    by_digit = {d: [image for image, target in zip(data.images, data.target) if target == d] for d in range(NUM_DIGITS)}

    def draw(digit: int, rng: random.Random, resolution: int) -> Image.Image:
        scan = rng.choice(by_digit[digit])  # 8x8, values 0..16
        mask = Image.fromarray((scan * (255 / 16)).astype("uint8"), mode="L")
        return _colourise(mask.resize((resolution, resolution), Image.BICUBIC), rng)

    return draw


def _colourise(mask: Image.Image, rng: random.Random) -> Image.Image:
    colour = tuple(rng.randint(96, 255) for _ in range(3))
    background = Image.new("RGB", mask.size, tuple(rng.randint(0, 40) for _ in range(3)))
    return Image.composite(Image.new("RGB", mask.size, colour), background, mask)


def write_split(directory: str, split: str, count: int, per_shard: int, draw, rng: random.Random,
                resolution: int) -> str:
    sizes = {}
    starts = range(0, count, per_shard)
    for shard, start in enumerate(starts):
        name = f"{split}-{shard:06d}.tar"
        samples = _samples(range(start, min(start + per_shard, count)), split, draw, rng, resolution)
        sizes[name] = write_shard(os.path.join(directory, name), samples)
    update_sizes(directory, sizes)
    return f"{directory.rstrip('/')}/{split}-{{000000..{len(starts) - 1:06d}}}.tar"


def _samples(indices: range, split: str, draw, rng: random.Random, resolution: int
             ) -> Iterator[tuple[str, dict[str, bytes]]]:
    for index in indices:
        digit = index % NUM_DIGITS  # balanced classes
        buffer = io.BytesIO()
        draw(digit, rng, resolution).save(buffer, format="PNG")
        yield f"{split}{index:07d}", {
            "png": buffer.getvalue(), "cls": str(digit).encode(), "txt": f"the digit {digit}".encode(),
            "json": json.dumps({"digit": digit}).encode(),
        }


if __name__ == "__main__":
    main()
