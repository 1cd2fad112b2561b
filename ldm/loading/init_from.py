"""Load weights from a file into an existing `LatentDiffusion` (`train.py init_from=PATH`).

Accepts a CompVis / SD checkpoint (`model.diffusion_model.*`, ...), an ldm training checkpoint
(`unet.*`, `first_stage.*`, `conditioner.*`, `ema.*`) or an ldm export (`load_exported`'s format).
The UNet must load completely; the first stage and the conditioner load when the file has them
(a first stage must come from somewhere: the file or `model.first_stage_ckpt`). Afterwards the
EMA restarts from the loaded weights, so fine-tuning averages from where it starts.

A model with concatenated conditions (inpainting, super-resolution ...) starts from a text-to-image file as
SD-inpainting did: the file's first UNet convolution fills the latent input channels and the extra condition
channels start at zero, so the initial model is the text-to-image one; a plain text encoder in the file loads
into the Composite conditioner's text part.
"""
from __future__ import annotations

import logging
from typing import Mapping

import torch
from torch import Tensor

from ldm.loading.compvis import (
    EMA_PREFIX,
    FIRST_STAGE_PREFIX,
    IGNORED_KEYS,
    OPENCLIP_PREFIX,
    UNET_PREFIX,
    state_dict_of,
)
from ldm.loading.state_dicts import (
    CheckpointMismatchError,
    describe_mismatch,
    strip_prefix,
)
from ldm.models.concat_conditioners import Composite
from ldm.models.ema import EMA
from ldm.utils.files import load_checkpoint

log = logging.getLogger(__name__)

OUR_EMA_PREFIX = "ema."
OPTIONAL_PARTS = ("first_stage", "conditioner")
FIRST_CONV = "unet.input_blocks.0.0.weight"
TRAINABLE_PARTS = ("unet", "conditioner")  # what LatentDiffusion.trainable (and so its EMA) may hold


def load_weights_into(model, path: str, use_ema: bool = False) -> None:
    """Copy the weights of `path` into `model` (a LatentDiffusion), exactly or not at all.
    `use_ema`: take the file's EMA UNet (`model_ema.*` / `ema.*`) instead of its raw UNet."""
    load_state_into(model, state_dict_of(load_checkpoint(path)), path, use_ema=use_ema, adapt=True)


def load_state_into(model, state_dict: Mapping[str, Tensor], source: str, use_ema: bool = False, hint: str = "",
                    adapt: bool = False) -> None:
    """`load_weights_into` for a state dict already in memory; `hint` ends a mismatch error. `adapt`
    (init_from): widen the first convolution for concat channels, route a text encoder into a Composite."""
    if any(key.startswith(UNET_PREFIX) for key in state_dict):
        ours = compvis_to_ours(state_dict, [name for name, _ in model.unet.named_parameters()], use_ema, source)
    elif any(key.startswith("unet.") for key in state_dict):
        ours = _ours_with_ema(state_dict, use_ema, source)
    else:
        raise CheckpointMismatchError(
            f"{source} has no UNet weights: expected keys model.diffusion_model.* (CompVis / Stable Diffusion) "
            f"or unet.* (an ldm LatentDiffusion checkpoint or export); found e.g. {sorted(state_dict)[:5]}."
        )
    if adapt:
        ours = _into_composite(model, _widen_first_conv(model, ours, source), source)
    parts = {"unet"} | {part for part in OPTIONAL_PARTS if any(key.startswith(part + ".") for key in ours)}
    if "first_stage" not in parts and not model.hparams.get("first_stage_ckpt"):
        raise CheckpointMismatchError(
            f"{source} has no first-stage (autoencoder) weights and the model's first stage is not loaded from "
            "model.first_stage_ckpt: it would stay random. Pass model.first_stage_ckpt=PATH as well."
        )
    expected = {key: value for key, value in model.state_dict().items() if key.split(".")[0] in parts}
    if "scale_factor" in ours:
        expected["scale_factor"] = model.scale_factor
    message = describe_mismatch(expected, ours)
    if message:
        raise CheckpointMismatchError(f"{source} does not fit the model: {message}{' ' + hint if hint else ''}")
    model.load_state_dict(ours, strict=False)  # every key of the loaded parts is present: checked above
    if "scale_factor" in ours:
        model.set_scale_factor(float(model.scale_factor))
    if model.ema is not None:
        model.ema = EMA(model.trainable, decay=model.ema.decay, warmup=model.ema.warmup)
    log.info("Loaded %s from %s%s.", ", ".join(sorted(parts)), source, " (EMA UNet)" if use_ema else "")


