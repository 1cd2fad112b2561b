"""Sampling from a trained LatentDiffusion checkpoint to a folder: what `sample.py` and `evaluate.py` share.

Writes one PNG per sample (`00000.png`, ...), `grid.png` (one row per prompt / class) and
`samples.json` (one record per image: file, prompt or class, seed, sampler settings, checkpoint).
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Mapping, Sequence

import torch
from PIL import Image
from tqdm import tqdm

from ldm.diffusion.settings import SamplerSettings
from ldm.loading.checkpoints import load_latent_diffusion
from ldm.models.concat_conditioners import require_no_concat
from ldm.models.latent_diffusion import LatentDiffusion
from ldm.utils.devices import autocast_dtype, resolve_device
from ldm.utils.images import images_to_uint8, save_image_grid

log = logging.getLogger(__name__)


def conditions_for(
    model: LatentDiffusion, prompts: Sequence[str], class_labels: Sequence[int], n: int
) -> list[str | int | None]:
    """One entry per sample, `n` per prompt / class; checks they fit the model's conditioning."""
    if n < 1:
        raise ValueError(f"n={n}: the number of samples per prompt / class (in total for unconditional models) "
                         "must be at least 1.")
    key = model.conditioner.batch_key
    if key == "caption":
        if class_labels:
            raise ValueError("This is a text-conditioned model: pass prompt=... or prompts_file=..., not class_label.")
        if not prompts:
            raise ValueError("This is a text-conditioned model: pass prompt=\"...\" or prompts_file=PATH.")
        return [p for p in prompts for _ in range(n)]
    if key == "class_label":
        if prompts:
            raise ValueError("This is a class-conditional model: pass class_label=K (or nothing for all classes), not prompts.")
        labels = list(class_labels) or list(range(model.conditioner.num_classes))
        return [c for c in labels for _ in range(n)]
    if prompts or class_labels:
        raise ValueError("This is an unconditional model: drop prompt / class_label.")
    return [None] * n


def generate_to_dir(
    model: LatentDiffusion,
    conditions: list[str | int | None],
    out: str,
    settings: SamplerSettings,
    batch_size: int = 16,
    ckpt: str | None = None,
    per_row: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    negative_prompt: str | None = None,
    height: int | None = None,
    width: int | None = None,
    progress: bool = False,
) -> list[dict]:
    """Sample every condition (sample i seeded with settings.seed + i), write PNGs, grid and records.

    A prompt longer than the text encoder's context is cut by its tokenizer: that is warned about, and the
    record of each of its images holds `prompt_truncated_to`, the text the model saw. `negative_prompt` takes
    the empty prompt's place in guidance; `height` / `width` (None: the training size) are multiples of the
    first stage's factor; `progress` logs a line per denoising step (a log, so also when stdout is no terminal)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: the number of images sampled at once must be at least 1.")
    if not conditions:
        raise ValueError("Nothing to sample: no prompt, class or sample count was given.")
    truncated = truncated_prompts(model, conditions)
    size = (height or model.hparams.image_size, width or model.hparams.image_size)
    model.pipeline().latent_size(size)  # a wrong height / width fails before anything is written
    os.makedirs(out, exist_ok=True)
    records, images_uint8 = [], []
    num_batches = math.ceil(len(conditions) / batch_size)
    for start in tqdm(range(0, len(conditions), batch_size), desc="sampling", unit="batch", disable=progress):
        chunk = conditions[start:start + batch_size]
        inputs = as_model_inputs(chunk)
        callback = StepLogger(start // batch_size + 1, num_batches, settings.steps) if progress else None
        with torch.autocast(model.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            images = model.generate(inputs, len(chunk), settings, seed_offset=start, image_size=size,
                                    negative_prompt=negative_prompt, callback=callback)
        batch_uint8 = images_to_uint8(images)
        for i, (image, condition) in enumerate(zip(batch_uint8, chunk)):
            index = start + i
            name = f"{index:05d}.png"
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(os.path.join(out, name))
            record = {"file": name, **settings.as_dict(), "seed": settings.seed + index, "ckpt": ckpt,
                      "height": size[0], "width": size[1]}
            record["prompt" if isinstance(condition, str) else "class_label"] = condition
            if negative_prompt is not None:
                record["negative_prompt"] = negative_prompt
            if condition in truncated:
                record["prompt_truncated_to"] = truncated[condition]
            records.append(record)
        images_uint8.append(batch_uint8)
    grid = torch.cat(images_uint8).float() / 127.5 - 1
    save_image_grid(grid, os.path.join(out, "grid.png"), nrow=per_row or int(math.ceil(math.sqrt(len(conditions)))))
    with open(os.path.join(out, "samples.json"), "w") as f:
        json.dump(records, f, indent=1)
    return records


class StepLogger:
    """A log line per denoising step, `sampling batch 1/4 | step 12/50 (t=741) | 0.31 s/step | ETA 0:00:12`:
    logging, not a progress bar, so the lines reach a file or a pipe as well as a terminal."""

    def __init__(self, batch: int, num_batches: int, steps: int) -> None:
        self.batch, self.num_batches, self.steps = batch, num_batches, steps
        self.start = time.perf_counter()
        self.done = 0

    def __call__(self, i: int, t: int, latents: torch.Tensor) -> None:
        self.done += 1
        per_step = (time.perf_counter() - self.start) / self.done
        remaining = per_step * (self.steps - i - 1 + (self.num_batches - self.batch) * self.steps)
        log.info("sampling batch %d/%d | step %d/%d (t=%d) | %.2f s/step | ETA %s", self.batch, self.num_batches,
                 i + 1, self.steps, int(t), per_step, _clock(remaining))


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def truncated_prompts(model: LatentDiffusion, conditions: list[str | int | None]) -> dict[str, str]:
    """{prompt: the part the model sees} for the prompts longer than its text encoder's context, each warned."""
    truncation = getattr(model.conditioner, "truncation", None)
    if truncation is None:
        return {}
    cut = {p: kept for p in dict.fromkeys(c for c in conditions if isinstance(c, str)) if (kept := truncation(p))}
    for prompt, kept in cut.items():
        log.warning("The prompt %r is longer than the text encoder's context of %d tokens: the model sees only "
                    "%r (recorded as prompt_truncated_to in samples.json).", prompt, model.conditioner.context_length,
                    kept)
    return cut


