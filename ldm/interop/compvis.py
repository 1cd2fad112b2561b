"""Import CompVis / Stability checkpoints (LDM model zoo, Stable Diffusion 1.x / 2.x).

Our state-dict keys ARE the CompVis keys (docs/architecture.md), so importing is a prefix rename:

    model.diffusion_model.*   -> unet.*
    first_stage_model.*       -> first_stage.*          (bare encoder.* / decoder.* files: the autoencoder)
    cond_stage_model.model.*  -> conditioner.model.*    (SD 2.x OpenCLIP text tower)
    model_ema.diffusion_model<param name without dots> -> unet.<param name>   (with use_ema)

Files are read with `ldm.checkpoint.load_checkpoint` (safetensors or weights-only torch.load): no
code from a checkpoint ever runs. Every load is exact: a missing, unexpected or mis-shaped tensor
raises `CheckpointMismatchError` listing them (see `state_dicts.py`).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from ldm.checkpoint import load_checkpoint
from ldm.interop.exported import read_exported_config, without_weight_sources
from ldm.interop.state_dicts import CheckpointMismatchError, load_exact, strip_prefix
from ldm.nets.vae import KLAutoencoder

if TYPE_CHECKING:
    from ldm.diffusion import LatentDiffusion

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
SD_PRESETS = ("sd1", "sd2")
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


# ---------------------------------------------------------------- first stage
def load_compvis_first_stage(
    path: str, vae_config: dict[str, Any] | None = None
) -> tuple[KLAutoencoder, dict[str, Any]]:
    """The autoencoder of a CompVis checkpoint (`first_stage_model.*` keys of a full LDM / SD file,
    or a standalone first-stage file with bare `encoder.*`, `decoder.*`, ... and `loss.*`) and its
    constructor arguments, inferred from the tensor shapes unless `vae_config` is given."""
    return first_stage_from_state_dict(state_dict_of(load_checkpoint(path)), path, vae_config)


def first_stage_from_state_dict(
    state_dict: Mapping[str, Tensor], source: str, vae_config: dict[str, Any] | None = None
) -> tuple[KLAutoencoder, dict[str, Any]]:
    weights = compvis_first_stage_weights(state_dict, source)
    config = dict(vae_config) if vae_config else infer_first_stage_config(weights, source)
    vae = KLAutoencoder(**config)
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
    """KLAutoencoder arguments read off the tensor shapes (LDM paper App. G autoencoders, SD VAEs).

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


def load_any_first_stage(path: str) -> tuple[KLAutoencoder, dict[str, Any]]:
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
            vae = KLAutoencoder(**config)
            load_exact(vae, strip_prefix(state_dict, prefix), path)
            return vae.eval(), config
    if "unet" in hparams and not hparams.get("first_stage"):
        raise ValueError(f"{path} is a LatentDiffusion checkpoint without its first-stage config; pass the stage-1 checkpoint.")
    return first_stage_from_state_dict(state_dict, path)


# ---------------------------------------------------------------- full Stable Diffusion checkpoints
def load_sd_checkpoint(
    path: str, preset: str, size_overrides: dict[str, Any] | None = None, use_ema: bool = False
) -> LatentDiffusion:
    """A `LatentDiffusion` holding a Stable Diffusion 1.x / 2.x checkpoint, in eval mode.

    The architecture comes from `configs/model/<preset>.yaml`; `size_overrides` is merged into it
    (nested dict: {"unet": {...}, "first_stage": {...}, "conditioner": {"width": ...},
    "prediction_type": "eps", ...}). The SD 2.x OpenCLIP text tower is loaded when the file has
    it; otherwise (SD 1.x's transformers CLIP, or no text weights) the conditioner is a
    `MissingConditioner` placeholder that names the encoder to supply: the UNet and the
    autoencoder work, `generate()` explains what is missing. `use_ema` takes the `model_ema.*` UNet."""
    from ldm.diffusion import LatentDiffusion
    from ldm.interop.weights import load_state_into

    state_dict = state_dict_of(load_checkpoint(path))
    if not any(key.startswith(UNET_PREFIX) for key in state_dict):
        raise CheckpointMismatchError(
            f"{path} has no Stable Diffusion UNet (keys model.diffusion_model.*). ldm checkpoints load with "
            "LatentDiffusion.load_from_checkpoint, exports with ldm.interop.load_exported."
        )
    config = sd_model_config(preset, size_overrides)
    config["conditioner"] = _conditioner_for(config["conditioner"], state_dict, preset)
    model = LatentDiffusion(**config, ema_decay=0.0)
    load_state_into(model, state_dict, path, use_ema=use_ema, hint=preset_hint(state_dict, preset))
    return model.eval()