def compvis_to_ours(
    state_dict: Mapping[str, Tensor], unet_param_names: list[str], use_ema: bool, source: str
) -> dict[str, Tensor]:
    """Rename a CompVis / SD state dict to our LatentDiffusion keys (see compvis.py for the table).

    Keys with no counterpart and not known to be irrelevant are kept under their own name, so
    that the exactness check reports them as unexpected."""
    ours = strip_prefix(state_dict, FIRST_STAGE_PREFIX, "first_stage.")
    ours.update(strip_prefix(state_dict, OPENCLIP_PREFIX, "conditioner.model."))
    if use_ema:
        ema_keys = {EMA_PREFIX + name.replace(".", ""): name for name in unet_param_names}
        if not any(key in state_dict for key in ema_keys):
            raise CheckpointMismatchError(
                f"{source} has no EMA weights (model_ema.*). Files such as '*-emaonly' already store the EMA "
                "UNet as the model's weights: load them with use_ema=False."
            )
        ours.update({"unet." + name: state_dict[key] for key, name in ema_keys.items() if key in state_dict})
    else:
        ours.update(strip_prefix(state_dict, UNET_PREFIX, "unet."))
    if "scale_factor" in state_dict:
        ours["scale_factor"] = state_dict["scale_factor"]
    unmapped_text = [key for key in state_dict if key.startswith("cond_stage_model.") and not key.startswith(OPENCLIP_PREFIX)]
    if unmapped_text:
        log.warning("%s: %d text-encoder tensors (cond_stage_model.%s.*) not loaded: their layout is not "
                    "ours; the model keeps its own conditioner.", source, len(unmapped_text), unmapped_text[0].split(".")[1])
    known = (UNET_PREFIX, FIRST_STAGE_PREFIX, "cond_stage_model.", "model_ema.")
    ours.update({key: value for key, value in state_dict.items()
                 if not key.startswith(known) and key not in IGNORED_KEYS and key != "scale_factor"})
    return ours


def _ours_with_ema(state_dict: Mapping[str, Tensor], use_ema: bool, source: str) -> dict[str, Tensor]:
    """Our own layout: the EMA shadows (`ema.<name without dots>`) replace the trainable weights
    when asked; the EMA buffers themselves never load (the EMA restarts).

    The shadows are looked up by the file's own weight names (its UNet and conditioner, what its EMA tracked),
    not the receiving model's: a text-to-image file's `conditioner.*` shadows then still replace its text
    encoder before `_into_composite` moves it to `conditioner.parts.<text>.*` of an inpainting model."""
    ours = {key: value for key, value in state_dict.items() if not key.startswith(OUR_EMA_PREFIX)}
    if use_ema:
        trainable = [name for name in ours if name.split(".")[0] in TRAINABLE_PARTS]
        shadows = {OUR_EMA_PREFIX + name.replace(".", ""): name for name in trainable}
        if not any(key in state_dict for key in shadows):
            raise CheckpointMismatchError(f"{source} has no EMA weights (ema.*): load it with use_ema=False.")
        ours.update({name: state_dict[key] for key, name in shadows.items() if key in state_dict})
    return ours


def _widen_first_conv(model, ours: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """A file's first UNet convolution with fewer input channels than the model's (a text-to-image UNet for a
    concat-conditioned one): its weights fill the first channels, the extra ones are zero (SD-inpainting's
    initialisation), so the new inputs start without effect."""
    target = model.unet.state_dict()[FIRST_CONV.removeprefix("unet.")]
    weight = ours.get(FIRST_CONV)
    if weight is None or weight.shape == target.shape:
        return ours
    if weight.ndim != 4 or weight.shape[0] != target.shape[0] or weight.shape[2:] != target.shape[2:] \
            or weight.shape[1] > target.shape[1]:
        return ours  # not a widening: the exactness check reports it
    widened = torch.zeros(target.shape, dtype=weight.dtype)
    widened[:, : weight.shape[1]] = weight
    log.info("%s: UNet input widened from %d to %d channels; the %d extra (concat condition) channels start at "
             "zero.", source, weight.shape[1], target.shape[1], target.shape[1] - weight.shape[1])
    return {**ours, FIRST_CONV: widened}


def _into_composite(model, ours: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """A file's plain conditioner weights (`conditioner.*`) into the one part of a Composite that has weights
    (`conditioner.parts.<name>.*`), e.g. a text-to-image model's text encoder into an inpainting model."""
    conditioner = model.conditioner
    plain = [key for key in ours if key.startswith("conditioner.") and not key.startswith("conditioner.parts.")]
    if not isinstance(conditioner, Composite) or not plain:
        return ours
    weighted = [name for name, part in conditioner.parts.items() if len(part.state_dict())]
    if len(weighted) != 1:
        return ours  # ambiguous or nowhere to go: the exactness check reports the keys
    prefix = f"conditioner.parts.{weighted[0]}."
    log.info("%s: its conditioner loads into the Composite's %r part.", source, weighted[0])
    return {(prefix + key.removeprefix("conditioner.") if key in plain else key): value for key, value in ours.items()}
