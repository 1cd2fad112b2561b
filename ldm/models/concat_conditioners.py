"""Spatially aligned conditions concatenated to z_t, and conditioners made of several parts.

The LDM paper conditions on images by concatenation (Rombach et al. 2022, Sec. 3.3 and Fig. 3, "concat"):
super-resolution on the low-res image, inpainting on the masked image and its mask, semantic synthesis on the
semantic map, each brought to the latent size h x w and stacked on z_t's channels, so the UNet's input has
latent + condition channels (`LatentDiffusion` derives it). These conditioners return `{"concat": (B, C_c, h, w)}`
and follow the interface of `ldm.models.conditioners` plus `concat_channels(latent_channels)`; at call time they
get the latent size and, for the masked image, `encode` (the frozen first stage of the LatentDiffusion, passed in
explicitly: a conditioner never owns a copy of it).

`Composite` joins parts, e.g. SD-inpainting's text + masked image + mask; classifier-free guidance drops exactly the
parts listed in its `drop` (training dropout and the unconditional branch alike), so an inpainting model keeps
image and mask in both branches and guides on the text only. A dropped concat part is all zeros.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Encode = Callable[[Tensor], Tensor]
Batch = Mapping[str, Any]


class ConcatConditioner(nn.Module):
    """Base of the concatenated conditions. `task` / `usage` name the sample.py task they serve, for errors.
    Alone (not in a Composite) a concat condition is never dropped: guidance on it needs a Composite."""

    batch_key: str | tuple[str, ...]
    droppable = False
    output_dim = 0
    task = ""
    usage = ""

    def concat_channels(self, latent_channels: int) -> int:
        raise NotImplementedError

    def forward(self, inputs: Any, drop_mask: Tensor | None = None, *, latent_size: Sequence[int],
                encode: Encode | None = None) -> dict[str, Tensor]:
        concat = self.spatial_condition(inputs, tuple(latent_size), encode)
        if drop_mask is not None:
            concat = torch.where(drop_mask.to(concat.device)[:, None, None, None], torch.zeros_like(concat), concat)
        return {"concat": concat}

    def spatial_condition(self, inputs: Any, latent_size: tuple[int, int], encode: Encode | None) -> Tensor:
        raise NotImplementedError


class LowResConditioner(ConcatConditioner):
    """Super-resolution (LDM-SR, Sec. 4.4): the low-res image in [-1, 1], bicubically resized to the latent size
    (for f=4 latents and x4 SR it already is that size) and concatenated; `factor` is the SR factor it was
    trained for (output side = `factor` x the low-res side)."""

    batch_key = "lowres"
    task = "sr"
    usage = "task=sr image=LOWRES.png (the low-res image to upscale)"

    def __init__(self, factor: int = 4) -> None:
        super().__init__()
        self.factor = int(factor)

    def concat_channels(self, latent_channels: int) -> int:
        return 3

    def spatial_condition(self, inputs: Tensor, latent_size: tuple[int, int], encode: Encode | None) -> Tensor:
        _check_images("lowres", inputs, channels=3)
        if tuple(inputs.shape[-2:]) == latent_size:
            return inputs
        return F.interpolate(inputs, size=latent_size, mode="bicubic", align_corners=False, antialias=True)


class MaskedImageConditioner(ConcatConditioner):
    """Inpainting as SD-inpainting: [mask at the latent size, E(image * (1 - mask))] with mask 1 = fill, the
    masked image encoded by the frozen first stage (posterior mode, scaled like z) and a latent cell counted as
    masked when any of its pixels is (max-pooling); latent + 1 channels, in SD-inpainting's channel order."""

    batch_key = ("image", "mask")
    task = "inpaint"
    usage = "task=inpaint image=IMAGE.png mask=MASK.png (white = the region to fill)"

    def concat_channels(self, latent_channels: int) -> int:
        return latent_channels + 1

    def spatial_condition(self, inputs: Mapping[str, Tensor], latent_size: tuple[int, int],
                          encode: Encode | None) -> Tensor:
        image, mask = inputs["image"], inputs["mask"]
        _check_images("image", image, channels=3)
        check_mask(mask, tuple(image.shape[-2:]))
        if encode is None:
            raise ValueError("MaskedImageConditioner needs `encode` (the frozen first stage) to encode the masked image.")
        mask = mask.to(image.dtype)
        masked_latent = encode(image * (1 - mask))
        small_mask = F.adaptive_max_pool2d(mask, latent_size)
        return torch.cat([small_mask.to(masked_latent.dtype), masked_latent], dim=1)


