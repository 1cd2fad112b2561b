"""Conditions computed in the loader from any image shards: degraded low-res images (super-resolution) and
random masks (inpainting), for the concatenation-conditioned LDMs of the paper (Rombach et al. 2022, Sec. 4.4,
4.5 and Fig. 3).

Each is drawn from a generator seeded by (seed, epoch, sample key, field), like the crops of
`ldm.data.transforms`, so a sample gets the same degradation and mask whether the run went straight or was
resumed, and the val split gets the same ones in every evaluation. Fields (docs/architecture.md, "The batch"):

- `lowres` uint8 (3, R/f, R/f): the crop blurred (optional), bicubic-downsampled by f (PIL's bicubic filter
  widens with the factor, i.e. antialiased, as SR3 / LDM-SR's "bicubic degradation"), noised and JPEG-compressed
  (optional);
- `mask` uint8 (1, R, R), 1 = the region to fill, 0 = known: one of a box, brush strokes, an outpainting
  border or the whole image (`full`, off by default), chosen by `weights`.
"""
from __future__ import annotations

import io
import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image, ImageDraw, ImageFilter

MASK_KINDS = ("box", "stroke", "outpaint", "full")
DEFAULT_MASK_WEIGHTS = {"box": 1.0, "stroke": 1.0, "outpaint": 1.0}  # `full` only when asked for
FIELDS = ("lowres", "mask")


def _interval(name: str, value: Sequence[float] | float | None, low: float = 0.0,
              high: float = math.inf) -> tuple[float, float] | None:
    """A [lo, hi] range from a number or a pair, checked to lie in [low, high]."""
    if value is None:
        return None
    lo, hi = (float(value), float(value)) if isinstance(value, (int, float)) else (float(value[0]), float(value[1]))
    if not low <= lo <= hi <= high:
        raise ValueError(f"{name} must be a number or a [lo, hi] pair with {low} <= lo <= hi <= {high}; got {value!r}.")
    return lo, hi


class SuperResolutionDegradation:
    """The high-res crop -> its low-res version: optional Gaussian blur (sigma in pixels of the high-res
    image), bicubic downsampling by `factor`, optional Gaussian noise (std in [0, 1] intensity units), optional
    JPEG at a quality drawn from `jpeg_quality`. With the defaults it is plain bicubic x`factor`."""

    def __init__(self, factor: int = 4, blur_sigma: Sequence[float] | float | None = None,
                 noise_std: Sequence[float] | float | None = None,
                 jpeg_quality: Sequence[int] | int | None = None) -> None:
        if int(factor) != factor or factor < 2:
            raise ValueError(f"super-resolution factor must be an integer >= 2, got {factor!r}.")
        self.factor = int(factor)
        self.blur_sigma = _interval("blur_sigma", blur_sigma)
        self.noise_std = _interval("noise_std", noise_std, high=1.0)
        self.jpeg_quality = _interval("jpeg_quality", jpeg_quality, low=1, high=100)

    def check_resolution(self, resolution: int) -> None:
        if resolution % self.factor:
            raise ValueError(f"data.resolution={resolution} is not divisible by the super-resolution factor "
                             f"{self.factor}: choose a resolution that is a multiple of {self.factor}.")

    def __call__(self, pixels: torch.Tensor, rng: random.Random) -> torch.Tensor:
        """uint8 (3, R, R) -> uint8 (3, R/f, R/f)."""
        image = Image.fromarray(pixels.permute(1, 2, 0).numpy())
        if self.blur_sigma is not None:
            sigma = rng.uniform(*self.blur_sigma)
            if sigma > 0:
                image = image.filter(ImageFilter.GaussianBlur(radius=sigma))
        size = (image.width // self.factor, image.height // self.factor)
        image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=None)
        array = np.asarray(image, dtype=np.float32)
        if self.noise_std is not None:
            std = rng.uniform(*self.noise_std) * 255.0
            noise = np.random.default_rng(rng.getrandbits(64)).standard_normal(array.shape, dtype=np.float32)
            array = array + std * noise
        array = np.clip(np.round(array), 0, 255).astype(np.uint8)
        if self.jpeg_quality is not None:
            quality = rng.randint(int(self.jpeg_quality[0]), int(self.jpeg_quality[1]))
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
            with Image.open(buffer) as decoded:
                array = np.asarray(decoded.convert("RGB"))
        return torch.from_numpy(array.copy()).permute(2, 0, 1)


