"""Reports a person puts in a paper: the first-stage factor comparison, and the table of a hyperparameter sweep.

    python evaluate.py report=compare runs=outputs/compare_factors/<date>_<time> out=DIR
    python -m ldm.cli.report compare outputs/compare_factors/<date>_<time> --out DIR
    python -m ldm.cli.report sweep outputs/<task>/multiruns/<date>_<time>           # -> <sweep dir>/sweep_summary.md

The factor comparison reads what the runs left behind (config_resolved.yaml, csv/metrics.csv,
eval/metrics.jsonl, checkpoints/last.ckpt, and the stage-1 run its first_stage_ckpt lives in) and writes
`DIR/report.md` (one row per run), `DIR/fid_vs_steps.png`, `DIR/samples.png` (the same prompts and seeds for
every factor) and `DIR/report.json`. A crashed or unfinished run keeps its row, with its status.
"""
from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image, ImageDraw

from ldm.diffusion.settings import SamplerSettings
from ldm.inference.sampling import (
    conditions_for,
    generate_to_dir,
    load_latent_diffusion,
)
from ldm.utils.devices import resolve_device
from ldm.utils.logged_metrics import TRAIN_SAMPLES_PER_SEC as THROUGHPUT_METRIC

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = ("a red circle at the top left", "a green square at the center",
                   "a blue triangle at the bottom right", "a yellow circle at the right")
RESOLVED_CONFIG = "config_resolved.yaml"
HYDRA_CONFIG = os.path.join(".hydra", "config.yaml")


@dataclass
class RunSummary:
    """One row of the comparison; None where a number was not measured (or the run died before it)."""

    run: str
    status: str
    factor: int | None = None
    latent_shape: list[int] | None = None  # (channels, h, w)
    compression_ratio: float | None = None  # image elements per latent element: 3 H W / (c h w)
    ae_params: int | None = None
    ldm_params: int | None = None  # the UNet
    conditioner_params: int | None = None
    ae_val_psnr: float | None = None
    ae_val_lpips: float | None = None
    train_samples_per_sec: float | None = None
    global_step: int | None = None
    max_steps: int | None = None
    fid_name: str | None = None
    fid: float | None = None
    precision: float | None = None
    recall: float | None = None
    eval_step: int | None = None
    checkpoint: str | None = None
    first_stage_ckpt: str | None = None
    fid_history: list[list[float]] = field(default_factory=list)  # [step, fid]


# ---------------------------------------------------------------------------------------------- one run
def summarize_run(run_dir: str) -> RunSummary:
    """Everything the comparison table needs from one run directory, as far as the run got."""
    name = os.path.basename(os.path.normpath(run_dir))
    cfg = _load_config(run_dir)
    if cfg is None:
        return RunSummary(name, status=f"failed: no {RESOLVED_CONFIG} or {HYDRA_CONFIG}")
    row = RunSummary(name, status="failed: no checkpoint", max_steps=_select(cfg, "trainer.max_steps"),
                     factor=_select(cfg, "model.first_stage_factor"),
                     first_stage_ckpt=_select(cfg, "model.first_stage_ckpt"))
    _add_checkpoint_facts(row, run_dir, _select(cfg, "data.resolution"))
    _add_first_stage_metrics(row)
    row.train_samples_per_sec = last_logged(os.path.join(run_dir, "csv", "metrics.csv"), THROUGHPUT_METRIC)
    _add_evaluation(row, os.path.join(run_dir, "eval", "metrics.jsonl"))
    return row


def _load_config(run_dir: str) -> DictConfig | None:
    """The resolved config, else Hydra's composed one (a run that died in stage 1 has only that)."""
    for relative in (RESOLVED_CONFIG, HYDRA_CONFIG):
        path = os.path.join(run_dir, relative)
        if os.path.isfile(path):
            return OmegaConf.load(path)
    return None


def _select(cfg: DictConfig | None, key: str) -> Any:
    """A value of a possibly missing or unresolvable config (`${hydra:...}` outside Hydra): None if unreadable."""
    return None if cfg is None else OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)


