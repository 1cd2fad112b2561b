"""`python train.py ...`: compose the config, train, return the sweep metric. See README "Train"."""
import logging

from omegaconf import DictConfig

from ldm.cli.cost import cpu_cost_warning
from ldm.cli.entry import hydra_entry
from ldm.training.distributed import hydra_ddp_job
from ldm.training.extras import apply_extras
from ldm.training.loggers import LoggerUnavailableError
from ldm.training.pipeline import optimized_metric, train

log = logging.getLogger("train")


@hydra_entry("train", "train.py", user_errors=(LoggerUnavailableError,))
def main(cfg: DictConfig) -> float | None:
    """Returns `optimized_metric` (set by hparams_search configs) for sweepers such as Optuna."""
    apply_extras(cfg)
    if warning := cpu_cost_warning(cfg):
        log.warning("%s", warning)
    with hydra_ddp_job():  # DDP ranks share this job's run directory (Lightning + Hydra: ldm/training/distributed.py)
        result = train(cfg)
    return optimized_metric(result.trainer, cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
