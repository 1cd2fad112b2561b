"""Sample quality as the LDM paper reports it: FID and improved precision / recall (plus density /
coverage, Inception score and, on the built-in shapes data, prompt fidelity).

One core, three users: `evaluate.py` and the training pipeline's `after_training` hooks (`evaluate`: a
checkpoint or a folder of images against a data split or a folder) and `ldm.training.callbacks.EvaluationCallback`
(`evaluate_images` on samples drawn during training). Image sources live in `ldm.evaluation.image_sources`.

Every distance is named after the features it was computed on (`fid_name`: `FID` for Inception-v3,
`FID_CLIP`, `FD_DINOv2`, `FID_shapes_cnn`): a shapes-CNN FID is comparable only with other shapes-CNN
FIDs, never with an Inception FID.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from PIL import Image
from tqdm import tqdm

from ldm.diffusion.settings import SamplerSettings
from ldm.evaluation.diagnostics import caption_diagnostics, reconstruction_fidelity
from ldm.evaluation.feature_warnings import feature_warnings, warnings_entry
from ldm.evaluation.image_sources import ImageFolder, ImageSource, reference_images
from ldm.evaluation.metrics_files import write_report
from ldm.inference.sampling import (
    conditions_for,
    generate_to_dir,
    load_latent_diffusion,
)
from ldm.metrics import (
    FeatureExtractor,
    ReferenceStatistics,
    build_extractor,
    density_coverage,
    feature_statistics,
    frechet_distance,
    inception_score,
    precision_recall,
    reference_identity,
    reference_statistics,
)
from ldm.metrics.clip_score import CLIPScore, build_clip_score, clip_score_metrics
from ldm.metrics.kid import kernel_inception_distance
from ldm.metrics.published_stats import load_published_statistics
from ldm.metrics.shapes_classifier import HEADS
from ldm.models.concat_conditioners import concat_parts, condition_keys
from ldm.utils.devices import autocast_dtype, resolve_device

logger = logging.getLogger(__name__)

AUTO_FEATURES = "auto"
IS_SPLITS = 10  # Salimans et al. 2016 and torch-fidelity


@dataclass(frozen=True)
class EvaluationOptions:
    """How images are compared; `features` is `{"name": auto | shapes_cnn | inception_v3 | clip | dinov2,
    **extractor kwargs}` (null kwargs mean the extractor's default)."""

    features: Mapping[str, Any] = field(default_factory=lambda: {"name": AUTO_FEATURES})
    k: int = 3  # precision / recall neighbourhood, Kynkäänniemi et al. 2019
    density_k: int = 5  # density / coverage neighbourhood, Naeem et al. 2020
    num_real: int | None = None  # reference images to use; None: all of them
    cache_dir: str = ".cache/metrics"  # reference statistics and the shapes classifier
    batch_size: int = 64  # feature extraction
    device: str = "cpu"
    reference_stats: str | None = None  # a published pytorch-fid / ADM .npz (mu, sigma) for the FID
    clip_score: Mapping[str, Any] | None = None  # {"arch", "pretrained"} of the CLIP model; None: no CLIP score


# ------------------------------------------------------------------------------------ features
def build_features(
    spec: Mapping[str, Any] | str | None, *, reference_is_shapes: bool, image_size: int, cache_dir: str,
    device: str | torch.device = "cpu",
) -> FeatureExtractor:
    """The extractor a features spec names. `auto` is `shapes_cnn` when the reference images come from the
    shapes data module, else `inception_v3`; `shapes_cnn` defaults to a classifier at `image_size` cached in
    `cache_dir` (trained there on first use)."""
    kwargs = _as_spec(spec)
    name = kwargs.pop("name", None) or AUTO_FEATURES
    if name == AUTO_FEATURES:
        name = "shapes_cnn" if reference_is_shapes else "inception_v3"
    kwargs = {key: value for key, value in kwargs.items() if value is not None}
    if name == "shapes_cnn":
        kwargs.setdefault("resolution", image_size)
        kwargs.setdefault("weights_path", os.path.join(cache_dir, f"shapes_classifier_{kwargs['resolution']}px.safetensors"))
    return build_extractor(name, device=device, **kwargs)


def _as_spec(spec: Mapping[str, Any] | str | None) -> dict[str, Any]:
    """A features spec as a plain dict: a name, None (auto) or a (Dict)Config mapping."""
    if spec is None or isinstance(spec, str):
        return {"name": spec or AUTO_FEATURES}
    return {key: value for key, value in dict(spec).items() if key != "_target_"}


def extract_features(extractor: FeatureExtractor, batches: Iterable[torch.Tensor], desc: str,
                     total: int | None = None) -> torch.Tensor:
    """(N, dim) features of uint8 batches, on the CPU, with a progress bar counting images."""
    features = []
    with tqdm(total=total, desc=desc, unit="img") as progress:
        for batch in batches:
            features.append(extractor(batch).cpu())
            progress.update(len(batch))
    if not features:
        raise ValueError(f"{desc}: no images to extract features from.")
    return torch.cat(features)


def reference_statistics_for(source: ImageSource, extractor: FeatureExtractor, options: EvaluationOptions,
                             **extra_identity: Any) -> ReferenceStatistics:
    """Statistics of the reference images, from the cache under `options.cache_dir` when computed before, or
    the published ones of `options.reference_stats` (ldm.metrics.published_stats)."""
    if options.reference_stats:
        return load_published_statistics(options.reference_stats, extractor)
    identity = reference_identity(source.identity(), source.split, source.resolution, extractor,
                                  num_real=options.num_real, **extra_identity)

    def compute_features() -> torch.Tensor:
        batches = source.batches(options.batch_size, getattr(extractor, "input_size", None), options.num_real)
        return extract_features(extractor, batches, "reference features", options.num_real)

    return reference_statistics(identity, compute_features, options.cache_dir)


# ------------------------------------------------------------------------------------ metrics
def evaluate_images(
    images: torch.Tensor | Iterable[torch.Tensor], reference: ReferenceStatistics, extractor: FeatureExtractor, *,
    k: int = 3, density_k: int = 5, captions: Sequence[str] | None = None, batch_size: int = 64,
) -> dict[str, Any]:
    """All metrics of generated uint8 images (a (N, 3, H, W) tensor or an iterable of batches) against
    reference statistics. `captions` (one per image) add prompt fidelity with the shapes classifier."""
    total = len(images) if isinstance(images, torch.Tensor) else None
    batches = images.split(batch_size) if isinstance(images, torch.Tensor) else images
    fake = extract_features(extractor, batches, "generated features", total)
    return metrics_of_features(fake, reference, extractor, k=k, density_k=density_k, captions=captions)


def metrics_of_features(
    fake: torch.Tensor, reference: ReferenceStatistics, extractor: FeatureExtractor, *, k: int = 3,
    density_k: int = 5, captions: Sequence[str] | None = None,
) -> dict[str, Any]:
    """`evaluate_images` for features already extracted (by `extractor`) from the generated images."""
    described = extractor.describe()
    network = described.pop("name")
    fid_name, is_name = extractor.metric_names()
    mu, sigma = feature_statistics(fake)
    real = reference.features  # None for published statistics: no k-NN metrics, no KID
    precision, recall = precision_recall(real, fake, k=k) if real is not None else (None, None)
    density, coverage = density_coverage(real, fake, k=density_k) if real is not None else (None, None)
    logits = extractor.class_log_probabilities(fake)
    is_splits = min(IS_SPLITS, len(fake))
    is_mean, is_std = inception_score(logits, splits=is_splits) if logits is not None else (None, None)
    return {
        "fid": frechet_distance(reference.mu, reference.sigma, mu, sigma), "fid_name": fid_name,
        **(_kid(real, fake, fid_name) if real is not None else {"kid": None, "kid_std": None}),
        "precision": precision, "recall": recall, "density": density, "coverage": coverage,
        "is_mean": is_mean, "is_std": is_std, "is_name": is_name if logits is not None else None,
        "is_splits": is_splits if logits is not None else None,
        **_prompt_fidelity(extractor, fake, captions),
        "num_samples": len(fake), "num_real": reference.num_samples, "k": k, "density_k": density_k,
        "features": {"network": network, **described},
        "reference": {"statistics": reference.path, "cache_hit": reference.cache_hit,
                      "num_real_precision_recall": len(real) if real is not None else 0,
                      **({"published": reference.identity} if "published" in reference.identity else {})},
    }


def _kid(real: torch.Tensor, fake: torch.Tensor, fid_name: str) -> dict[str, Any]:
    """KID (unbiased, with its std over subsets) on the same features as the FID: `KID` beside `FID`, `KID_CLIP`
    beside `FID_CLIP`, ..., so the name says what the features were."""
    mean, std, subset_size = kernel_inception_distance(real, fake)
    return {"kid": mean, "kid_std": std, "kid_name": "K" + fid_name[1:],
            "kid_subset_size": subset_size}


def _prompt_fidelity(extractor: FeatureExtractor, features: torch.Tensor,
                     captions: Sequence[str] | None) -> dict[str, float | None]:
    """The extractor's agreement with the captions, where it can judge them; None where it is undefined."""
    undefined = {f"prompt_fidelity_{head}": None for head in (*HEADS, "all")}
    if not captions or not all(captions):
        return undefined
    if len(captions) != len(features):
        raise ValueError(f"got {len(captions)} captions for {len(features)} generated images.")
    try:
        return extractor.prompt_fidelity(features, captions) or undefined
    except ValueError as error:  # multi-object or foreign captions
        logger.warning("prompt fidelity not computed: %s", error)
        return undefined


# ------------------------------------------------------------------------------------ checkpoints and folders
def evaluate(
    out: str, ckpt: str | None = None, fake_dir: str | None = None, data: Any = None, real_dir: str | None = None,
    num_samples: int = 1000, num_real: int | None = None, features: Mapping[str, Any] | str | None = None,
    k: int = 3, density_k: int = 5, cache_dir: str = ".cache/metrics", feature_batch_size: int = 64,
    sampling: SamplerSettings | Mapping[str, Any] | None = None, batch_size: int = 16, use_ema: bool = True,
    device: str = "auto", precision: str = "fp32", diagnostics: bool = False, diagnostics_samples: int = 256,
    reference_stats: str | None = None, clip_score: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What `evaluate.py` does, with plain arguments (configs/evaluate.yaml documents them): sample `ckpt`
    (or read `fake_dir`) with `sampling` (SamplerSettings or a `sampling` config node), compare with
    `real_dir` or the val split of `data` (a data config or a built data module), write `out/metrics.json`
    and `out/metrics.md`; return the metrics. `diagnostics` adds caption sensitivity and signal leak
    (ldm.evaluation.diagnostics) of the checkpoint, on `diagnostics_samples` reference images."""
    if (ckpt is None) == (fake_dir is None):
        raise ValueError("pass exactly one of ckpt=PATH (sample, then evaluate) or fake_dir=DIR (evaluate images).")
    clip = dict(clip_score or {})
    options = EvaluationOptions(features=_as_spec(features), k=k, density_k=density_k, num_real=num_real,
                                cache_dir=cache_dir, batch_size=feature_batch_size, device=device,
                                reference_stats=reference_stats, clip_score=clip if clip and clip.pop("enabled", True) else None)
    reference = reference_images(data, real_dir)
    if fake_dir is not None:
        return evaluate_folder(fake_dir, reference, out, options)
    return evaluate_checkpoint(ckpt, reference, out, num_samples=num_samples, options=options, batch_size=batch_size,
                               settings=SamplerSettings.of(sampling), use_ema=use_ema, precision=precision,
                               diagnostics_samples=diagnostics_samples if diagnostics else 0)


def evaluate_checkpoint(
    ckpt: str, reference: ImageSource, out: str, *, num_samples: int, settings: SamplerSettings = SamplerSettings(),
    options: EvaluationOptions = EvaluationOptions(), batch_size: int = 16, use_ema: bool = True,
    precision: str = "fp32", diagnostics_samples: int = 0,
) -> dict[str, Any]:
    """Sample `num_samples` images from `ckpt` into `out/samples/`, evaluate them against `reference`,
    write `out/metrics.json` and `out/metrics.md`; return the metrics.

    Conditions: the reference's captions in order (text models), classes in turn (class models), or none.
    Extractor and reference statistics are ready before sampling starts, so a missing weight file fails
    in seconds, not after an hour of sampling."""
    check_sample_count(num_samples, options)
    dtype = autocast_dtype(precision)
    model = load_latent_diffusion(ckpt, use_ema=use_ema, device=resolve_device(options.device))
    conditions = evaluation_conditions(model, num_samples, reference.captions)  # refuses image-conditioned models
    extractor, statistics = features_and_reference(reference, model.hparams.image_size, options)
    if options.clip_score is not None and model.conditioner.batch_key != "caption":
        raise ValueError("clip_score.enabled=true scores images against their prompts: this model has none.")
    scorer = clip_scorer(options)  # offline without its weights: fails here, before sampling
    samples_dir = os.path.join(out, "samples")
    generate_to_dir(model, conditions, samples_dir, settings, batch_size=batch_size, ckpt=ckpt, autocast_dtype=dtype)
    metrics = _evaluate_folder_against(ImageFolder(samples_dir), statistics, extractor, options, scorer)
    metrics.update(warnings_entry(extractor, reference))
    metrics.update(checkpoint={"path": os.path.abspath(ckpt), "global_step": checkpoint_global_step(ckpt),
                               "use_ema": use_ema},
                   sampler={**settings.as_dict(), "batch_size": batch_size, "autocast_precision": precision},
                   samples_dir=samples_dir)
    if metrics.get("prompt_fidelity_all") is not None:  # the samples were judged: so can the reconstructions be
        metrics.update(reconstruction_fidelity(model, reference, extractor, num_samples, batch_size))
    if diagnostics_samples:
        metrics["diagnostics"] = caption_diagnostics(model, reference, settings, diagnostics_samples, batch_size)
    write_report(metrics, out)
    return metrics


def diagnose_checkpoint(out: str, ckpt: str, data: Any = None, real_dir: str | None = None,
                        sampling: SamplerSettings | Mapping[str, Any] | None = None, num_samples: int = 256,
                        batch_size: int = 16, use_ema: bool = True, device: str = "auto") -> dict[str, Any]:
    """`evaluate.py report=captions`: the diagnostics of `ckpt` alone (no sampling), in `out/metrics.json`
    and `out/metrics.md`."""
    model = load_latent_diffusion(ckpt, use_ema=use_ema, device=resolve_device(device))
    settings = SamplerSettings.of(sampling)
    metrics = {"diagnostics": caption_diagnostics(model, reference_images(data, real_dir), settings, num_samples,
                                                  batch_size),
               "checkpoint": {"path": os.path.abspath(ckpt), "global_step": checkpoint_global_step(ckpt),
                              "use_ema": use_ema},
               "sampler": settings.as_dict()}
    write_report(metrics, out)
    return metrics


def evaluate_folder(fake_dir: str, reference: ImageSource, out: str,
                    options: EvaluationOptions = EvaluationOptions()) -> dict[str, Any]:
    """Evaluate a folder of generated images (prompt fidelity from its samples.json / .txt captions);
    write `out/metrics.json` and `out/metrics.md`; return the metrics."""
    fake = ImageFolder(fake_dir, "fake_dir")
    check_sample_count(len(fake.files), options)
    with Image.open(os.path.join(fake.path, fake.files[0])) as first_image:
        image_size = first_image.size[1]
    extractor, statistics = features_and_reference(reference, image_size, options)
    metrics = _evaluate_folder_against(fake, statistics, extractor, options, clip_scorer(options))
    metrics.update(warnings_entry(extractor, reference), fake_dir=fake.path)
    write_report(metrics, out)
    return metrics


def evaluation_conditions(model: Any, num_samples: int, captions: Callable[[int], list[str]],
                          rows: Callable[[Sequence[str], int], list[dict[str, Any]]] | None = None) -> list[Any]:
    """One condition per sample: the first `num_samples` reference captions (repeated when there are
    fewer), classes 0, 1, ... in turn (balanced), or None for unconditional models. An image-conditioned
    model (concat: low-res image, mask, semantic map) gets the reference's condition `rows` instead (a
    DataSplitImages' `condition_rows`: the val samples' fields it is conditioned on, its caption included),
    so its samples are drawn for the conditions of the very images they are compared with."""
    if concat_parts(model.conditioner):
        if rows is None:
            task = concat_parts(model.conditioner)[0].task
            raise ValueError(f"this checkpoint is an image-conditioned model (task={task}), evaluated on its "
                             f"conditions: use `python evaluate.py task={task} ckpt=...`.")
        found = rows(condition_keys(model.conditioner), num_samples)
        if not found:
            raise ValueError("the reference val split is empty: no conditions to evaluate the model on.")
        return [found[i % len(found)] for i in range(num_samples)]
    key = model.conditioner.batch_key
    if key == "caption":
        prompts = [caption for caption in captions(num_samples) if caption]
        if not prompts:
            raise ValueError("this is a text-conditioned model but the reference images have no captions to "
                             "use as prompts; use a data config with captions or a real_dir with .txt captions.")
        return conditions_for(model, [prompts[i % len(prompts)] for i in range(num_samples)], [], 1)
    if key == "class_label":
        labels = [i % model.conditioner.num_classes for i in range(num_samples)]
        return conditions_for(model, [], labels, 1)
    return conditions_for(model, [], [], num_samples)


def condition_captions(conditions: Sequence[Any]) -> list[str]:
    """The caption of each evaluation condition ("" for classes, unconditional and caption-less rows): the
    prompts prompt fidelity judges the samples by."""
    return [c if isinstance(c, str) else c.get("caption", "") if isinstance(c, Mapping) else "" for c in conditions]


def checkpoint_global_step(path: str) -> int | None:
    """The training step a Lightning checkpoint was saved at (memory-mapped: no weights are read); None
    for an exported `.safetensors` model, which keeps no step."""
    if path.endswith(".safetensors"):
        return None
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return checkpoint.get("global_step")


def features_and_reference(reference: ImageSource, image_size: int,
                            options: EvaluationOptions) -> tuple[FeatureExtractor, ReferenceStatistics]:
    extractor = build_features(options.features, reference_is_shapes=reference.is_shapes, image_size=image_size,
                               cache_dir=options.cache_dir, device=resolve_device(options.device))
    for warning in feature_warnings(extractor, reference):
        logger.warning("%s", warning)
    return extractor, reference_statistics_for(reference, extractor, options)


def clip_scorer(options: EvaluationOptions) -> CLIPScore | None:
    if options.clip_score is None:
        return None
    return build_clip_score(**options.clip_score, device=resolve_device(options.device))


def _evaluate_folder_against(fake: ImageFolder, statistics: ReferenceStatistics, extractor: FeatureExtractor,
                             options: EvaluationOptions, scorer: CLIPScore | None = None) -> dict[str, Any]:
    batches = fake.batches(options.batch_size, getattr(extractor, "input_size", None))
    captions = fake.captions()
    metrics = evaluate_images(batches, statistics, extractor, k=options.k, density_k=options.density_k,
                              captions=captions)
    if scorer is not None:
        if not all(captions):
            raise ValueError(f"clip_score needs a prompt for every image; {fake.path} has images without one "
                             "(samples.json or <image>.txt).")
        scores = torch.cat([scorer(images, captions[start:start + len(images)]) for start, images in
                            zip(range(0, len(captions), options.batch_size), fake.batches(options.batch_size))])
        metrics.update(clip_score_metrics(scores, scorer))
    return metrics


def check_sample_count(num_samples: int, options: EvaluationOptions) -> None:
    """Refuse sample counts the k-NN metrics cannot use, before any sampling time is spent."""
    smallest = max(options.k, options.density_k) + 1
    if num_samples < max(smallest, 2):
        raise ValueError(f"num_samples={num_samples} is too few: k-NN metrics with k={options.k} / "
                         f"density_k={options.density_k} need at least {smallest} samples.")


# ------------------------------------------------------------------------------------ reports
