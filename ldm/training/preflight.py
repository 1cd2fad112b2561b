"""The start-up check: the whole config against the data and the first stage, in seconds, before a stage-1 model
is trained or a step taken. What can be derived is derived (and stated in the log); what contradicts is a
`ConfigError` naming the key to change:

- the image resolution is a multiple of the first stage's factor (`data.resolution`, `model.first_stage_factor`),
  and of the stage-1 autoencoder's own factor (`model.vae.ch_mult`);
- the UNet's depth fits its latents (`fit_unet_depth`): each of the `len(channel_mult) - 1` downsamplings halves
  them, and the deepest level keeps at least `MIN_LATENT_SIZE` px. Deeper levels are cut off, with the log naming
  `model.unet.channel_mult` and the resolution and factor;
- a class-conditional model's `num_classes` comes from the data (`classes.json` beside the shards, or a scan of the
  `.cls` labels) when the config leaves it null; a configured value that disagrees with the data is an error;
- the sample grid's and `after_training`'s conditions fit the model: prompts for a text model (not for a class
  or unconditional one), class labels within [0, num_classes) for a class model (the grid's default: 4 spread
  over the classes).
"""
from __future__ import annotations

import logging
from typing import Any

import hydra
from omegaconf import DictConfig, open_dict

from ldm.data.shards import expand_urls, shard_class_count
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.latent_diffusion import LatentDiffusion

log = logging.getLogger(__name__)

# The smallest latent side the UNet's deepest level may reach. The paper's and SD's UNets stop at 4 px (f = 8 at
# 256 px: 32 -> 4 over channel_mult [1, 2, 4, 4]; SD at 512 px: 64 -> 8); below that the 3x3 convolutions of the
# deepest level and the middle block see mostly zero padding, and a 1x1 level has no spatial structure left.
MIN_LATENT_SIZE = 4
GRID_ROWS = 4  # default sample-grid classes: this many, spread over the classes
TEXT_KEY, CLASS_KEY = "caption", "class_label"  # the conditioners' batch keys (ldm/models/conditioners.py)


class ConfigError(ValueError):
    """The config contradicts the data or the model: the message names the key to change."""


def preflight(cfg: DictConfig, datamodule: Any) -> None:
    """Check `cfg` against the data module and fill in what is derived (in `cfg`, before anything is built, and
    `datamodule.num_classes`)."""
    target = hydra.utils.get_class(cfg.model._target_)
    if issubclass(target, AutoencoderKL):
        check_resolution(cfg.data.resolution, 2 ** (len(cfg.model.vae.ch_mult) - 1), "model.vae.ch_mult")
        return
    if not issubclass(target, LatentDiffusion):
        return
    resolution, factor = int(cfg.model.image_size), cfg.model.get("first_stage_factor")
    if factor is not None:  # null: read from the checkpoint when the model is built (checked there)
        check_resolution(resolution, int(factor), "model.first_stage_factor")
        unet = cfg.model.get("unet")
        if unet is not None and unet.get("channel_mult") is not None:
            with open_dict(cfg):
                unet.channel_mult, unet.attention_resolutions = fit_unet_depth(
                    list(unet.channel_mult), list(unet.get("attention_resolutions") or []), resolution, int(factor))
    keys = condition_keys(cfg.model.conditioner)
    num_classes = resolve_num_classes(cfg, datamodule) if CLASS_KEY in keys else None
    check_sample_conditions(cfg, keys, num_classes)


