"""Load a frozen stage-1 autoencoder for the latent-diffusion stage, from any supported checkpoint."""
from __future__ import annotations

import os
from typing import Any

from ldm.interop.compvis import load_any_first_stage
from ldm.nets.vae import KLAutoencoder


def load_first_stage(path: str | None) -> tuple[KLAutoencoder, dict[str, Any]]:
    """The autoencoder net and its constructor arguments, from an ldm AutoencoderKL or LatentDiffusion
    checkpoint, an ldm export, or a CompVis / Stable Diffusion file (architecture read from the weights)."""
    if not path:
        raise ValueError(
            "model.first_stage_ckpt is not set. Pass the stage-1 checkpoint, e.g. "
            "model.first_stage_ckpt=outputs/ae_kl_f8/runs/<date>/checkpoints/last.ckpt "
            "(train one with `python train.py experiment=ae_kl_f8`)."
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"model.first_stage_ckpt={path!r} does not exist. Pass the checkpoint of a stage-1 run "
            "(<run dir>/checkpoints/last.ckpt of `python train.py experiment=ae_kl_f8`)."
        )
    return load_any_first_stage(path)
