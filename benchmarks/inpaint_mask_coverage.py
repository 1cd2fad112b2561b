"""How often does an inpainting training mask hide the whole object, so that only the caption can say what it was?

Why this exists: a model trained on `data.degradations.mask` learns to follow the caption inside the hole only from
the examples whose mask hides the object; where part of it stays visible, the visible part says colour and shape
and the caption adds nothing. This draws `shapes` images with their semantic maps and the loader's masks
(ldm/data/degradations.py, the same per-sample generators) and reports, per mask kind, the share of the object's
pixels under the mask and how often it is hidden wholly (>= 90 %), half, or not at all. Prints a table, writes JSON.

    python benchmarks/inpaint_mask_coverage.py                          # 2000 draws per kind at 64 px
    python benchmarks/inpaint_mask_coverage.py --samples 200 --out /tmp/coverage.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from ldm.data.degradations import MASK_KINDS, RandomMask, degrade
from ldm.data.shapes import render_sample_with_map

HIDDEN = 0.9  # at least this share of the object's pixels masked: its colour and shape are gone from the input


def object_coverage(kind: str | None, samples: int, resolution: int, seed: int) -> np.ndarray:
    """The share of each drawn object's pixels that the mask covers (kind None: the loader's default mixture)."""
    masks = {"mask": RandomMask(weights=None if kind is None else {kind: 1.0})}
    shapes_rng = np.random.default_rng(seed)
    shares = []
    for index in range(samples):
        image, _, semantic = render_sample_with_map(shapes_rng, resolution, num_objects=1)
        objects = torch.from_numpy(np.array(semantic)) > 0
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)
        mask = degrade(pixels, masks, seed, epoch=0, key=str(index))["mask"][0].bool()  # as the loader draws it
        shares.append(float((mask & objects).sum()) / max(1, int(objects.sum())))
    return np.asarray(shares)


def summary(shares: np.ndarray) -> dict[str, float]:
    return {"mean_share_hidden": float(shares.mean()), "hidden": float((shares >= HIDDEN).mean()),
            "half_hidden": float((shares >= 0.5).mean()), "untouched": float((shares == 0).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=2000, help="draws per mask kind")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/inpaint_mask_coverage.json")
    args = parser.parse_args()
    rows = {kind or "mixture (default weights)": summary(object_coverage(kind, args.samples, args.resolution, args.seed))
            for kind in (*MASK_KINDS, None)}
    print(f"| mask kind | mean share of the object masked | hidden (>= {HIDDEN:.0%}) | half hidden | untouched |")
    print("|---|---|---|---|---|")
    for kind, row in rows.items():
        print(f"| {kind} | {row['mean_share_hidden']:.3f} | {row['hidden']:.3f} | {row['half_hidden']:.3f} | "
              f"{row['untouched']:.3f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
