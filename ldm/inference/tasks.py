"""Image-conditioned sampling from the command line (`python sample.py task=...`), the paper's tasks beside
text / class / unconditional generation (Rombach et al. 2022, Sec. 4.4-4.5, Fig. 3):

- `img2img image=IMG strength=S`: SDEdit (Meng et al. 2022) on any non-concat model (prompt / class as usual);
- `sr image=LOWRES`: super-resolution, output side = the model's SR factor x the low-res side;
- `inpaint image=IMG mask=MASK`: mask PNG, white = fill, black = keep (prompt= for text + inpainting models);
- `semantic map=MAP`: 8-bit grey PNG of class indices.

Same contract as plain sampling (ldm/inference/sampling.py): sample i has seed `seed + i` whatever the batch
size, `00000.png ...`, `samples.json` (one record per image, with the task and its inputs) and `grid.png`, here
with one row per prompt: the condition, then its samples. Images must be RGB, of any size whose sides (times the
SR factor for `sr`) are multiples of the model's downsampling (the nets are convolutional: a model trained on
squares samples other aspect ratios too, if less well far from its training size); masks binary and of the image's
size; the checkpoint must have been trained for the task.
"""
from __future__ import annotations

import colorsys
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from ldm.diffusion.settings import SamplerSettings
from ldm.inference.sampling import conditions_for, read_prompts
from ldm.loading.checkpoints import load_latent_diffusion
from ldm.models.concat_conditioners import (
    LowResConditioner,
    MaskedImageConditioner,
    SemanticMapConditioner,
    concat_parts,
    condition_keys,
)
from ldm.models.latent_diffusion import LatentDiffusion
from ldm.utils.devices import autocast_dtype, resolve_device
from ldm.utils.images import images_to_uint8, save_image_grid

TASKS = ("img2img", "sr", "inpaint", "semantic")
TASK_CONDITIONERS = {"sr": LowResConditioner, "inpaint": MaskedImageConditioner, "semantic": SemanticMapConditioner}


# ---------------------------------------------------------------- which tasks a checkpoint serves
def model_tasks(model: LatentDiffusion) -> list[str]:
    """The `task=` values a model can run: its concat conditions' tasks, or img2img for a model without any."""
    parts = concat_parts(model.conditioner)
    return [part.task for part in parts] if parts else ["img2img"]


def check_task(model: LatentDiffusion, task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"Unknown task={task!r}. Choose one of: {', '.join(TASKS)} (or leave task unset for "
                         "prompt / class sampling).")
    supported = model_tasks(model)
    if task not in supported:
        conditioned = ", ".join(p.task for p in concat_parts(model.conditioner)) or "no image"
        raise ValueError(f"This checkpoint was not trained for task={task} (it is conditioned on {conditioned}); "
                         f"it runs: {', '.join(f'task={t}' for t in supported)}. Train one with "
                         f"`python train.py experiment={_experiment_for(task)}`.")


def _experiment_for(task: str) -> str:
    return {"sr": "ldm_sr_f4", "inpaint": "ldm_inpaint_f4", "semantic": "ldm_semantic_f4"}.get(task, "ldm_f4_text")


# ---------------------------------------------------------------- reading inputs
def read_rgb(path: str | None, option: str = "image") -> torch.Tensor:
    """(1, 3, H, W) in [-1, 1] from an RGB image file; other modes are refused with the fix."""
    if not path:
        raise ValueError(f"this task needs {option}=PATH (an RGB image).")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{option}={path!r} does not exist.")
    with Image.open(path) as image:
        if image.mode != "RGB":
            raise ValueError(f"{option}={path!r} has mode {image.mode}, not RGB. Convert it first, e.g. "
                             f"`Image.open(path).convert('RGB').save(new_path)` (drops alpha / expands grey).")
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    return pixels.permute(2, 0, 1)[None].float() / 127.5 - 1


