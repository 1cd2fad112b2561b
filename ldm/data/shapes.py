"""The built-in ``shapes`` data set: coloured circles, squares and triangles on a dark background.

Small enough to train on a CPU, rich enough to test conditioning: every caption ("a red circle at the top
left") names colour, shape and 3x3 grid cell, and the first object gives a class label (colour x shape).
Every sample also carries a per-pixel semantic map (`{key}.seg.png`, 8-bit grey: 0 background, each object's
class + 1) for semantic synthesis (LDM paper, Sec. 4.3.2). Everything is drawn from one seeded generator, so a
seed gives byte-identical shards; the map takes no random draw, so images are those of earlier versions.
"""
from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageDraw

from ldm.data.shards import SIZES_FILE, update_sizes, write_shard

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 20),
    "green": (20, 200, 20),
    "blue": (30, 60, 230),
    "yellow": (230, 220, 20),
    "magenta": (220, 30, 220),
    "cyan": (20, 210, 220),
    "white": (235, 235, 235),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right",
)  # row-major 3x3 grid cells
NUM_CLASSES = len(COLORS) * len(SHAPES)
ATTRIBUTES: dict[str, tuple[str, ...]] = {"color": tuple(COLORS), "shape": SHAPES, "position": POSITIONS}
_OBJECT_PATTERN = re.compile("an? ({}) ({}) at the ({})".format(
    *("|".join(sorted(values, key=len, reverse=True)) for values in ATTRIBUTES.values())))

MAX_BACKGROUND_GRAY = 48
SIZE_RANGE = (0.15, 0.25)  # object side as a fraction of the image side
SUPERSAMPLING = 4  # draw at 4x and box-downsample: anti-aliased edges, exact colours inside
META_FILE = "shapes_meta.json"
SEMANTIC_MAP_FIELD = "seg.png"  # shard field of the semantic map
NUM_SEMANTIC_CLASSES = NUM_CLASSES + 1  # background 0, object class c as c + 1
FORMAT_VERSION = 2  # 2: shards carry the semantic map (older caches are rewritten once, same images)


def class_index(color: str, shape: str) -> int:
    """Class label of a (colour, shape) pair: colour index * 3 + shape index."""
    if color not in COLORS or shape not in SHAPES:
        raise ValueError(f"unknown colour/shape {color!r}/{shape!r}; colours: {list(COLORS)}, shapes: {SHAPES}")
    return list(COLORS).index(color) * len(SHAPES) + SHAPES.index(shape)


def render_sample(rng: np.random.Generator, resolution: int = 64, num_objects: int = 1) -> tuple[Image.Image, dict]:
    """Draw one image with ``num_objects`` objects in distinct grid cells; return it and its attributes."""
    image, attributes, _ = render_sample_with_map(rng, resolution, num_objects, with_map=False)
    return image, attributes


def render_sample_with_map(
    rng: np.random.Generator, resolution: int = 64, num_objects: int = 1, with_map: bool = True
) -> tuple[Image.Image, dict, Image.Image | None]:
    """`render_sample` plus its semantic map: an "L" image, 0 on the background and ``class_index + 1`` on
    the pixels an object covers at least half of (the same supersampled geometry as the colours)."""
    if not 1 <= num_objects <= 2:
        raise ValueError(f"num_objects must be 1 or 2, got {num_objects}")
    if resolution < 12:
        raise ValueError(f"resolution must be at least 12 pixels to draw recognisable shapes, got {resolution}")
    big = resolution * SUPERSAMPLING
    gray = int(rng.integers(0, MAX_BACKGROUND_GRAY + 1))
    canvas = Image.new("RGB", (big, big), (gray, gray, gray))
    draw = ImageDraw.Draw(canvas)
    semantic = np.zeros((resolution, resolution), dtype=np.uint8) if with_map else None
    cells = rng.choice(len(POSITIONS), size=num_objects, replace=False)
    objects = []
    for cell in cells:
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        color = list(COLORS)[int(rng.integers(len(COLORS)))]
        outline = _object_outline(rng, int(cell), shape, resolution)
        _draw_outline(draw, shape, outline, COLORS[color])
        if semantic is not None:
            semantic[_coverage(shape, outline, big, resolution) >= 128] = class_index(color, shape) + 1
        objects.append({"shape": shape, "color": color, "position": POSITIONS[int(cell)]})
    image = canvas.resize((resolution, resolution), Image.Resampling.BOX)
    caption = caption_of(objects)
    attributes = {
        "caption": caption,
        "objects": objects,
        "class_label": class_index(objects[0]["color"], objects[0]["shape"]),
    }
    return image, attributes, Image.fromarray(semantic, mode="L") if semantic is not None else None