def check_resolution(resolution: int, factor: int, factor_key: str) -> None:
    if resolution % factor:
        nearest = " or ".join(str(n) for n in dict.fromkeys((resolution // factor * factor or factor,
                                                              (resolution // factor + 1) * factor)))
        raise ConfigError(
            f"data.resolution={resolution} is not a multiple of the first stage's factor f={factor} ({factor_key}): "
            f"the latents would not tile the image. Use data.resolution={nearest}.")


def fit_unet_depth(channel_mult: list[int], attention: list[int], resolution: int, factor: int
                   ) -> tuple[list[int], list[int]]:
    """`channel_mult` and `attention_resolutions` cut to the levels whose latents stay >= MIN_LATENT_SIZE px and
    halve exactly (the skip connections need equal sizes). A latent side below the minimum keeps one level (no
    downsampling). Attention rates beyond the kept levels go; if none is left of a non-empty set (cross-attention
    carries a text condition), the deepest kept level gets it."""
    latent = resolution // factor
    levels = len(channel_mult)
    while levels > 1 and (latent % 2 ** (levels - 1) or latent // 2 ** (levels - 1) < MIN_LATENT_SIZE):
        levels -= 1
    if levels == len(channel_mult):
        return channel_mult, attention
    deepest = 2 ** (levels - 1)
    kept_attention = [rate for rate in attention if rate <= deepest] or ([deepest] if attention else [])
    log.info(
        "UNet depth: %d px at f=%d gives %dx%d latents; model.unet.channel_mult=%s would take them to %s px (the "
        "deepest level keeps >= %d px): using channel_mult=%s, attention_resolutions=%s (from %s). For the full depth "
        "train at data.resolution=%d, or set a shorter channel_mult yourself (README: Your own data, sizing).",
        resolution, factor, latent, latent, channel_mult, _deepest_size(latent, len(channel_mult)), MIN_LATENT_SIZE,
        channel_mult[:levels], kept_attention, attention, factor * MIN_LATENT_SIZE * 2 ** (len(channel_mult) - 1))
    return channel_mult[:levels], kept_attention


def _deepest_size(latent: int, levels: int) -> str:
    size = latent / 2 ** (levels - 1)
    return f"{size:g}" if size >= 1 else f"{size:g} (less than one)"


def condition_keys(conditioner: DictConfig) -> set[str]:
    """The batch keys a conditioner config reads (`caption`, `class_label`, ...), a Composite's parts included."""
    parts = conditioner.get("parts") or {}
    if parts:
        return set().union(*(condition_keys(part) for part in parts.values()))
    key = getattr(hydra.utils.get_class(conditioner._target_), "batch_key", None)
    if isinstance(key, str):
        return {key}
    return set(key) if isinstance(key, tuple) else set()


def resolve_num_classes(cfg: DictConfig, datamodule: Any) -> int:
    """`model.conditioner.num_classes`: from the data when null; a configured value must agree with the data."""
    found, source = data_class_count(datamodule)
    configured = cfg.model.conditioner.get("num_classes")
    if configured is None:
        if found is None:
            raise ConfigError(
                f"model.conditioner.num_classes=null asks the data for its classes, but it has none ({source}). Set "
                "model.conditioner.num_classes=N, or write classes.json beside the shards "
                "(data/make_shards.py --classes-from-dirs does; ldm.data.shards.write_classes).")
        log.info("num_classes = %d, from %s (model.conditioner.num_classes=null: derived)", found, source)
        with open_dict(cfg):
            cfg.model.conditioner.num_classes = int(found)
        configured = found
    elif found is not None and int(found) != int(configured):
        raise ConfigError(
            f"model.conditioner.num_classes={configured}, but the data has {found} classes ({source}). Set "
            f"model.conditioner.num_classes=null to take the data's count, or ={found}.")
    if hasattr(datamodule, "num_classes"):
        datamodule.num_classes = int(configured)
    return int(configured)


def data_class_count(datamodule: Any) -> tuple[int | None, str]:
    """(classes, from where): the data module's own `class_count()` (built-in data sets), else its training
    shards' classes.json or `.cls` labels (`shard_class_count`)."""
    if hasattr(datamodule, "class_count"):
        return datamodule.class_count()
    if getattr(datamodule, "train_urls", None):
        return shard_class_count(expand_urls(datamodule.train_urls))
    return None, f"{type(datamodule).__name__} reads no shards"


def default_grid_classes(num_classes: int) -> list[int]:
    """GRID_ROWS classes spread over [0, num_classes): 21 -> [0, 6, 12, 18], 10 -> [0, 3, 6, 9]."""
    return list(range(0, num_classes, -(-num_classes // GRID_ROWS)))


def check_sample_conditions(cfg: DictConfig, keys: set[str], num_classes: int | None) -> None:
    """The sample grid's and the `after_training` sampling's conditions against the model's conditioning."""
    kind = "text" if TEXT_KEY in keys else "class" if CLASS_KEY in keys else "unconditional or image"
    grid = (cfg.get("callbacks") or {}).get("sample_grid")
    if grid is not None:
        if TEXT_KEY in keys and not grid.get("prompts"):
            raise ConfigError("callbacks.sample_grid.prompts is empty: a text model's grid has a row per prompt. "
                              "Give some, e.g. callbacks.sample_grid.prompts='[\"a red circle\"]'.")
        classes = grid.get("classes")
        if CLASS_KEY in keys:
            if not classes:
                with open_dict(cfg):
                    grid.classes = default_grid_classes(num_classes)
                log.info("callbacks.sample_grid.classes = %s (of %d classes)", list(grid.classes), num_classes)
            else:
                check_labels(list(classes), num_classes, "callbacks.sample_grid.classes")
        elif classes:
            raise ConfigError(f"callbacks.sample_grid.classes={list(classes)} is for class-conditional models; this "
                              f"is a {kind} model. Set callbacks.sample_grid.classes=null.")
    for name, action in (cfg.get("after_training") or {}).items():
        if not isinstance(action, DictConfig):
            continue
        prompts, labels = action.get("prompts"), action.get("class_labels")
        if prompts and TEXT_KEY not in keys:
            raise ConfigError(f"after_training.{name}.prompts is given, but this is a {kind} model, which takes no "
                              f"prompt. Remove them (after_training.{name}.prompts=[])"
                              + (f" and give after_training.{name}.class_labels instead." if CLASS_KEY in keys else "."))
        if labels:
            if CLASS_KEY not in keys:
                raise ConfigError(f"after_training.{name}.class_labels is given, but this is a {kind} model. "
                                  f"Set after_training.{name}.class_labels=[].")
            check_labels(list(labels), num_classes, f"after_training.{name}.class_labels")


def check_labels(labels: list[int], num_classes: int, key: str) -> None:
    outside = [label for label in labels if not 0 <= int(label) < num_classes]
    if outside:
        raise ConfigError(
            f"{key}={labels} holds {outside}, outside [0, {num_classes}) (model.conditioner.num_classes={num_classes}). "
            f"Use classes in range, e.g. {key}={default_grid_classes(num_classes)}, or null for the grid's default.")