def read_mask(path: str | None, size: tuple[int, int]) -> torch.Tensor:
    """(1, 1, height, width) float {0, 1} from a black / white PNG (white = fill) of the image's `size`."""
    if not path:
        raise ValueError("task=inpaint needs mask=PATH: a black / white PNG of the image's size, white = fill.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"mask={path!r} does not exist.")
    with Image.open(path) as image:
        values = np.asarray(image.convert("L") if image.mode in ("1", "L", "RGB") else image)
        mode = image.mode
    if mode not in ("1", "L", "RGB") or values.ndim != 2:
        raise ValueError(f"mask={path!r} is a {mode} image: pass a black / white (mode L or 1) PNG, white = fill.")
    if values.shape != tuple(size):
        raise ValueError(f"mask={path!r} is {values.shape[1]}x{values.shape[0]} but the image is {size[1]}x{size[0]}: "
                         "the mask must have the image's size (resize it with nearest-neighbour sampling).")
    levels = np.unique(values)
    if not set(levels.tolist()) <= {0, 255}:
        raise ValueError(f"mask={path!r} is not binary: it has {len(levels)} grey levels (e.g. "
                         f"{levels[:4].tolist()}). Threshold it to 0 (keep) and 255 (fill), e.g. "
                         "`Image.open(path).convert('L').point(lambda v: 255 if v >= 128 else 0)`.")
    return torch.from_numpy((values == 255).astype(np.float32))[None, None]


def read_semantic_map(path: str | None, num_classes: int) -> torch.Tensor:
    """(1, 1, H, W) int64 class indices from an 8-bit grey (or palette) PNG."""
    if not path:
        raise ValueError("task=semantic needs map=PATH: an 8-bit grey PNG holding one class index per pixel.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"map={path!r} does not exist.")
    with Image.open(path) as image:
        if image.mode not in ("L", "P"):
            raise ValueError(f"map={path!r} is a {image.mode} image: pass an 8-bit grey (L) or palette (P) PNG "
                             "whose pixel values are class indices.")
        labels = np.asarray(image, dtype=np.int64)
    if labels.max() >= num_classes:
        raise ValueError(f"map={path!r} holds class {int(labels.max())}, but the model knows {num_classes} classes "
                         f"(0 .. {num_classes - 1}).")
    return torch.from_numpy(labels)[None, None]


# ---------------------------------------------------------------- conditions of a task
def task_inputs(model: LatentDiffusion, task: str, image: str | None = None, mask: str | None = None,
                semantic_map: str | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor, tuple[int, int]]:
    """(condition tensors of one sample, the condition as an image for the grid, output (height, width))."""
    check_task(model, task)
    if task == "semantic":
        labels = read_semantic_map(semantic_map, _part(model, SemanticMapConditioner).num_classes)
        inputs, size = {"semantic_map": labels}, (labels.shape[-2], labels.shape[-1])
    else:
        pixels = read_rgb(image)
        size = (pixels.shape[-2], pixels.shape[-1])
        if task == "sr":
            factor = _part(model, LowResConditioner).factor
            inputs, size = {"lowres": pixels}, (size[0] * factor, size[1] * factor)
        elif task == "inpaint":
            inputs = {"image": pixels, "mask": read_mask(mask, size)}
        else:  # img2img
            return {"init_images": pixels}, pixels, size
    return inputs, condition_images(model, inputs, size), size


def condition_images(model: LatentDiffusion, batch: dict[str, Any], size: int | Sequence[int]) -> torch.Tensor:
    """The first concat condition of each row as a (B, 3, H, W) image in [-1, 1] (`size`: a side or (H, W)), for
    grids: the low-res image (nearest upsampling), the masked image (the hole mid-grey) or the colourised map."""
    part = concat_parts(model.conditioner)[0]
    size = (size, size) if isinstance(size, int) else tuple(size)
    if isinstance(part, LowResConditioner):
        return F.interpolate(batch["lowres"].float().cpu(), size=size, mode="nearest")
    if isinstance(part, MaskedImageConditioner):
        return batch["image"].cpu() * (1 - batch["mask"].float().cpu())
    return F.interpolate(colorize(batch["semantic_map"].cpu(), part.num_classes), size=size, mode="nearest")


def condition_rows(model: LatentDiffusion, batch: dict[str, Any], rows: int, repeat: int) -> dict[str, Any]:
    """The condition entries of a training batch's first `rows` rows, each repeated `repeat` times, on the CPU
    (the sample grids of concat models show the same conditions all run long)."""
    picked: dict[str, Any] = {}
    for key in condition_keys(model.conditioner):
        value = batch[key][:rows]
        if isinstance(value, torch.Tensor):
            picked[key] = value.detach().cpu().repeat_interleave(repeat, dim=0)
        else:
            picked[key] = [entry for entry in value for _ in range(repeat)]
    return picked


def _part(model: LatentDiffusion, kind: type) -> Any:
    return next(part for part in concat_parts(model.conditioner) if isinstance(part, kind))


def check_output_size(model: LatentDiffusion, size: tuple[int, int]) -> None:
    """Both output sides must be multiples of the total downsampling (first stage x UNet levels)."""
    multiple = model.first_stage.downsampling_factor * model.unet.downsampling_factor
    height, width = size
    if height % multiple or width % multiple:
        raise ValueError(f"the output would be {width}x{height} px, a side not a multiple of {multiple} (first stage "
                         f"f={model.first_stage.downsampling_factor} x the UNet's {model.unet.downsampling_factor}): "
                         "resize or crop the input so that both sides are.")


def colorize(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class indices (B, 1, H, W) -> (B, 3, H, W) in [-1, 1]: black background (0), one hue per class."""
    palette = [(0.0, 0.0, 0.0)] + [colorsys.hsv_to_rgb((0.618034 * i) % 1.0, 0.85, 0.95) for i in range(num_classes - 1)]
    colours = torch.tensor(palette, dtype=torch.float32) * 2 - 1
    return colours[labels[:, 0]].permute(0, 3, 1, 2)


# ---------------------------------------------------------------- sampling a task into a folder
def generate_task_to_dir(
    model: LatentDiffusion, task: str, inputs: dict[str, torch.Tensor], display: torch.Tensor, size: tuple[int, int],
    conditions: list[Any], out: str, settings: SamplerSettings, *, per_row: int, strength: float = 0.75,
    batch_size: int = 16, ckpt: str | None = None, sources: dict[str, str | None] | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> list[dict]:
    """Sample every entry of `conditions` (prompt, class or None; sample i seeded with settings.seed + i) with
    the task's condition `inputs`; write PNGs, `samples.json` and `grid.png` (condition | samples per row)."""
    check_output_size(model, size)
    os.makedirs(out, exist_ok=True)
    records, images = [], []
    for start in tqdm(range(0, len(conditions), batch_size), desc=f"sampling ({task})", unit="batch"):
        chunk = conditions[start:start + batch_size]
        batch = {key: value.expand(len(chunk), *value.shape[1:]) for key, value in inputs.items()}
        init_images = batch.pop("init_images", None)
        if chunk[0] is not None:
            batch[model.conditioner.batch_key] = list(chunk) if isinstance(chunk[0], str) else torch.tensor(chunk)
        with torch.autocast(model.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            samples = model.generate(
                batch, len(chunk), settings, seed_offset=start, image_size=size,
                init_images=init_images, strength=strength if init_images is not None else 1.0,
            )
        uint8 = images_to_uint8(samples.cpu())
        for i, (pixels, condition) in enumerate(zip(uint8, chunk)):
            index = start + i
            name = f"{index:05d}.png"
            Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(os.path.join(out, name))
            record = {"file": name, **settings.as_dict(), "seed": settings.seed + index, "ckpt": ckpt, "task": task,
                      **{k: v for k, v in (sources or {}).items() if v is not None}}
            if task == "img2img":
                record["strength"] = strength
            if condition is not None:
                record["prompt" if isinstance(condition, str) else "class_label"] = condition
            records.append(record)
        images.append(uint8)
    _save_task_grid(torch.cat(images), display, per_row, os.path.join(out, "grid.png"))
    with open(os.path.join(out, "samples.json"), "w") as handle:
        json.dump(records, handle, indent=1)
    return records


def _save_task_grid(samples: torch.Tensor, display: torch.Tensor, per_row: int, path: str) -> None:
    """Rows of [condition, its `per_row` samples]."""
    condition = images_to_uint8(display.clamp(-1, 1))[0]
    rows = [torch.cat([condition[None], samples[i:i + per_row]]) for i in range(0, len(samples), per_row)]
    save_image_grid(torch.cat(rows).float() / 127.5 - 1, path, nrow=per_row + 1)


def sample_task(
    ckpt: str, out: str, task: str, image: str | None = None, mask: str | None = None,
    semantic_map: str | None = None, strength: float = 0.75, prompts: list[str] | tuple[str, ...] = (),
    prompts_file: str | None = None, class_labels: list[int] | tuple[int, ...] = (), n: int = 4,
    batch_size: int = 16, sampling: SamplerSettings | Mapping[str, Any] | None = None, use_ema: bool = True,
    device: str = "auto", precision: str = "fp32",
) -> list[dict]:
    """What `sample.py task=...` does: `n` samples per prompt (or class; one set without) for the task's input,
    drawn with `sampling` (a SamplerSettings or a `sampling` config node; None: the defaults)."""
    settings = SamplerSettings.of(sampling)
    dtype = autocast_dtype(precision)
    if task == "img2img" and not 0.0 < strength <= 1.0:
        raise ValueError(f"strength={strength} must be in (0, 1]: the fraction of the sampling steps re-run "
                         "from the noised image (1 = ignore the image).")
    model = load_latent_diffusion(ckpt, use_ema=use_ema, device=resolve_device(device))
    check_task(model, task)
    prompts = [*prompts, *read_prompts(None, prompts_file)]
    if model.conditioner.batch_key == "caption" and not prompts and task != "img2img":
        prompts = [""]  # a text + image model without a prompt: the image condition alone
    conditions = conditions_for(model, prompts, class_labels, n)
    inputs, display, size = task_inputs(model, task, image, mask, semantic_map)
    sources = {"image": image, "mask": mask, "map": semantic_map}
    return generate_task_to_dir(model, task, inputs, display, size, conditions, out, settings, per_row=n,
                                strength=strength, batch_size=batch_size, ckpt=ckpt, sources=sources,
                                autocast_dtype=dtype)
