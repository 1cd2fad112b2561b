"""`python evaluate.py task=sr|inpaint|semantic ckpt=PATH`: each image-conditioned task measured the way its
claim is stated, next to its baseline, on the val split of the data config (conditions computed by the loader,
so every evaluation sees the same low-res images, masks and maps):

- `sr`: PSNR, SSIM and FID of the super-resolved images against the high-res val images, and the same for
  bicubic upsampling of the low-res input (LDM paper, Tab. 5 reports FID / IS / PSNR / SSIM against it) and
  for the autoencoder's reconstruction of the high-res image (no sample decoded from its latents does better);
- `inpaint`: PSNR (of the pooled MSE: a median fill of a flat background is exact on many masks) and L1 inside
  the mask against the original (and for a fill with the known pixels' median colour), PSNR outside the mask,
  whose ceiling is the autoencoder's own reconstruction PSNR there; FID and (on shapes) caption fidelity of the
  completed images. On shapes also a second pass whose masks hide the object's whole grid cell: the caption
  fidelity of those fills (`object_fill_*`) says whether the caption brings the named object back, next to the
  judge on median fills of the same masks (`object_removed_*`, the object gone);
- `semantic`: on shapes, the per-pixel agreement of the sample's colours with its map (all pixels, object pixels)
  next to chance (the maps shuffled across samples) and the real val images (the judge's ceiling); caption
  fidelity of the shapes classifier.

No LPIPS: its VGG weights cannot be downloaded offline. FID uses the `features` extractor (shapes_cnn on shapes).
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import replace
from typing import Any, Mapping

import hydra
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image

from ldm.data.shapes import cell_box, parse_caption_objects
from ldm.diffusion.consistency import enforce_condition
from ldm.diffusion.settings import SamplerSettings
from ldm.evaluation.evaluate import (
    EvaluationOptions,
    build_features,
    evaluate_images,
    reference_statistics_for,
)
from ldm.evaluation.image_sources import DataSplitImages, data_identity
from ldm.inference.tasks import check_task, condition_images
from ldm.loading.checkpoints import load_latent_diffusion
from ldm.metrics.image_quality import (
    SHAPES_SEMANTIC_CLASSES,
    l1,
    pooled_psnr,
    psnr,
    semantic_colour_agreement,
    ssim,
)
from ldm.models.concat_conditioners import LowResConditioner, concat_parts
from ldm.utils.devices import autocast_dtype, resolve_device
from ldm.utils.images import images_to_uint8, save_image_grid

log = logging.getLogger(__name__)
EVALUATED_TASKS = ("sr", "inpaint", "semantic")


def task_data_config(model: Any, task: str, data: Any) -> dict[str, Any]:
    """The data config with the fields the task needs: the model's SR factor (unless `data.degradations.lowres`
    is given), default random masks (unless `data.degradations.mask` is), the semantic maps."""
    config = OmegaConf.to_container(data, resolve=True) if OmegaConf.is_config(data) else dict(data)
    degradations = dict(config.get("degradations") or {})
    if task == "sr" and not degradations.get("lowres"):
        factor = next(p for p in concat_parts(model.conditioner) if isinstance(p, LowResConditioner)).factor
        degradations["lowres"] = {"factor": factor}
    if task == "inpaint" and not degradations.get("mask"):
        degradations["mask"] = {}
    if task == "semantic":
        config["semantic_map"] = True
    config["degradations"] = degradations or None
    return config


def evaluate_task(
    task: str, out: str, ckpt: str, data: Any, num_samples: int = 256, features: Mapping[str, Any] | str | None = None,
    k: int = 3, density_k: int = 5, num_real: int | None = None, cache_dir: str = ".cache/metrics",
    feature_batch_size: int = 64, sampling: SamplerSettings | Mapping[str, Any] | None = None, batch_size: int = 16,
    use_ema: bool = True, device: str = "auto", precision: str = "fp32",
) -> dict[str, Any]:
    """Sample `num_samples` val conditions of `task` from `ckpt` with `sampling` (a SamplerSettings or a
    `sampling` config node; None: the defaults); write `out/metrics.json`, `out/metrics.md`,
    `out/samples/` (PNGs) and `out/grid.png` (condition | sample | reference for the first 8); return metrics."""
    if task not in EVALUATED_TASKS:
        raise ValueError(f"evaluate.py task={task!r}: choose one of {', '.join(EVALUATED_TASKS)} (img2img has no "
                         "reference to compare with; evaluate its samples with fake_dir=).")
    settings = SamplerSettings.of(sampling)
    model = load_latent_diffusion(ckpt, use_ema=use_ema, device=resolve_device(device))
    check_task(model, task)
    data_config = task_data_config(model, task, data)
    datamodule = hydra.utils.instantiate(data_config)
    datamodule.prepare_data()
    datamodule.setup("validate")
    rows = _val_rows(datamodule, num_samples)
    samples, raw = _sample_rows(model, rows, settings, batch_size, autocast_dtype(precision))
    references = images_to_uint8(rows["image"])
    options = EvaluationOptions(features=dict(features) if isinstance(features, Mapping) else {"name": features or "auto"},
                                k=k, density_k=density_k, num_real=num_real, cache_dir=cache_dir,
                                batch_size=feature_batch_size, device=device)
    source = DataSplitImages(datamodule, data_identity(data_config), prepare=False)
    extractor = build_features(options.features, reference_is_shapes=source.is_shapes,
                               image_size=references.shape[-1], cache_dir=cache_dir, device=resolve_device(device))
    statistics = reference_statistics_for(source, extractor, options)

    def distribution(images: torch.Tensor, captions: list[str] | None = None) -> dict[str, Any]:
        return evaluate_images(images, statistics, extractor, k=k, density_k=density_k, captions=captions,
                               batch_size=feature_batch_size)

    captions = rows["caption"] if all(rows["caption"]) and source.is_shapes else None
    metrics: dict[str, Any] = {"task": task, "num_samples": len(samples)}
    if task == "sr":
        bicubic = images_to_uint8(F.interpolate(rows["lowres"], size=references.shape[-2:], mode="bicubic",
                                                align_corners=False).clamp(-1, 1))
        reconstruction = images_to_uint8(_reconstruct(model, rows["image"]))  # the ceiling of a latent model
        contenders = (("sample", samples), ("sample_raw", raw), ("bicubic", bicubic), ("reconstruction", reconstruction))
        for name, images in ((name, images) for name, images in contenders if images is not None):
            found = distribution(images)
            metrics.update({f"psnr_{name}": _mean(psnr(images, references)), f"ssim_{name}": _mean(ssim(images, references)),
                            f"fid_{name}": found["fid"]})
        metrics["fid_name"] = found["fid_name"]
    elif task == "inpaint":
        mask = rows["mask"]
        reconstruction = images_to_uint8(_reconstruct(model, rows["image"]))
        median_fill = _median_fill(references, mask)
        found = distribution(samples, captions)
        metrics.update({
            "psnr_inside_sample": pooled_psnr(samples, references, mask), "l1_inside_sample": _mean(l1(samples, references, mask)),
            "psnr_inside_median_fill": pooled_psnr(median_fill, references, mask),
            "l1_inside_median_fill": _mean(l1(median_fill, references, mask)),
            "psnr_outside_sample": _mean(psnr(samples, references, 1 - mask)),
            "psnr_outside_reconstruction": _mean(psnr(reconstruction, references, 1 - mask)),
            **({} if raw is None else {"psnr_outside_sample_raw": _mean(psnr(raw, references, 1 - mask)),
                                       "fid_sample_raw": distribution(raw)["fid"]}),
            "mask_fraction": float(mask.mean()), "fid_sample": found["fid"], "fid_name": found["fid_name"],
            **{key: value for key, value in found.items() if key.startswith("prompt_fidelity")},
        })
        if captions is not None:  # shapes: hide the object itself and ask the caption to bring it back
            object_rows = {**rows, "mask": object_cell_masks(rows["caption"], mask)}
            object_samples, object_raw = _sample_rows(model, object_rows, settings, batch_size, autocast_dtype(precision))
            metrics.update(_object_fill_metrics(object_samples, references, object_rows["mask"], captions, distribution))
            if object_raw is not None:
                metrics["psnr_outside_object_fill_raw"] = _mean(psnr(object_raw, references, 1 - object_rows["mask"]))
            metrics["psnr_outside_object_reconstruction"] = _mean(psnr(reconstruction, references, 1 - object_rows["mask"]))
            _save_triples(os.path.join(out, "object_grid.png"), model, object_rows, object_samples, references)
    else:
        metrics.update(_semantic_metrics(samples, references, rows["semantic_map"], model))
        found = distribution(samples, captions)
        metrics.update({"fid_sample": found["fid"], "fid_name": found["fid_name"],
                        **{key: value for key, value in found.items() if key.startswith("prompt_fidelity")}})
    metrics.update(checkpoint=os.path.abspath(ckpt), sampler={**settings.as_dict(), "batch_size": batch_size},
                   data=data_config, features=found["features"])
    _write_outputs(out, model, rows, samples, references, metrics)
    return metrics


def _val_rows(datamodule: Any, limit: int) -> dict[str, Any]:
    """The first `limit` val rows, every field (images, conditions, captions) concatenated."""
    rows: dict[str, list] = {}
    count = 0
    for batch in datamodule.val_dataloader():
        take = min(len(batch["image"]), limit - count)
        for key, value in batch.items():
            if key != "num_skipped":
                rows.setdefault(key, []).append(value[:take])
        count += take
        if count >= limit:
            break
    if count == 0:
        raise ValueError("the data config's val split is empty: evaluation needs val images.")
    return {key: torch.cat(parts) if isinstance(parts[0], torch.Tensor) else [x for part in parts for x in part]
            for key, parts in rows.items()}


@torch.no_grad()
def _sample_rows(model: Any, rows: dict[str, Any], settings: SamplerSettings, batch_size: int,
                 dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """uint8 samples for every row's conditions (row i seeded with settings.seed + i) as `settings` make them, and,
    when they apply pixel consistency, the decoder's own output before it (else None): one sampling run for both."""
    keys = {"caption", "class_label", "lowres", "image", "mask", "semantic_map"} & set(rows)
    size = tuple(rows["image"].shape[-2:])
    model_only = replace(settings, pixel_consistency=False)
    outputs, raw_outputs = [], []
    for start in range(0, len(rows["image"]), batch_size):
        batch = {key: rows[key][start:start + batch_size] for key in keys}
        with torch.autocast(model.device.type, dtype=dtype, enabled=dtype is not None):
            images = model.generate(batch, settings=model_only, seed_offset=start, image_size=size).float().cpu()
        raw_outputs.append(images_to_uint8(images))
        if settings.pixel_consistency:
            outputs.append(images_to_uint8(enforce_condition(images, batch)))
    if not settings.pixel_consistency:
        return torch.cat(raw_outputs), None
    return torch.cat(outputs), torch.cat(raw_outputs)