def as_model_inputs(chunk: list[Any]) -> list[str] | torch.Tensor | dict[str, Any] | None:
    """A chunk of per-sample conditions as `generate()` takes them: prompts stay a list, class labels become a
    tensor, condition rows of an image-conditioned model ({"lowres": (3, h, w), "caption": str, ...}) a batch
    (tensors stacked, strings listed); None for unconditional models."""
    if chunk[0] is None:
        return None
    if isinstance(chunk[0], Mapping):
        return {key: torch.stack([row[key] for row in chunk]) if isinstance(chunk[0][key], torch.Tensor)
                else [row[key] for row in chunk] for key in chunk[0]}
    if isinstance(chunk[0], str):
        return list(chunk)
    return torch.tensor(chunk, dtype=torch.long)


def read_prompts(prompt: str | None, prompts_file: str | None) -> list[str]:
    """`prompt=` and/or the non-empty lines of `prompts_file=`."""
    prompts = [prompt] if prompt else []
    if prompts_file:
        if not os.path.isfile(prompts_file):
            raise FileNotFoundError(f"prompts_file={prompts_file!r} does not exist (one prompt per line).")
        with open(prompts_file) as f:
            prompts += [line.strip() for line in f if line.strip()]
    return prompts


def sample_checkpoint(
    ckpt: str,
    out: str,
    prompts: Sequence[str] = (),
    prompts_file: str | None = None,
    class_labels: Sequence[int] = (),
    n: int = 4,
    batch_size: int = 16,
    sampling: SamplerSettings | Mapping[str, Any] | None = None,
    use_ema: bool = True,
    device: str = "auto",
    precision: str = "fp32",
    negative_prompt: str | None = None,
    height: int | None = None,
    width: int | None = None,
    progress: bool = False,
) -> list[dict]:
    """What `sample.py` does: `n` samples per prompt / class of a checkpoint into `out`, drawn with
    `sampling` (a SamplerSettings or a `sampling` config node; None: the defaults); the last four as in
    `generate_to_dir`."""
    settings = SamplerSettings.of(sampling)
    dtype = autocast_dtype(precision)
    model = load_latent_diffusion(ckpt, use_ema=use_ema, device=resolve_device(device))
    require_no_concat(model.conditioner)  # image-conditioned models: ldm/inference/tasks.py (sample.py task=...)
    conditions = conditions_for(model, [*prompts, *read_prompts(None, prompts_file)], class_labels, n)
    return generate_to_dir(model, conditions, out, settings, batch_size=batch_size, ckpt=ckpt, per_row=n,
                           autocast_dtype=dtype, negative_prompt=negative_prompt, height=height, width=width,
                           progress=progress)