class RandomMask:
    """Random inpainting masks (1 = fill): a box covering `box_area` of the image; 1-`max_strokes` brush
    strokes (polylines of 2-5 segments, width `stroke_width` of the side); an outpainting border of `border` of
    the side on a random non-empty set of the four sides; or the whole image (`full`: SD-inpainting's training
    masked everything in 25 % of its samples, so the model also generates from the caption alone and every such
    sample teaches the caption, where a partial mask often leaves the object visible:
    benchmarks/inpaint_mask_coverage.py). `weights` (per kind) choose the kind."""

    def __init__(self, weights: Mapping[str, float] | None = None, box_area: Sequence[float] = (0.1, 0.4),
                 max_strokes: int = 3, stroke_width: Sequence[float] = (0.06, 0.15),
                 border: Sequence[float] = (0.15, 0.4)) -> None:
        weights = dict(weights or DEFAULT_MASK_WEIGHTS)
        unknown = sorted(set(weights) - set(MASK_KINDS))
        if unknown or not any(w > 0 for w in weights.values()) or any(w < 0 for w in weights.values()):
            raise ValueError(f"mask weights must be non-negative numbers for {MASK_KINDS}, at least one positive; "
                             f"got {weights} (unknown: {unknown}).")
        self.kinds = [kind for kind in MASK_KINDS if weights.get(kind, 0) > 0]
        self.weights = [float(weights[kind]) for kind in self.kinds]
        self.box_area = _interval("box_area", box_area, low=0.0, high=1.0)
        self.stroke_width = _interval("stroke_width", stroke_width, low=0.0, high=1.0)
        self.border = _interval("border", border, low=0.0, high=0.5)
        if max_strokes < 1:
            raise ValueError(f"max_strokes must be >= 1, got {max_strokes}.")
        self.max_strokes = int(max_strokes)

    def __call__(self, size: int, rng: random.Random) -> torch.Tensor:
        """uint8 (1, size, size) in {0, 1}, never empty."""
        kind = rng.choices(self.kinds, weights=self.weights)[0]
        canvas = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(canvas)
        getattr(self, f"_{kind}")(draw, size, rng)
        mask = torch.from_numpy((np.asarray(canvas) > 0).astype(np.uint8))
        if not mask.any():  # a degenerate draw (tiny image): fill the centre pixel
            mask[size // 2, size // 2] = 1
        return mask[None]

    def _box(self, draw: ImageDraw.ImageDraw, size: int, rng: random.Random) -> None:
        area = rng.uniform(*self.box_area) * size * size
        aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
        width = min(size, max(1, round(math.sqrt(area * aspect))))
        height = min(size, max(1, round(area / width)))
        left, top = rng.randint(0, size - width), rng.randint(0, size - height)
        draw.rectangle([left, top, left + width - 1, top + height - 1], fill=255)

    def _stroke(self, draw: ImageDraw.ImageDraw, size: int, rng: random.Random) -> None:
        for _ in range(rng.randint(1, self.max_strokes)):
            width = max(1, round(rng.uniform(*self.stroke_width) * size))
            points = [(rng.uniform(0, size), rng.uniform(0, size))]
            for _ in range(rng.randint(2, 5)):
                angle, length = rng.uniform(0, 2 * math.pi), rng.uniform(0.1, 0.4) * size
                x, y = points[-1]
                points.append((min(max(x + length * math.cos(angle), 0), size), min(max(y + length * math.sin(angle), 0), size)))
            draw.line(points, fill=255, width=width)
            for x, y in points:  # round joints
                draw.ellipse([x - width / 2, y - width / 2, x + width / 2, y + width / 2], fill=255)

    def _full(self, draw: ImageDraw.ImageDraw, size: int, rng: random.Random) -> None:
        draw.rectangle([0, 0, size - 1, size - 1], fill=255)

    def _outpaint(self, draw: ImageDraw.ImageDraw, size: int, rng: random.Random) -> None:
        sides = [side for side in ("left", "top", "right", "bottom") if rng.random() < 0.5] or [rng.choice(
            ("left", "top", "right", "bottom"))]
        for side in sides:
            depth = max(1, round(rng.uniform(*self.border) * size))
            box = {"left": [0, 0, depth - 1, size], "top": [0, 0, size, depth - 1],
                   "right": [size - depth, 0, size, size], "bottom": [0, size - depth, size, size]}[side]
            draw.rectangle(box, fill=255)


Degradation = SuperResolutionDegradation | RandomMask


def build_degradations(spec: Mapping[str, Any] | None, resolution: int) -> dict[str, Degradation]:
    """`data.degradations` -> {field: degradation}: `lowres: {factor, blur_sigma, noise_std, jpeg_quality}`
    and / or `mask: {weights, box_area, max_strokes, stroke_width, border}` (null or {} for none)."""
    if OmegaConf.is_config(spec):
        spec = OmegaConf.to_container(spec, resolve=True)
    spec = {key: value for key, value in (spec or {}).items() if value is not None}
    unknown = sorted(set(spec) - set(FIELDS))
    if unknown:
        raise ValueError(f"data.degradations has unknown fields {unknown}: use lowres (super-resolution) and / or "
                         "mask (inpainting).")
    built: dict[str, Degradation] = {}
    if "lowres" in spec:
        built["lowres"] = SuperResolutionDegradation(**spec["lowres"])
        built["lowres"].check_resolution(resolution)
    if "mask" in spec:
        built["mask"] = RandomMask(**spec["mask"])
    return built


def degrade(pixels: torch.Tensor, degradations: Mapping[str, Degradation], seed: int, epoch: int,
            key: str) -> dict[str, torch.Tensor]:
    """The degradation fields of one cropped sample, each from its own (seed, epoch, key, field) generator."""
    fields = {}
    for name, degradation in degradations.items():
        rng = random.Random(f"{seed}/{epoch}/{key}/{name}")  # str seeds hash with SHA-512: the same in every process
        if isinstance(degradation, RandomMask):
            fields[name] = degradation(pixels.shape[-1], rng)
        else:
            fields[name] = degradation(pixels, rng)
    return fields