@torch.no_grad()
def _reconstruct(model: Any, images: torch.Tensor) -> torch.Tensor:
    """The autoencoder's reconstruction D(E(x)) (posterior mode): the ceiling of anything decoded from latents."""
    outputs = []
    for chunk in images.split(16):
        latents = model.first_stage.encode(chunk.to(model.device)).mode()
        outputs.append(model.first_stage.decode(latents).clamp(-1, 1).cpu())
    return torch.cat(outputs)


def _median_fill(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The baseline fill: every masked pixel set to the per-channel median of the image's known pixels."""
    filled = images.clone()
    for i in range(len(images)):
        known = mask[i, 0] == 0
        if known.any():
            median = images[i][:, known].median(dim=1).values
            filled[i][:, ~known] = median[:, None]
    return filled


def object_cell_masks(captions: list[str], like: torch.Tensor) -> torch.Tensor:
    """Masks (B, 1, H, W) like `like` that cover exactly the grid cell of each caption's object (shapes data):
    the known pixels are background only, so what fills the cell comes from the caption alone."""
    masks = torch.zeros_like(like)
    for index, caption in enumerate(captions):
        x0, y0, x1, y1 = cell_box(parse_caption_objects(caption)[0]["position"], like.shape[-1])
        masks[index, :, y0:y1, x0:x1] = 1
    return masks


def _object_fill_metrics(samples: torch.Tensor, references: torch.Tensor, masks: torch.Tensor, captions: list[str],
                         distribution: Any) -> dict[str, Any]:
    """Caption fidelity of the completions of object-cell masks (`object_fill_*`: does the fill bring back the
    named object?) beside the same judge on median fills of those masks (`object_removed_*`: the object gone, so
    these sit near chance unless the judge reads the background) and PSNR outside the masks."""
    found: dict[str, Any] = {"psnr_outside_object_fill": _mean(psnr(samples, references, 1 - masks))}
    for name, images in (("fill", samples), ("removed", _median_fill(references, masks))):
        judged = distribution(images, captions)
        found.update({key.replace("prompt_fidelity", f"object_{name}"): value for key, value in judged.items()
                      if key.startswith("prompt_fidelity")})
    return found


def _semantic_metrics(samples: torch.Tensor, references: torch.Tensor, maps: torch.Tensor, model: Any) -> dict[str, Any]:
    part = concat_parts(model.conditioner)[0]
    if part.num_classes != SHAPES_SEMANTIC_CLASSES or not bool((maps < SHAPES_SEMANTIC_CLASSES).all()):
        log.warning("semantic agreement is judged by the shapes colours; these maps are not shapes maps.")
        return {"agreement_sample": None}
    found: dict[str, Any] = {}
    shuffled = maps.roll(1, dims=0)  # chance: each sample against another sample's map
    for name, images, against in (("sample", samples, maps), ("chance", samples, shuffled), ("real", references, maps)):
        scores = semantic_colour_agreement(images, against)
        found[f"agreement_{name}"] = _mean(scores["agreement"])
        found[f"object_agreement_{name}"] = _mean(scores["object_agreement"])
    return found


def _mean(values: torch.Tensor) -> float:
    finite = values[~torch.isnan(values)]
    return float(finite.clamp(max=100.0).mean()) if len(finite) else math.nan  # identical images: PSNR capped at 100


def _write_outputs(out: str, model: Any, rows: dict[str, Any], samples: torch.Tensor, references: torch.Tensor,
                   metrics: dict[str, Any]) -> None:
    samples_dir = os.path.join(out, "samples")
    os.makedirs(samples_dir, exist_ok=True)
    for index, image in enumerate(samples):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(os.path.join(samples_dir, f"{index:05d}.png"))
    _save_triples(os.path.join(out, "grid.png"), model, rows, samples, references)
    metrics["samples_dir"] = samples_dir
    write_task_report(out, metrics)


def _save_triples(path: str, model: Any, rows: dict[str, Any], samples: torch.Tensor, references: torch.Tensor) -> None:
    """condition | sample | reference for the first 8 rows, one row each."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    shown = min(8, len(samples))
    conditions = condition_images(model, {k: v[:shown] for k, v in rows.items() if isinstance(v, torch.Tensor)},
                                  samples.shape[-2:])
    triples = torch.stack([conditions, samples[:shown].float() / 127.5 - 1, references[:shown].float() / 127.5 - 1], 1)
    save_image_grid(triples.flatten(0, 1), path, nrow=3)


def write_task_report(out: str, metrics: dict[str, Any]) -> None:
    """`out/metrics.json` and `out/metrics.md` (one row per number, baselines beside the samples)."""
    with open(os.path.join(out, "metrics.json"), "w") as handle:
        json.dump(metrics, handle, indent=1, default=str)
    lines = ["| metric | value |", "|---|---|"]
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) or value is None:
            lines.append(f"| {key} | {'n/a' if value is None else f'{value:.4f}' if isinstance(value, float) else value} |")
    with open(os.path.join(out, "metrics.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