def _add_checkpoint_facts(row: RunSummary, run_dir: str, resolution: int | None) -> None:
    path = os.path.join(run_dir, "checkpoints", "last.ckpt")
    if not os.path.isfile(path):
        return
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    state, hparams = checkpoint["state_dict"], checkpoint.get("hyper_parameters") or {}
    row.checkpoint, row.global_step = os.path.abspath(path), checkpoint.get("global_step")
    row.first_stage_ckpt = hparams.get("first_stage_ckpt", row.first_stage_ckpt)
    row.ae_params, row.ldm_params, row.conditioner_params = (
        sum(t.numel() for k, t in state.items() if k.startswith(prefix))
        for prefix in ("first_stage.", "unet.", "conditioner."))
    first_stage = hparams.get("first_stage") or {}
    if first_stage.get("ch_mult"):
        row.factor = 2 ** (len(first_stage["ch_mult"]) - 1)
    resolution = hparams.get("image_size", resolution)
    if row.factor and resolution and first_stage.get("embed_dim"):
        side = resolution // row.factor
        row.latent_shape = [first_stage["embed_dim"], side, side]
        row.compression_ratio = 3 * resolution**2 / (first_stage["embed_dim"] * side**2)
    finished = row.max_steps is not None and row.global_step is not None and row.global_step >= row.max_steps
    row.status = "ok" if finished else f"incomplete: step {row.global_step} of {row.max_steps}"


def _add_first_stage_metrics(row: RunSummary) -> None:
    """Validation PSNR / LPIPS of the stage-1 run the first-stage checkpoint lives in (<run>/checkpoints/x.ckpt)."""
    if not row.first_stage_ckpt:
        return
    stage1_dir = os.path.dirname(os.path.dirname(row.first_stage_ckpt))
    metrics = os.path.join(stage1_dir, "csv", "metrics.csv")
    row.ae_val_psnr = last_logged(metrics, "val/psnr")
    row.ae_val_lpips = last_logged(metrics, "val/lpips")


def _add_evaluation(row: RunSummary, path: str) -> None:
    records = read_jsonl(path)
    row.fid_history = [[r["step"], r["fid"]] for r in records if r.get("fid") is not None]
    if records:
        final = records[-1]
        row.fid_name, row.fid = final.get("fid_name"), final.get("fid")
        row.precision, row.recall = final.get("precision"), final.get("recall")
        row.eval_step = final.get("step")


def last_logged(csv_path: str, metric: str) -> float | None:
    """The last value a CSVLogger file holds for `metric` (rows log different metrics: blanks are skipped)."""
    if not os.path.isfile(csv_path):
        return None
    value = None
    with open(csv_path, newline="") as handle:
        for record in csv.DictReader(handle):
            if record.get(metric) not in (None, ""):
                value = float(record[metric])
    return value


def read_jsonl(path: str) -> list[dict[str, Any]]:
    if not os.path.isfile(path):
        return []
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


# ---------------------------------------------------------------------------------------------- the comparison
def compare_factors(runs: str, out: str, prompts: Sequence[str] = DEFAULT_PROMPTS,
                    sampling: SamplerSettings | Mapping[str, Any] | None = None, device: str = "auto") -> dict[str, Any]:
    """Gather the runs of a factor sweep (the job directories under `runs`) into `out`; return report.json.
    The side-by-side samples are drawn with `sampling` (None: SamplerSettings' defaults)."""
    run_dirs = find_run_dirs(runs)
    rows = sorted((summarize_run(d) for d in run_dirs), key=lambda r: (r.factor is None, r.factor or 0, r.run))
    os.makedirs(out, exist_ok=True)
    settings = SamplerSettings.of(sampling)
    report = {"runs": os.path.abspath(runs), "rows": [asdict(r) for r in rows],
              "fid_vs_steps": plot_fid_vs_steps(rows, os.path.join(out, "fid_vs_steps.png")),
              "samples": sample_side_by_side(rows, out, list(prompts), settings, device),
              "sampling": {**settings.as_dict(), "prompts": list(prompts)}}
    with open(os.path.join(out, "report.json"), "w") as handle:
        json.dump(report, handle, indent=1)
    with open(os.path.join(out, "report.md"), "w") as handle:
        handle.write(markdown_report(rows, report))
    return report