class SemanticMapConditioner(ConcatConditioner):
    """Semantic synthesis (Sec. 4.3.2): the per-pixel class map (B, 1, H, W) as a one-hot (B, num_classes, H, W),
    area-rescaled to the latent size (each latent cell holds its classes' pixel fractions)."""

    batch_key = "semantic_map"
    task = "semantic"
    usage = "task=semantic map=MAP.png (8-bit grey, one class index per pixel)"

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"SemanticMapConditioner needs num_classes >= 2 (background and a class), got {num_classes}.")
        self.num_classes = int(num_classes)

    def concat_channels(self, latent_channels: int) -> int:
        return self.num_classes

    def spatial_condition(self, inputs: Tensor, latent_size: tuple[int, int], encode: Encode | None) -> Tensor:
        labels = inputs[:, 0] if inputs.ndim == 4 and inputs.shape[1] == 1 else inputs
        if labels.ndim != 3 or labels.dtype.is_floating_point:
            raise ValueError(f"semantic_map must be integer class indices (B, 1, H, W), got {labels.dtype} "
                             f"{tuple(inputs.shape)}.")
        if bool((labels < 0).any()) or bool((labels >= self.num_classes).any()):
            raise ValueError(f"semantic map values must be class indices in [0, {self.num_classes}); got values "
                             f"{sorted(set(labels.unique().tolist()) - set(range(self.num_classes)))[:5]}.")
        onehot = F.one_hot(labels.long(), self.num_classes).permute(0, 3, 1, 2).float()
        return F.adaptive_avg_pool2d(onehot, latent_size)


class Composite(nn.Module):
    """Several conditioners as one: `parts` name -> conditioner (text, class, concat ...). Their `concat`
    outputs stack in the order of `parts`; at most one part may give `context` and one `y`.

    `drop` lists the parts classifier-free guidance drops (the rows of `drop_mask` get those parts' null
    condition, in training dropout and in the unconditional branch); null = every part that is not a concat
    condition (SD-inpainting: drop the text, keep masked image and mask)."""

    def __init__(self, parts: Mapping[str, nn.Module], drop: Sequence[str] | None = None) -> None:
        super().__init__()
        if not parts:
            raise ValueError("Composite needs at least one part, e.g. parts: {text: ..., inpaint: ...}.")
        self.parts = nn.ModuleDict(dict(parts))
        if drop is None:
            drop = [name for name, part in self.parts.items() if not isinstance(part, ConcatConditioner)]
        unknown = sorted(set(drop) - set(self.parts))
        if unknown:
            raise ValueError(f"Composite drop={list(drop)} names parts that do not exist: {unknown}; parts are "
                             f"{list(self.parts)}.")
        self.drop = [name for name in self.parts if name in drop]
        self.droppable = bool(self.drop)
        keyed = [name for name, part in self.parts.items() if not isinstance(part, ConcatConditioner)]
        if len(keyed) > 1:
            raise ValueError(f"Composite takes at most one text / class part; got {len(keyed)}: {keyed}.")
        self._primary_name = keyed[0] if keyed else None  # a name, not a second reference: no duplicate state keys

    @property
    def primary(self) -> nn.Module | None:
        """The text / class part (what prompts or labels feed), None without one."""
        return self.parts[self._primary_name] if self._primary_name is not None else None

    @property
    def batch_key(self) -> str | None:
        """The batch entry of the text / class part (what prompts or labels feed), None without one."""
        return self.primary.batch_key if self.primary is not None else None

    @property
    def output_dim(self) -> int:
        return self.primary.output_dim if self.primary is not None else 0

    @property
    def num_classes(self) -> int:
        if self.primary is None or not hasattr(self.primary, "num_classes"):
            raise AttributeError("this Composite has no class part")
        return self.primary.num_classes

    def concat_channels(self, latent_channels: int) -> int:
        return sum(concat_channels_of(part, latent_channels) for part in self.parts.values())

    def concat_parts(self) -> list[ConcatConditioner]:
        return [part for part in self.parts.values() if isinstance(part, ConcatConditioner)]

    def forward(self, batch: Batch, drop_mask: Tensor | None = None, *, latent_size: Sequence[int],
                encode: Encode | None = None) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        concats = []
        for name, part in self.parts.items():
            result = condition(part, batch, drop_mask if name in self.drop else None, latent_size=latent_size,
                               encode=encode, force_drop=True)
            if "concat" in result:
                concats.append(result.pop("concat"))
            for key, value in result.items():
                if key in out:
                    raise ValueError(f"two parts of the Composite give {key!r}; one text / class part at most.")
                out[key] = value
        if concats:
            out["concat"] = torch.cat(concats, dim=1)
        return out


# ---------------------------------------------------------------- what LatentDiffusion calls
def condition(conditioner: nn.Module, batch: Batch, drop_mask: Tensor | None, *, latent_size: Sequence[int],
              encode: Encode | None = None, force_drop: bool = False) -> dict[str, Tensor]:
    """The UNet's keyword arguments (`context`, `y`, `concat`) of any conditioner for a batch; `drop_mask` rows
    get the null condition where the conditioner is droppable (or, inside a Composite, where it says so)."""
    if isinstance(conditioner, Composite):
        return conditioner(batch, drop_mask, latent_size=latent_size, encode=encode)
    if not force_drop and not is_droppable(conditioner):
        drop_mask = None
    inputs = _inputs(conditioner, batch)
    if isinstance(conditioner, ConcatConditioner):
        return conditioner(inputs, drop_mask, latent_size=latent_size, encode=encode)
    return conditioner(inputs, drop_mask=drop_mask)


