"""Load a frozen stage-1 autoencoder for the latent-diffusion stage, from any supported checkpoint."""
from __future__ import annotations

import os
from typing import Any

from ldm.checkpoint import load_checkpoint
from ldm.nets.vae import KLAutoencoder

VAE_PREFIX = "vae."


def load_first_stage(path: str | None) -> tuple[KLAutoencoder, dict[str, Any]]:
    """The autoencoder net and its constructor arguments, from an `AutoencoderKL` checkpoint."""
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
    checkpoint = load_checkpoint(path)
    hparams = checkpoint.get("hyper_parameters", {})
    state_dict = checkpoint.get("state_dict", {})
    if "vae" not in hparams or not any(k.startswith(VAE_PREFIX) for k in state_dict):
        kind = "a LatentDiffusion checkpoint" if "unet" in hparams else "not an autoencoder checkpoint"
        raise ValueError(
            f"model.first_stage_ckpt={path!r} is {kind}. It must be a stage-1 AutoencoderKL checkpoint "
            "(from `python train.py experiment=ae_kl_f4|ae_kl_f8|ae_kl_f16`)."
        )
    config = dict(hparams["vae"])
    vae = KLAutoencoder(**config)
    weights = {k[len(VAE_PREFIX):]: v for k, v in state_dict.items() if k.startswith(VAE_PREFIX)}
    vae.load_state_dict(weights, strict=True)
    return vae, config