def sd_model_config(preset: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """LatentDiffusion constructor arguments of a preset (configs/model/<preset>.yaml) with
    `overrides` merged in. The preset's Hydra defaults (training knobs) are not needed here."""
    if preset not in SD_PRESETS:
        raise ValueError(f"Unknown preset {preset!r}: use one of {SD_PRESETS} (Stable Diffusion 1.x or 2.x).")
    preset_cfg = OmegaConf.load(CONFIG_DIR / "model" / f"{preset}.yaml")
    preset_cfg.pop("defaults", None)
    merged = OmegaConf.merge(preset_cfg, overrides or {})
    # wrapped as in train.yaml, so that the preset's `${model.*}` interpolations resolve
    resolved = OmegaConf.to_container(OmegaConf.create({"model": merged}), resolve=True)["model"]
    return {key: value for key, value in resolved.items() if not key.startswith("_")}


def preset_hint(state_dict: Mapping[str, Tensor], preset: str) -> str:
    """Which preset the file's layout points to: SD 2.x has Linear proj_in (2-D), SD 1.x a 1x1 conv."""
    proj_in = next((v for k, v in state_dict.items() if k.startswith(UNET_PREFIX) and k.endswith("proj_in.weight")), None)
    if proj_in is None:
        return "The file's UNet has no transformer blocks: it is not a Stable Diffusion checkpoint."
    detected = "sd2" if proj_in.ndim == 2 else "sd1"
    if detected != preset:
        layout = "Linear proj_in/proj_out" if detected == "sd2" else "1x1-conv proj_in/proj_out"
        return f"The file has {layout}, the SD {detected[-1]}.x layout: try preset='{detected}'."
    return (f"Its layout matches preset '{preset}': check size_overrides (widths, channel_mult, context width) "
            "against the checkpoint's shapes above.")


class MissingConditioner(nn.Module):
    """Stands in for a text encoder the checkpoint did not provide, so the UNet and the
    autoencoder are usable; calling it says which encoder to supply (as `model.conditioner`)."""

    batch_key = "caption"

    def __init__(self, output_dim: int, needed: str) -> None:
        super().__init__()
        self.output_dim = output_dim
        self.needed = needed

    def forward(self, inputs: Any = None, drop_mask: Tensor | None = None) -> dict[str, Tensor]:
        raise RuntimeError(
            f"This model has no text encoder (its checkpoint did not contain one we can load). Set "
            f"model.conditioner to {self.needed}, producing (B, L, {self.output_dim}) contexts, or call "
            "model.unet(x, t, context=...) with your own contexts."
        )


def _conditioner_for(conditioner: dict[str, Any], state_dict: Mapping[str, Tensor], preset: str) -> dict[str, Any]:
    """The preset's text encoder built weight-less when the file carries its OpenCLIP weights,
    else a placeholder naming it (SD 1.x files carry transformers' CLIP, which we do not map)."""
    if any(key.startswith(OPENCLIP_PREFIX) for key in state_dict):
        return without_weight_sources(conditioner)
    described = ", ".join(f"{k}={v!r}" for k, v in conditioner.items() if k not in ("_target_", "width"))
    needed = f"{conditioner['_target_']}({described})"
    others = sorted({key.split(".")[1] for key in state_dict if key.startswith("cond_stage_model.")})
    found = f" (the file's cond_stage_model.{others[0]}.* is not in a layout we load)" if others else ""
    log.warning("%s: no loadable text encoder in the checkpoint%s; supply %s.", preset, found, needed)
    return {
        "_target_": f"{__name__}.MissingConditioner",
        "output_dim": conditioner["width"],
        "needed": needed,
    }


def state_dict_of(checkpoint: Mapping[str, Any]) -> dict[str, Tensor]:
    """The flat tensor dict of a Lightning / CompVis `.ckpt` ({"state_dict": ...}) or a flat file."""
    state_dict = checkpoint.get("state_dict", checkpoint)
    return {key: value for key, value in state_dict.items() if isinstance(value, torch.Tensor)}
