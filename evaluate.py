"""Evaluate a latent-diffusion checkpoint (or a folder of images): FID, precision / recall, density /
coverage, IS and, on shapes, prompt fidelity.

    python evaluate.py ckpt=PATH num_samples=1000 out=DIR
    python evaluate.py fake_dir=DIR real_dir=DIR features=inception_v3 out=DIR

Writes DIR/metrics.json, DIR/metrics.md and (ckpt=) DIR/samples/. See configs/evaluate.yaml.
"""
import logging
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from ldm.evaluation import (
    DataSplitImages,
    EvaluationOptions,
    ImageFolder,
    data_identity,
    evaluate_checkpoint,
    evaluate_folder,
)
from ldm.generation import SamplerSettings
from ldm.metrics import WeightsUnavailableError

log = logging.getLogger("evaluate")


@hydra.main(version_base="1.3", config_path="configs", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    try:
        if (cfg.ckpt is None) == (cfg.fake_dir is None):
            raise ValueError("pass exactly one of ckpt=PATH (sample, then evaluate) or fake_dir=DIR (evaluate images).")
        reference = (ImageFolder(cfg.real_dir, "real_dir") if cfg.real_dir
                     else DataSplitImages(hydra.utils.instantiate(cfg.data), data_identity(cfg.data)))
        options = EvaluationOptions(
            features=OmegaConf.to_container(cfg.features, resolve=True), k=cfg.k, density_k=cfg.density_k,
            num_real=cfg.num_real, cache_dir=cfg.cache_dir, batch_size=cfg.feature_batch_size, device=cfg.device,
        )
        if cfg.ckpt is not None:
            settings = SamplerSettings(cfg.sampler, cfg.steps, cfg.eta, cfg.cfg_scale, cfg.seed)
            metrics = evaluate_checkpoint(cfg.ckpt, reference, cfg.out, num_samples=cfg.num_samples, settings=settings,
                                          options=options, batch_size=cfg.batch_size, use_ema=cfg.use_ema,
                                          precision=cfg.precision)
        else:
            metrics = evaluate_folder(cfg.fake_dir, reference, cfg.out, options)
    except (ValueError, FileNotFoundError, WeightsUnavailableError) as error:
        log.error("%s", error)
        sys.exit(2)
    log.info("%s = %.4f, precision = %.4f, recall = %.4f -> %s/metrics.json",
             metrics["fid_name"], metrics["fid"], metrics["precision"], metrics["recall"], cfg.out)


if __name__ == "__main__":
    main()
