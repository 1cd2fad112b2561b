"""`python evaluate.py ...`: evaluate a latent-diffusion checkpoint (or a folder of images): FID, precision / recall, density /
coverage, IS and, on shapes, prompt fidelity.

    python evaluate.py ckpt=PATH num_samples=1000 out=DIR
    python evaluate.py fake_dir=DIR real_dir=DIR features=inception_v3 out=DIR
    python evaluate.py report=compare runs=MULTIRUN_DIR out=DIR      # factor comparison (ldm/evaluation/reports.py)

Writes DIR/metrics.json, DIR/metrics.md and (ckpt=) DIR/samples/. See configs/evaluate.yaml.
"""
import logging
import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from ldm.evaluation.evaluate import evaluate
from ldm.evaluation.reports import DEFAULT_PROMPTS, compare_factors, summarize_sweep
from ldm.metrics import WeightsUnavailableError
from ldm.utils.files import CorruptCheckpointError, UnsafeCheckpointError

log = logging.getLogger("evaluate")
SETTINGS = ("ckpt", "fake_dir", "real_dir", "num_samples", "num_real", "k", "density_k", "cache_dir",
            "feature_batch_size", "sampler", "steps", "eta", "cfg_scale", "seed", "batch_size", "use_ema", "device",
            "precision")


@hydra.main(version_base="1.3", config_path="../configs", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    try:
        if cfg.report:
            log.info("report -> %s", report_of_runs(cfg))
            return
        metrics = evaluate(cfg.out, data=cfg.get("data"), features=OmegaConf.to_container(cfg.features, resolve=True),
                           **{key: cfg[key] for key in SETTINGS})
    except (ValueError, FileNotFoundError, WeightsUnavailableError, CorruptCheckpointError,
            UnsafeCheckpointError) as error:
        log.error("%s", error)
        sys.exit(2)
    log.info("%s = %.4f, precision = %.4f, recall = %.4f -> %s/metrics.json",
             metrics["fid_name"], metrics["fid"], metrics["precision"], metrics["recall"], cfg.out)


def report_of_runs(cfg: DictConfig) -> str:
    """`report=compare runs=DIR` (factor comparison) or `report=sweep runs=DIR` (sweep table): see ldm/evaluation/reports.py."""
    if not cfg.runs:
        raise ValueError(f"report={cfg.report} needs runs=DIR: the multirun directory of the sweep.")
    if cfg.report == "compare":
        compare_factors(cfg.runs, cfg.out, prompts=list(cfg.prompts or DEFAULT_PROMPTS), sampler=cfg.sampler,
                        steps=cfg.steps, cfg_scale=cfg.cfg_scale, seed=cfg.seed, device=cfg.device)
        return os.path.join(cfg.out, "report.md")
    if cfg.report == "sweep":
        return summarize_sweep(cfg.runs, out=cfg.out)
    raise ValueError(f"report={cfg.report!r} is not a report: choose compare (factor comparison) or sweep.")


if __name__ == "__main__":
    main()
