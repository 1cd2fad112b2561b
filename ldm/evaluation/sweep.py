"""Quality-diversity curves: one checkpoint evaluated over a grid of sampling settings (guidance scale, steps,
sampler), each generated once with the same seeds, against one set of reference statistics.

The paper reads mode coverage from precision and recall and reports its models along guidance scales
(Rombach et al. 2022, Fig. 17 / Tab. 2-3): this module writes that curve, not one point.

    python evaluate.py ckpt=PATH sweep.cfg_scale=[1,1.5,2,3,5] sweep.steps=[10,20] sweep.sampler=[ddim,dpmpp_2m]

Writes `sweep.json` (one record per setting: FID, KID ± std, precision / recall with bootstrap intervals,
density, coverage, IS, prompt fidelity where the data has it, seconds per image), `sweep.md` (the table) and
`sweep.png` (FID vs guidance scale, and the precision-recall curve, one line per sampler and step count).
Setting `<label>/samples/` folders hold the images, so every number can be checked with a plain evaluate.py.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import time
from typing import Any, Mapping, Sequence

import numpy as np

from ldm.diffusion.settings import SamplerSettings
from ldm.evaluation.evaluate import (
    EvaluationOptions,
    check_sample_count,
    checkpoint_global_step,
    evaluation_conditions,
    extract_features,
    features_and_reference,
    metrics_of_features,
)
from ldm.evaluation.image_sources import ImageFolder, ImageSource
from ldm.evaluation.metrics_files import markdown_table
from ldm.inference.sampling import generate_to_dir
from ldm.loading.checkpoints import load_latent_diffusion
from ldm.metrics import manifold_membership
from ldm.utils.devices import autocast_dtype, resolve_device

SWEEPABLE = ("cfg_scale", "steps", "sampler", "eta", "timestep_spacing", "guidance_rescale")
BOOTSTRAP_ROUNDS = 50
TABLE_COLUMNS = (("fid", "{fid_name}"), ("kid", "{kid_name}"), ("kid_std", "± std"), ("precision", "precision"),
                 ("precision_interval", "P 90 % interval"), ("recall", "recall"), ("recall_interval", "R 90 % interval"),
                 ("density", "density"), ("coverage", "coverage"), ("is_mean", "IS"), ("prompt_fidelity_all", "fidelity"),
                 ("seconds_per_image", "s / image"))


def sweep_settings(base: SamplerSettings, grid: Mapping[str, Sequence[Any] | None]) -> list[SamplerSettings]:
    """Every combination of the swept values (keys of SWEEPABLE), the other settings from `base`; same seed."""
    unknown = sorted(set(grid) - set(SWEEPABLE))
    if unknown:
        raise ValueError(f"sweep.{unknown[0]} cannot be swept; sweep one of: {', '.join(SWEEPABLE)}.")
    axes = {key: list(values) for key, values in grid.items() if values}
    if not axes:
        raise ValueError("the sweep is empty: give at least one list, e.g. sweep.cfg_scale=[1,3,5].")
    return [dataclasses.replace(base, **dict(zip(axes, values))) for values in itertools.product(*axes.values())]


def sweep_checkpoint(
    ckpt: str, reference: ImageSource, out: str, grid: Mapping[str, Sequence[Any] | None], *, num_samples: int,
    base: SamplerSettings = SamplerSettings(), options: EvaluationOptions = EvaluationOptions(), batch_size: int = 16,
    use_ema: bool = True, precision: str = "fp32", settings: Sequence[SamplerSettings] | None = None,
) -> list[dict[str, Any]]:
    """Evaluate `ckpt` at each setting of `grid` (or at the given `settings`, a list that is not a grid, e.g.
    benchmarks/sampling.py's solvers); the model, extractor and reference statistics are built once."""
    settings = list(settings) if settings is not None else sweep_settings(base, grid)
    check_sample_count(num_samples, options)
    model = load_latent_diffusion(ckpt, use_ema=use_ema, device=resolve_device(options.device))
    conditions = evaluation_conditions(model, num_samples, reference.captions)
    extractor, statistics = features_and_reference(reference, model.hparams.image_size, options)
    records = []
    for setting in settings:
        label = setting_label(setting)
        samples_dir = os.path.join(out, label, "samples")
        start = time.perf_counter()
        generate_to_dir(model, conditions, samples_dir, setting, batch_size=batch_size, ckpt=ckpt,
                        autocast_dtype=autocast_dtype(precision))
        seconds = (time.perf_counter() - start) / len(conditions)
        folder = ImageFolder(samples_dir)
        fake = extract_features(extractor, folder.batches(options.batch_size, getattr(extractor, "input_size", None)),
                                f"features {label}", len(folder.files))
        metrics = metrics_of_features(fake, statistics, extractor, k=options.k, density_k=options.density_k,
                                      captions=folder.captions())
        low_high = bootstrap_precision_recall(statistics.features, fake.numpy(), k=options.k)
        records.append({"setting": dataclasses.asdict(setting), "label": label, "samples_dir": samples_dir,
                        **metrics, **low_high, "seconds_per_image": seconds})
    write_sweep(records, out, checkpoint={"path": os.path.abspath(ckpt), "global_step": checkpoint_global_step(ckpt)})
    return records


def setting_label(setting: SamplerSettings) -> str:
    label = f"{setting.sampler}_steps{setting.steps}_cfg{setting.cfg_scale:g}"
    label += f"_eta{setting.eta:g}" if setting.eta else ""
    label += f"_rescale{setting.guidance_rescale:g}" if setting.guidance_rescale else ""
    return label + (f"_{setting.timestep_spacing}" if setting.timestep_spacing != SamplerSettings.timestep_spacing else "")


def bootstrap_precision_recall(real: np.ndarray, fake: np.ndarray, k: int, rounds: int = BOOTSTRAP_ROUNDS,
                               seed: int = 0) -> dict[str, list[float]]:
    """5th-95th percentile of precision and recall over bootstrap resamples (Efron 1979) of their per-point terms
    (`manifold_membership`): how much the numbers of a small evaluation would move with another draw of samples,
    the two manifolds held fixed. Resampling the features instead would bias recall down (duplicates shrink the
    k-NN radii), so that its interval could miss the point estimate."""
    rng = np.random.default_rng(seed)
    fake_inside, real_inside = manifold_membership(real, fake, k=k)
    precision = [fake_inside[rng.integers(0, len(fake_inside), len(fake_inside))].mean() for _ in range(rounds)]
    recall = [real_inside[rng.integers(0, len(real_inside), len(real_inside))].mean() for _ in range(rounds)]
    (p_low, r_low), (p_high, r_high) = np.percentile(np.stack([precision, recall], axis=1), [5, 95], axis=0)
    return {"precision_interval": [float(p_low), float(p_high)], "recall_interval": [float(r_low), float(r_high)]}


def write_sweep(records: list[dict[str, Any]], out: str, checkpoint: Mapping[str, Any]) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "sweep.json"), "w") as handle:
        json.dump({"checkpoint": dict(checkpoint), "settings": records}, handle, indent=1, default=str)
    with open(os.path.join(out, "sweep.md"), "w") as handle:
        handle.write(sweep_table(records))
        handle.write("\nEach setting's full metrics table: `<label>/metrics.md`.\n")
    for record in records:
        with open(os.path.join(out, record["label"], "metrics.md"), "w") as handle:
            handle.write(markdown_table(record))
    plot_sweep(records, os.path.join(out, "sweep.png"))