def find_run_dirs(runs: str) -> list[str]:
    """The job directories of a multirun (those with a Hydra or resolved config), or `runs` itself."""
    if not os.path.isdir(runs):
        raise FileNotFoundError(f"runs={runs!r} is not a directory: pass the multirun directory of the sweep "
                                "(e.g. outputs/compare_factors/<date>_<time>).")
    jobs = sorted(os.path.join(runs, name) for name in os.listdir(runs)
                  if any(os.path.isfile(os.path.join(runs, name, f)) for f in (RESOLVED_CONFIG, HYDRA_CONFIG)))
    if jobs:
        return jobs
    if _load_config(runs) is not None:
        return [runs]
    raise FileNotFoundError(f"runs={runs!r} holds no run directories (none has {RESOLVED_CONFIG} or {HYDRA_CONFIG}).")


COLUMNS = (("run", "run"), ("status", "status"), ("f", "factor"), ("latent c×h×w", "latent_shape"),
           ("compression", "compression_ratio"), ("AE params", "ae_params"), ("LDM params", "ldm_params"),
           ("AE val PSNR", "ae_val_psnr"), ("AE val LPIPS", "ae_val_lpips"),
           ("train samples/s", "train_samples_per_sec"), ("step", "global_step"))


def markdown_report(rows: Sequence[RunSummary], report: dict[str, Any]) -> str:
    fid_name = next((r.fid_name for r in rows if r.fid_name), "FID")
    header = [name for name, _ in COLUMNS] + [fid_name, "precision", "recall", "eval step"]
    lines = ["# First-stage factor comparison", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [_cell(key, getattr(row, key)) for _, key in COLUMNS]
        cells += [_cell(key, getattr(row, key)) for key in ("fid", "precision", "recall", "eval_step")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "n/a: not measured (e.g. LPIPS without VGG16 weights) or the run stopped before it. "
              "Compression: image elements per latent element. LDM params: the UNet. Throughput: median step, "
              "data loading included. Metrics from the last evaluation of each run's EMA weights.", ""]
    if report["fid_vs_steps"]:
        lines += [f"![{fid_name} vs steps](fid_vs_steps.png)", ""]
    if report["samples"]:
        sampling = report["sampling"]
        lines += ["![samples](samples.png)", "",
                  f"One row per factor; prompts {sampling['prompts']}; sampler {sampling['sampler']}, "
                  f"{sampling['steps']} steps, cfg {sampling['cfg_scale']}, seeds {sampling['seed']}+i.", ""]
    return "\n".join(lines)


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "n/a"
    if key == "latent_shape":
        return "×".join(map(str, value))
    if key.endswith("_params"):
        return f"{value / 1e6:.2f}M"
    if key == "compression_ratio":
        return f"{value:g}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def plot_fid_vs_steps(rows: Sequence[RunSummary], path: str) -> str | None:
    """One line per factor from the runs' eval/metrics.jsonl; None (no file) when no run evaluated."""
    plotted = [r for r in rows if r.fid_history]
    if not plotted:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5, 3.5), dpi=150)
    for row in plotted:
        steps, values = zip(*row.fid_history)
        axes.plot(steps, values, marker="o", label=f"f={row.factor}" if row.factor else row.run)
    axes.set_xlabel("training step")
    axes.set_ylabel(next(r.fid_name for r in plotted if r.fid_name) or "FID")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def sample_side_by_side(rows: Sequence[RunSummary], out: str, prompts: list[str], settings: SamplerSettings,
                        device: str) -> str | None:
    """`out/samples.png`: a row per run (same prompts, same seeds), each run's samples also in `out/samples/<run>/`."""
    labelled = []
    for row in rows:
        if row.checkpoint is None:
            continue
        model = load_latent_diffusion(row.checkpoint, use_ema=True, device=str(resolve_device(device)))
        key = model.conditioner.batch_key
        conditions = conditions_for(model, prompts if key == "caption" else [],
                                    list(range(len(prompts))) if key == "class_label" else [],
                                    1 if key else len(prompts))
        run_out = os.path.join(out, "samples", row.run)
        generate_to_dir(model, conditions, run_out, settings, batch_size=len(conditions), ckpt=row.checkpoint,
                        per_row=len(conditions))
        images = [Image.open(os.path.join(run_out, f"{i:05d}.png")).convert("RGB") for i in range(len(conditions))]
        labelled.append((f"f={row.factor}" if row.factor else row.run, images))
    if not labelled:
        return None
    path = os.path.join(out, "samples.png")
    _label_rows(labelled).save(path)
    return path