def caption_of(objects: list[dict[str, str]]) -> str:
    """The caption grammar: "a {color} {shape} at the {position}", objects joined by " and "."""
    return " and ".join(f"a {o['color']} {o['shape']} at the {o['position']}" for o in objects)


def parse_caption_objects(caption: str) -> list[dict[str, str]]:
    """The objects (color, shape, position) a shapes caption names; ValueError if it is not one."""
    parts = caption.strip().lower().split(" and ")
    matches = [_OBJECT_PATTERN.fullmatch(part) for part in parts]
    if not all(matches):
        raise ValueError(
            f"caption {caption!r} is not a shapes caption 'a {{color}} {{shape}} at the {{position}}' with color "
            f"in {ATTRIBUTES['color']}, shape in {ATTRIBUTES['shape']}, position in {ATTRIBUTES['position']}."
        )
    return [dict(zip(ATTRIBUTES, match.groups())) for match in matches]


def swap_attribute(caption: str, attribute: str, rng: np.random.Generator) -> str:
    """The caption with `attribute` of every object replaced by another value drawn uniformly (never the
    same one): the counterfactual prompt of the caption-sensitivity diagnostic."""
    if attribute not in ATTRIBUTES:
        raise ValueError(f"unknown attribute {attribute!r}; choose one of {', '.join(ATTRIBUTES)}")
    objects = parse_caption_objects(caption)
    for obj in objects:
        others = [value for value in ATTRIBUTES[attribute] if value != obj[attribute]]
        obj[attribute] = others[int(rng.integers(len(others)))]
    return caption_of(objects)


def write_shapes(
    root: str,
    resolution: int = 64,
    num_train: int = 10000,
    num_val: int = 1000,
    num_objects: int = 1,
    seed: int = 0,
    samples_per_shard: int = 1000,
) -> dict[str, str | None]:
    """Write train / val shards under ``root`` unless the same parameters already wrote them.

    Returns brace URLs ``{"train": ..., "val": ...}`` (``val`` is None when ``num_val`` is 0).
    """
    params = {"resolution": resolution, "num_train": num_train, "num_val": num_val,
              "num_objects": num_objects, "seed": seed, "samples_per_shard": samples_per_shard,
              "format": FORMAT_VERSION}
    if num_train < 1 or num_val < 0 or samples_per_shard < 1:
        raise ValueError(f"need num_train >= 1, num_val >= 0 and samples_per_shard >= 1, got {params}")
    urls = shapes_urls(root, num_train, num_val, samples_per_shard)
    meta_path = os.path.join(root, META_FILE)
    if _read_meta(meta_path) == params:
        return urls
    os.makedirs(root, exist_ok=True)
    for name in os.listdir(root):  # shards of earlier parameters must not linger beside the new ones
        if name.startswith(("train-", "val-")) and name.endswith(".tar") or name in (META_FILE, SIZES_FILE):
            os.remove(os.path.join(root, name))
    for split_index, (split, count) in enumerate((("train", num_train), ("val", num_val))):
        rng = np.random.default_rng([seed, split_index])
        sizes = {}
        for shard in range(_num_shards(count, samples_per_shard) if count else 0):
            first = shard * samples_per_shard
            indices = range(first, min(first + samples_per_shard, count))
            name = f"{split}-{shard:06d}.tar"
            sizes[name] = write_shard(os.path.join(root, name), _encoded_samples(rng, indices, resolution, num_objects))
        update_sizes(root, sizes)
    with open(meta_path, "w") as f:  # written last: its presence means the shards are complete
        json.dump(params, f, indent=1)
    return urls


