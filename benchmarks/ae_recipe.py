"""Stage-1 training recipes at CPU scale: reconstruction quality after a fixed number of steps.

Why this exists: the paper's first-stage recipe (L1 + LPIPS, batch 32+) learned `shapes` objects so slowly on
CPU budgets that 1,000 steps gave grey blobs. This script compares recipes side by side, same network
(the `size=small` f=8 autoencoder), same data, same seed, same step count; it reports validation PSNR and the
error on object pixels alone (background is ~97% of a `shapes` image, so PSNR alone hides whether objects are
learned), plus seconds per step. Contenders differ in pixel loss (L1 = paper, L2), batch size and learning rate.

    python benchmarks/ae_recipe.py [--steps 800] [--threads 2] [--recipes l1:8:4.5e-4 l2:8:4.5e-4 ...]

Writes `benchmarks/results/ae_recipe.json` and one reconstruction grid per recipe beside it.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ldm.data.shapes import render_sample
from ldm.models.autoencoder_loss import AutoencoderLoss
from ldm.nets.vae import AutoencoderNet
from ldm.utils.images import interleave, save_image_grid

RESULTS = Path(__file__).parent / "results" / "ae_recipe.json"
DEFAULT_RECIPES = ["l1:32:1.44e-4", "l1:8:4.5e-4", "l2:32:4.5e-4", "l2:8:4.5e-4"]  # first: CompVis lr 4.5e-6 x 32
SMALL_F8 = dict(embed_dim=4, z_channels=4, ch=16, ch_mult=[1, 2, 4, 4], num_res_blocks=1,
                attention_resolutions=[], norm_groups=8)


def shapes_images(seed: int, count: int, resolution: int = 64) -> Tensor:
    rng = np.random.default_rng(seed)
    pixels = np.stack([np.asarray(render_sample(rng, resolution, 1)[0]) for _ in range(count)])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def object_mask(images: Tensor) -> Tensor:
    """Coloured pixels: channel spread above 0.3 (the background is grey; white objects are not counted)."""
    return (images.amax(1) - images.amin(1)) > 0.3


@torch.no_grad()
def reconstruction_quality(vae: AutoencoderNet, images: Tensor) -> tuple[float, float, Tensor]:
    vae.eval()
    reconstructions = vae.decode(vae.encode(images).mode()).clamp(-1, 1)
    vae.train()
    mse = ((reconstructions - images) / 2).pow(2).flatten(1).mean(1)
    psnr = (-10 * mse.log10()).mean().item()
    object_error = (reconstructions - images).abs().sum(1)[object_mask(images)].mean().item()
    return psnr, object_error, reconstructions


def train_recipe(recipe: str, train: Tensor, val: Tensor, steps: int) -> dict:
    pixel_loss, batch_size, lr = recipe.split(":")
    torch.manual_seed(0)
    vae = AutoencoderNet(**SMALL_F8)
    loss_fn = AutoencoderLoss(disc_start=10**9, pixel_loss=pixel_loss, perceptual_weight=0)
    optimizer = torch.optim.Adam([*vae.parameters(), loss_fn.logvar], lr=float(lr), betas=(0.5, 0.9))
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for step in range(steps):
        batch = train[torch.randint(0, len(train), (int(batch_size),), generator=generator)]
        reconstructions, posterior = vae(batch)
        loss, _ = loss_fn.generator_loss(batch, reconstructions, posterior, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    psnr, object_error, reconstructions = reconstruction_quality(vae, val)
    grid = RESULTS.parent / f"ae_recipe_{pixel_loss}_bs{batch_size}_lr{lr}.png"
    save_image_grid(interleave(val[:16], reconstructions[:16]), grid, nrow=8)
    return {"recipe": recipe, "pixel_loss": pixel_loss, "batch_size": int(batch_size), "lr": float(lr),
            "steps": steps, "val_psnr_db": round(psnr, 2), "object_l1": round(object_error, 3),
            "sec_per_step": round(seconds / steps, 4), "grid": grid.name}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--recipes", nargs="+", default=DEFAULT_RECIPES, help="pixel_loss:batch_size:lr")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train, val = shapes_images(0, 4000), shapes_images(1, 256)
    background_error = (val.amin((2, 3), keepdim=True).mean(1, keepdim=True) - val).abs().sum(1)
    baseline = background_error[object_mask(val)].mean().item()
    rows = [train_recipe(recipe, train, val, args.steps) for recipe in args.recipes]
    print(f"{'recipe':<16}{'PSNR dB':>9}{'object L1':>11}{'s/step':>9}   (object L1 of painting background: {baseline:.3f})")
    for row in rows:
        print(f"{row['recipe']:<16}{row['val_psnr_db']:>9.2f}{row['object_l1']:>11.3f}{row['sec_per_step']:>9.4f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"threads": args.threads, "background_object_l1": round(baseline, 3),
                                   "results": rows}, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