SETTING_COLUMNS = (("sampler", "sampler"), ("steps", "steps"), ("cfg_scale", "cfg"), ("eta", "eta"),
                   ("timestep_spacing", "spacing"), ("guidance_rescale", "rescale"))
FIDELITY_HEADS = (("prompt_fidelity_color", "colour"), ("prompt_fidelity_shape", "shape"),
                  ("prompt_fidelity_position", "position"))


def varying_settings(records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The setting columns a table needs: sampler, steps and cfg always, the other knobs when they vary (so that
    no two rows look alike)."""
    return [(key, title) for key, title in SETTING_COLUMNS
            if key in ("sampler", "steps", "cfg_scale") or len({str(r["setting"][key]) for r in records}) > 1]


def sweep_table(records: list[dict[str, Any]]) -> str:
    names = {"fid_name": records[0].get("fid_name") or "FID", "kid_name": records[0].get("kid_name") or "KID"}
    settings = varying_settings(records)
    heads = [(key, title) for key, title in FIDELITY_HEADS if records[0].get(key) is not None]
    columns = [*((key, title.format(**names)) for key, title in TABLE_COLUMNS), *heads]
    header = [title for _, title in settings] + [title for _, title in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for record in records:
        cells = [_cell(record["setting"][key]) for key, _ in settings]
        cells += [_cell(record.get(key)) for key, _ in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_sweep(records: list[dict[str, Any]], path: str) -> str:
    """FID vs guidance scale and precision vs recall, one line per combination of the other swept settings."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    figure, (fid_axes, pr_axes) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=150)
    line_keys = [(key, title) for key, title in varying_settings(records) if key != "cfg_scale"]
    lines: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for record in records:
        lines.setdefault(tuple(record["setting"][key] for key, _ in line_keys), []).append(record)
    for values, group in lines.items():
        group = sorted(group, key=lambda r: r["setting"]["cfg_scale"])
        scales = [r["setting"]["cfg_scale"] for r in group]
        label = ", ".join(f"{title} {_cell(value)}" for (_, title), value in zip(line_keys, values))
        fid_axes.plot(scales, [r["fid"] for r in group], marker="o", label=label)
        pr_axes.plot([r["recall"] for r in group], [r["precision"] for r in group], marker="o", label=label)
        for r in group:
            pr_axes.annotate(f"{r['setting']['cfg_scale']:g}", (r["recall"], r["precision"]), fontsize=6)
    fid_axes.set_xlabel("guidance scale")
    fid_axes.set_ylabel(records[0].get("fid_name") or "FID")
    pr_axes.set_xlabel("recall")
    pr_axes.set_ylabel("precision")
    pr_axes.set_title("labels: guidance scale", fontsize=7)
    for axes in (fid_axes, pr_axes):
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, list):
        return "[" + ", ".join(f"{v:.3f}" for v in value) + "]"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