def _label_rows(rows: list[tuple[str, list[Image.Image]]], label_width: int = 56, pad: int = 2) -> Image.Image:
    """Rows of equal-sized tiles with a text label on the left."""
    size = rows[0][1][0].size[0]
    columns = max(len(images) for _, images in rows)
    sheet = Image.new("RGB", (label_width + columns * (size + pad), len(rows) * (size + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (label, images) in enumerate(rows):
        top = r * (size + pad)
        draw.text((4, top + size // 2 - 6), label, fill="black")
        for c, image in enumerate(images):
            sheet.paste(image.resize((size, size)), (label_width + c * (size + pad), top))
    return sheet


# ---------------------------------------------------------------------------------------------- sweeps
@dataclass
class Trial:
    number: int
    overrides: dict[str, str]
    value: float | None


def summarize_sweep(sweep_dir: str, metric: str | None = None, out: str | None = None) -> str:
    """`sweep_summary.md` (in `out`, default the sweep directory): one row per trial with its swept values
    and final `metric` (default: the sweep's `optimized_metric`, else val/loss), best first. Reads an Optuna
    sweep's optimization_results.yaml when there is one; a plain `-m` grid sweep works the same."""
    trial_dirs = sorted(os.path.join(sweep_dir, name) for name in os.listdir(sweep_dir)
                        if os.path.isfile(os.path.join(sweep_dir, name, ".hydra", "overrides.yaml")))
    if not trial_dirs:
        raise FileNotFoundError(f"{sweep_dir!r} holds no trial directories (with .hydra/overrides.yaml): pass the "
                                "multirun directory of a sweep.")
    first_trial = os.path.join(trial_dirs[0], ".hydra")  # the sweep's settings, as every trial saw them
    metric = metric or _select(_load_yaml(os.path.join(first_trial, "config.yaml")), "optimized_metric") or "val/loss"
    direction = _select(_load_yaml(os.path.join(first_trial, "hydra.yaml")), "hydra.sweeper.direction") or "minimize"
    trials = [_read_trial(directory, number, metric) for number, directory in enumerate(trial_dirs)]
    swept = [key for key in dict.fromkeys(k for t in trials for k in t.overrides)
             if len({t.overrides.get(key) for t in trials}) > 1]
    sign = -1.0 if str(direction).lower().endswith("maximize") else 1.0
    ranked = sorted(trials, key=lambda t: (t.value is None, sign * (t.value or 0.0), t.number))
    results = _load_yaml(os.path.join(sweep_dir, "optimization_results.yaml"))
    lines = [f"# Sweep {os.path.abspath(sweep_dir)}", "",
             f"Objective: `{metric}` ({direction}), {len(trials)} trials, "
             f"{sum(t.value is None for t in trials)} without a value."]
    if results is not None and "best_value" in results:
        lines.append(f"Optuna best: {results.best_value:.6g} with {OmegaConf.to_container(results.best_params)}.")
    header = ["trial", *swept, metric, ""]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for rank, trial in enumerate(ranked):
        value = "failed (no value logged)" if trial.value is None else f"{trial.value:.6g}"
        best = "best" if rank == 0 and trial.value is not None else ""
        values = [_short(trial.overrides.get(key, "")) for key in swept]
        lines.append("| " + " | ".join([str(trial.number), *values, value, best]) + " |")
    path = os.path.join(out or sweep_dir, "sweep_summary.md")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return path


def _read_trial(directory: str, position: int, metric: str) -> Trial:
    """A trial's number (Hydra's job number), its overrides and the last logged value of `metric`."""
    overrides = _load_yaml(os.path.join(directory, ".hydra", "overrides.yaml"))
    number = _select(_load_yaml(os.path.join(directory, ".hydra", "hydra.yaml")), "hydra.job.num")
    pairs = dict(str(item).split("=", 1) for item in overrides if "=" in str(item))
    value = last_logged(os.path.join(directory, "csv", "metrics.csv"), metric)
    return Trial(position if number is None else int(number), pairs, value)


def _short(value: str) -> str:
    """Optuna's floats (0.00012520653814999459) to 4 significant digits; anything else as it is."""
    try:
        return f"{float(value):.4g}" if "." in value or "e" in value.lower() else value
    except ValueError:
        return value


def _load_yaml(path: str) -> Any:
    return OmegaConf.load(path) if os.path.isfile(path) else None
