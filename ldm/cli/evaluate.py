"""`python evaluate.py ...`: evaluate a latent-diffusion checkpoint (or a folder of images): FID, precision / recall, density /
coverage, IS and, on shapes, prompt fidelity.

    python evaluate.py ckpt=PATH num_samples=1000 out=DIR
    python evaluate.py fake_dir=DIR real_dir=DIR features=inception_v3 out=DIR
    python evaluate.py report=compare runs=MULTIRUN_DIR out=DIR      # factor comparison (ldm/evaluation/reports.py)
    python evaluate.py report=captions ckpt=PATH out=DIR            # caption sensitivity and signal leak only
    python evaluate.py task=sr ckpt=PATH num_samples=256 out=DIR    # also task=inpaint|semantic (ldm/evaluation/tasks.py)

Writes DIR/metrics.json, DIR/metrics.md and (ckpt=) DIR/samples/. See configs/evaluate.yaml.
"""
import logging
import os

from omegaconf import DictConfig, OmegaConf

from ldm.cli.entry import hydra_entry
from ldm.diffusion.settings import SamplerSettings
from ldm.evaluation.evaluate import EvaluationOptions, diagnose_checkpoint, evaluate
from ldm.evaluation.image_sources import reference_images
from ldm.evaluation.reports import DEFAULT_PROMPTS, compare_factors, summarize_sweep
from ldm.evaluation.sweep import sweep_checkpoint
from ldm.evaluation.tasks import evaluate_task
from ldm.metrics import WeightsUnavailableError
from ldm.utils.files import CorruptCheckpointError, UnsafeCheckpointError

log = logging.getLogger("evaluate")
SETTINGS = ("ckpt", "fake_dir", "real_dir", "num_samples", "num_real", "k", "density_k", "cache_dir",
            "feature_batch_size", "batch_size", "use_ema", "device", "precision", "diagnostics", "diagnostics_samples",
            "reference_stats")


@hydra_entry("evaluate", "evaluate.py", user_errors=(ValueError, FileNotFoundError, CorruptCheckpointError, UnsafeCheckpointError, WeightsUnavailableError))
def main(cfg: DictConfig) -> None:
    if cfg.report:
        log.info("report -> %s", report_of_runs(cfg))
        return
    if any(cfg.sweep.values()):
        log.info("sweep -> %s", sweep_of_settings(cfg))
        return
    if cfg.task:
        log.info("task=%s -> %s", cfg.task, task_metrics(cfg))
        return
    metrics = evaluate(cfg.out, data=cfg.get("data"), features=OmegaConf.to_container(cfg.features, resolve=True),
                       sampling=_sampling(cfg), clip_score=OmegaConf.to_container(cfg.clip_score, resolve=True),
                       **{key: cfg[key] for key in SETTINGS})
    shown = {key: metrics.get(key) for key in ("precision", "recall", "clip_score") if metrics.get(key) is not None}
    log.info("%s = %.4f, %s -> %s/metrics.json", metrics["fid_name"], metrics["fid"],
             ", ".join(f"{key} = {value:.4f}" for key, value in shown.items()), cfg.out)


def sweep_of_settings(cfg: DictConfig, settings_list: list[SamplerSettings] | None = None) -> str:
    """`sweep.cfg_scale=[...] sweep.steps=[...] sweep.sampler=[...]`: one checkpoint at every combination
    (or at `settings_list`, for callers with a list that is not a grid: benchmarks/sampling.py)."""
    if not cfg.ckpt:
        raise ValueError("a sweep samples a checkpoint: pass ckpt=PATH with the sweep.* lists.")
    settings = {key: cfg[key] for key in SETTINGS}
    options = EvaluationOptions(features=OmegaConf.to_container(cfg.features, resolve=True), k=cfg.k,
                                density_k=cfg.density_k, num_real=cfg.num_real, cache_dir=cfg.cache_dir,
                                batch_size=cfg.feature_batch_size, device=cfg.device)
    base = SamplerSettings.of(_sampling(cfg))
    grid = {key: list(values) for key, values in cfg.sweep.items() if values}
    sweep_checkpoint(cfg.ckpt, reference_images(cfg.get("data"), settings["real_dir"]), cfg.out, grid,
                     num_samples=cfg.num_samples, base=base, options=options, batch_size=cfg.batch_size,
                     use_ema=cfg.use_ema, precision=cfg.precision, settings=settings_list)
    return os.path.join(cfg.out, "sweep.md")


def task_metrics(cfg: DictConfig) -> str:
    """`task=sr|inpaint|semantic ckpt=PATH`: the task's metrics next to its baseline (ldm/evaluation/tasks.py)."""
    if not cfg.ckpt:
        raise ValueError(f"task={cfg.task} needs ckpt=PATH (the checkpoint to sample).")
    settings = {key: cfg[key] for key in SETTINGS if key not in ("ckpt", "fake_dir", "real_dir", "diagnostics",
                                                                  "diagnostics_samples", "reference_stats")}
    metrics = evaluate_task(cfg.task, cfg.out, cfg.ckpt, cfg.data, sampling=_sampling(cfg),
                            features=OmegaConf.to_container(cfg.features, resolve=True), **settings)
    shown = {key: value for key, value in metrics.items() if isinstance(value, float)}
    return f"{shown} -> {os.path.join(cfg.out, 'metrics.json')}"


def report_of_runs(cfg: DictConfig) -> str:
    """`report=compare runs=DIR` (factor comparison) or `report=sweep runs=DIR` (sweep table): see
    ldm/evaluation/reports.py; `report=captions ckpt=PATH`: the diagnostics of one checkpoint."""
    if cfg.report == "captions":
        if not cfg.ckpt:
            raise ValueError("report=captions needs ckpt=PATH: the checkpoint to diagnose.")
        diagnose_checkpoint(cfg.out, cfg.ckpt, data=cfg.get("data"), real_dir=cfg.real_dir, sampling=_sampling(cfg),
                            num_samples=cfg.diagnostics_samples, batch_size=cfg.batch_size, use_ema=cfg.use_ema,
                            device=cfg.device)
        return os.path.join(cfg.out, "metrics.md")
    if not cfg.runs:
        raise ValueError(f"report={cfg.report} needs runs=DIR: the multirun directory of the sweep.")
    if cfg.report == "compare":
        compare_factors(cfg.runs, cfg.out, prompts=list(cfg.prompts or DEFAULT_PROMPTS), sampling=_sampling(cfg),
                        device=cfg.device)
        return os.path.join(cfg.out, "report.md")
    if cfg.report == "sweep":
        return summarize_sweep(cfg.runs, out=cfg.out)
    raise ValueError(f"report={cfg.report!r} is not a report: choose compare (factor comparison), sweep or captions.")


def _sampling(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg.sampling, resolve=True)


if __name__ == "__main__":
    main()