def shapes_urls(root: str, num_train: int, num_val: int, samples_per_shard: int) -> dict[str, str | None]:
    """Brace URLs of the shards ``write_shapes`` writes for these sizes (without writing anything)."""
    def pattern(split: str, count: int) -> str | None:
        last = _num_shards(count, samples_per_shard) - 1
        return f"{root}/{split}-{{000000..{last:06d}}}.tar" if count > 0 else None

    return {"train": pattern("train", num_train), "val": pattern("val", num_val)}


def cell_box(position: str, resolution: int, margin: int = 1) -> tuple[int, int, int, int]:
    """Pixel box (x0, y0, x1, y1), end-exclusive, of the grid cell named `position`, grown by `margin` pixels
    and clipped to the image: every object drawn at that position lies inside it (`_object_outline` keeps the
    shape and its jitter within the cell; the margin covers the anti-aliased edge)."""
    if position not in POSITIONS:
        raise ValueError(f"unknown position {position!r}; shapes positions are {', '.join(POSITIONS)}")
    row, col = divmod(POSITIONS.index(position), 3)
    x0, x1 = col * resolution // 3, (col + 1) * resolution // 3
    y0, y1 = row * resolution // 3, (row + 1) * resolution // 3
    return max(0, x0 - margin), max(0, y0 - margin), min(resolution, x1 + margin), min(resolution, y1 + margin)


def _object_outline(rng: np.random.Generator, cell: int, shape: str, resolution: int) -> list[float]:
    """The supersampled bounding box of one shape centred in its grid cell, with a few pixels of jitter that
    keep it inside the cell (three random draws, in this order: size, x jitter, y jitter)."""
    size = rng.uniform(*SIZE_RANGE) * resolution
    jitter = max(1, resolution // 32)
    row, col = divmod(cell, 3)
    cx = (col + 0.5) * resolution / 3 + int(rng.integers(-jitter, jitter + 1))
    cy = (row + 0.5) * resolution / 3 + int(rng.integers(-jitter, jitter + 1))
    s, half = SUPERSAMPLING, size / 2
    return [(cx - half) * s, (cy - half) * s, (cx + half) * s, (cy + half) * s]


def _draw_outline(draw: ImageDraw.ImageDraw, shape: str, box: list[float], fill: tuple[int, int, int] | int) -> None:
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) / 2, box[1])], fill=fill)


def _coverage(shape: str, box: list[float], big: int, resolution: int) -> np.ndarray:
    """(resolution, resolution) uint8: 255 x the fraction of each pixel the shape covers (box-downsampled
    like the image, so the map and the anti-aliased colours agree)."""
    mask = Image.new("L", (big, big), 0)
    _draw_outline(ImageDraw.Draw(mask), shape, box, 255)
    return np.asarray(mask.resize((resolution, resolution), Image.Resampling.BOX))


def _encoded_samples(rng: np.random.Generator, indices: range, resolution: int,
                     num_objects: int) -> Iterator[tuple[str, dict[str, bytes]]]:
    for index in indices:
        image, attributes, semantic = render_sample_with_map(rng, resolution, num_objects)
        yield f"{index:08d}", {
            "png": _png(image),
            "txt": attributes["caption"].encode(),
            "json": json.dumps(attributes, sort_keys=True).encode(),
            "cls": str(attributes["class_label"]).encode(),
            SEMANTIC_MAP_FIELD: _png(semantic),
        }


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _num_shards(count: int, samples_per_shard: int) -> int:
    return max(1, -(-count // samples_per_shard))


def _read_meta(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
