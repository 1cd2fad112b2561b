"""Import CompVis / Stability checkpoints (LDM model zoo, Stable Diffusion 1.x / 2.x).

Our state-dict keys ARE the CompVis keys (docs/architecture.md), so importing is a prefix rename:

    model.diffusion_model.*   -> unet.*
    first_stage_model.*       -> first_stage.*          (bare encoder.* / decoder.* files: the autoencoder)
    cond_stage_model.model.*  -> conditioner.model.*    (SD 2.x OpenCLIP text tower)
    model_ema.diffusion_model<param name without dots> -> unet.<param name>   (with use_ema)

Files are read with `ldm.utils.files.load_checkpoint` (safetensors or weights-only torch.load): no
code from a checkpoint ever runs. Every load is exact: a missing, unexpected or mis-shaped tensor
raises `CheckpointMismatchError` listing them (see `state_dicts.py`).
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import torch
from torch import Tensor

from ldm.loading.exported import read_exported_config
from ldm.loading.state_dicts import CheckpointMismatchError, load_exact, strip_prefix
from ldm.nets.vae import AutoencoderNet
from ldm.utils.files import load_checkpoint

log = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
FIRST_STAGE_PREFIX = "first_stage_model."
OPENCLIP_PREFIX = "cond_stage_model.model."
EMA_PREFIX = "model_ema.diffusion_model"
AUTOENCODER_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
# Buffers of the CompVis DDPM class (a pure function of the schedule) and training-only tensors.
IGNORED_KEYS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "model_ema.decay", "model_ema.num_updates", "logvar",
})



# ---------------------------------------------------------------- first stage
def load_compvis_first_stage(
    path: str, vae_config: dict[str, Any] | None = None
) -> tuple[AutoencoderNet, dict[str, Any]]:
    """The autoencoder of a CompVis checkpoint (`first_stage_model.*` keys of a full LDM / SD file,
    or a standalone first-stage file with bare `encoder.*`, `decoder.*`, ... and `loss.*`) and its
    constructor arguments, inferred from the tensor shapes unless `vae_config` is given."""
    return first_stage_from_state_dict(state_dict_of(load_checkpoint(path)), path, vae_config)


def first_stage_from_state_dict(
    state_dict: Mapping[str, Tensor], source: str, vae_config: dict[str, Any] | None = None
) -> tuple[AutoencoderNet, dict[str, Any]]:
    weights = compvis_first_stage_weights(state_dict, source)
    config = dict(vae_config) if vae_config else infer_first_stage_config(weights, source)
    vae = AutoencoderNet(**config)
    load_exact(vae, weights, source, hint="Pass vae_config= with the autoencoder's architecture if inference guessed wrong.")
    return vae.eval(), config


def compvis_first_stage_weights(state_dict: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    """Autoencoder tensors with our (= CompVis) names: the `first_stage_model.` part of a full
    checkpoint, else the whole file minus the training loss (`loss.*`) of a first-stage checkpoint."""
    if any(key.startswith(FIRST_STAGE_PREFIX) for key in state_dict):
        return strip_prefix(state_dict, FIRST_STAGE_PREFIX)
    if not any(key.startswith(AUTOENCODER_PARTS) for key in state_dict):
        raise CheckpointMismatchError(
            f"{source} holds no autoencoder: expected keys first_stage_model.* (a full LDM / SD checkpoint) or "
            f"encoder.*, decoder.*, quant_conv.*, post_quant_conv.* (a first-stage checkpoint); found e.g. "
            f"{sorted(state_dict)[:5]}."
        )
    return {key: value for key, value in state_dict.items() if not key.startswith("loss.")}


def infer_first_stage_config(weights: Mapping[str, Tensor], source: str = "checkpoint") -> dict[str, Any]:
    """AutoencoderNet arguments read off the tensor shapes (LDM paper App. G autoencoders, SD VAEs).

    Width per level = output channels of the level's first ResNet block; attention levels = those
    with `encoder.down.L.attn.*`; z_channels from `encoder.conv_out` (mean and log-variance);
    embed_dim from `post_quant_conv`. GroupNorm's group count has no footprint in the weights: the
    CompVis value 32 is assumed."""
    try:
        ch, in_channels = weights["encoder.conv_in.weight"].shape[:2]
        levels = sorted({int(key.split(".")[2]) for key in weights if key.startswith("encoder.down.")})
        widths = [weights[f"encoder.down.{level}.block.0.conv1.weight"].shape[0] for level in levels]
        blocks = {key.split(".")[4] for key in weights if key.startswith("encoder.down.0.block.")}
        config = dict(
            embed_dim=weights["post_quant_conv.weight"].shape[1],
            z_channels=weights["encoder.conv_out.weight"].shape[0] // 2,
            ch=ch,
            ch_mult=[width // ch for width in widths],
            num_res_blocks=len(blocks),
            attention_resolutions=[2**level for level in levels if f"encoder.down.{level}.attn.0.q.weight" in weights],
            in_channels=in_channels,
            out_channels=weights["decoder.conv_out.weight"].shape[0],
        )
    except KeyError as error:
        raise CheckpointMismatchError(
            f"Cannot infer the autoencoder architecture of {source}: tensor {error} is missing. "
            "Pass vae_config= (embed_dim, z_channels, ch, ch_mult, num_res_blocks, attention_resolutions)."
        ) from None
    if any(width % ch for width in widths):
        raise CheckpointMismatchError(f"{source}: level widths {widths} are not multiples of ch={ch}; pass vae_config=.")
    return config


def load_any_first_stage(path: str) -> tuple[AutoencoderNet, dict[str, Any]]:
    """The first-stage autoencoder of any checkpoint we know: an ldm `AutoencoderKL` run (`vae.*`),
    an ldm `LatentDiffusion` run or export (`first_stage.*`), or a CompVis / SD file (architecture
    inferred). Returns the net and its constructor arguments (saved in the LatentDiffusion hparams)."""
    checkpoint = load_checkpoint(path)
    state_dict = state_dict_of(checkpoint)
    hparams = dict(checkpoint.get("hyper_parameters") or {}) if "state_dict" in checkpoint else {}
    hparams.update(read_exported_config(path) or {})
    for prefix, config_key in (("vae.", "vae"), ("first_stage.", "first_stage")):
        if hparams.get(config_key) and any(key.startswith(prefix) for key in state_dict):
            config = dict(hparams[config_key])
            vae = AutoencoderNet(**config)
            load_exact(vae, strip_prefix(state_dict, prefix), path)
            return vae.eval(), config
    if "unet" in hparams and not hparams.get("first_stage"):
        raise ValueError(f"{path} is a LatentDiffusion checkpoint without its first-stage config; pass the stage-1 checkpoint.")
    return first_stage_from_state_dict(state_dict, path)


def state_dict_of(checkpoint: Mapping[str, Any]) -> dict[str, Tensor]:
    """The flat tensor dict of a Lightning / CompVis `.ckpt` ({"state_dict": ...}) or a flat file."""
    state_dict = checkpoint.get("state_dict", checkpoint)
    return {key: value for key, value in state_dict.items() if isinstance(value, torch.Tensor)}