def is_droppable(conditioner: nn.Module) -> bool:
    """Whether classifier-free guidance has anything to drop (text, classes, a Composite's `drop` parts)."""
    return bool(getattr(conditioner, "droppable", conditioner.batch_key is not None))


def concat_channels_of(conditioner: nn.Module, latent_channels: int) -> int:
    """Channels a conditioner stacks on z_t (0 for text, class and none)."""
    method = getattr(conditioner, "concat_channels", None)
    return int(method(latent_channels)) if method is not None else 0


def concat_parts(conditioner: nn.Module) -> list[ConcatConditioner]:
    """The concat conditions of a model (what sample.py's `task=` must supply)."""
    if isinstance(conditioner, Composite):
        return conditioner.concat_parts()
    return [conditioner] if isinstance(conditioner, ConcatConditioner) else []


def condition_keys(conditioner: nn.Module) -> list[str]:
    """Every batch entry a model's conditioning reads: the text / class key, then its concat parts' keys (what an
    evaluation or a sample grid of an image-conditioned model must take from the data, row by row)."""
    keys = [conditioner.batch_key] if conditioner.batch_key is not None else []
    return list(dict.fromkeys(keys + [key for part in concat_parts(conditioner) for key in _keys(part)]))


def as_batch(conditioner: nn.Module, conditions: Any) -> dict[str, Any]:
    """`generate()`'s conditions as a batch: a mapping is one already; prompts / labels go to the batch key."""
    if isinstance(conditions, Mapping):
        return dict(conditions)
    key = conditioner.batch_key
    return {key: conditions} if key is not None and conditions is not None else {}


def unet_inputs(latents: Tensor, cond: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """[z_t, concat] along channels and the remaining UNet keyword arguments (Fig. 3)."""
    cond = dict(cond)
    extra = cond.pop("concat", None)
    if extra is None:
        return latents, cond
    if extra.shape[0] != latents.shape[0] or extra.shape[-2:] != latents.shape[-2:]:
        raise ValueError(f"the concatenated condition {tuple(extra.shape)} does not fit the latents "
                         f"{tuple(latents.shape)}: it must be (B, C, h, w) at the latent size.")
    return torch.cat([latents, extra.to(latents.dtype)], dim=1), cond


def check_mask(mask: Tensor, size: tuple[int, int]) -> None:
    """A mask is (B, 1, H, W) at the image's size, binary (1 = fill)."""
    if mask.ndim != 4 or mask.shape[1] != 1 or tuple(mask.shape[-2:]) != tuple(size):
        raise ValueError(f"mask must be (B, 1, H, W) with the image's size {tuple(size)}, got {tuple(mask.shape)}.")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("mask must be binary: 1 (white) = fill, 0 (black) = keep; got other values.")


def _check_images(name: str, images: Any, channels: int) -> None:
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != channels:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{name} must be a (B, {channels}, H, W) tensor in [-1, 1], got {shape}.")


def _inputs(conditioner: nn.Module, batch: Batch) -> Any:
    key = conditioner.batch_key
    if key is None:
        return None
    keys = (key,) if isinstance(key, str) else tuple(key)
    missing = [k for k in keys if batch.get(k) is None]
    if missing:
        if isinstance(conditioner, ConcatConditioner):
            raise ValueError(f"This model is conditioned on {', '.join(repr(k) for k in keys)} (task="
                             f"{conditioner.task}) and got no {missing[0]!r}. Sample it with `python sample.py ckpt=... "
                             f"{conditioner.usage}`; train it on data that provides {missing[0]!r} (see "
                             "data.degradations / data.semantic_map).")
        if key == "caption":
            raise TypeError(f"{type(conditioner).__name__} takes a list of prompts, one string per sample; got none. "
                            "A text model needs the batch's 'caption' entry (an empty string for no caption).")
        raise ValueError(f"{type(conditioner).__name__} needs the batch entry {key!r}, which is missing.")
    return batch[key] if isinstance(key, str) else {k: batch[k] for k in keys}


def require_no_concat(conditioner: nn.Module) -> None:
    """Refuse plain prompt / class sampling of a model that needs spatial conditions, naming the task to run."""
    parts = concat_parts(conditioner)
    if parts:
        needed = " ".join(part.usage.split(" (")[0] for part in parts)
        raise ValueError(f"This checkpoint is an image-conditioned model (task={'+'.join(p.task for p in parts)}): it is conditioned on "
                         f"{', '.join(repr(k) for p in parts for k in _keys(p))} and cannot sample without them. Run "
                         f"`python sample.py ckpt=... {needed}`.")


def _keys(part: ConcatConditioner) -> tuple[str, ...]:
    return (part.batch_key,) if isinstance(part.batch_key, str) else tuple(part.batch_key)
