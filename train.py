"""Train a model: `python train.py experiment=ae_kl_f8`, `python train.py experiment=ldm_f8_text ...`.

With no arguments it runs the embedded default (experiment=quickstart). Every key is overridable on the
command line; `-m` sweeps. See README.md and configs/.
"""
import hydra
from omegaconf import DictConfig

from ldm.distributed import hydra_ddp_job
from ldm.training import optimized_metric, train


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Returns `optimized_metric` (set by hparams_search configs) for sweepers such as Optuna."""
    with hydra_ddp_job():  # DDP ranks share this job's run directory (Lightning + Hydra, see ldm/distributed.py)
        result = train(cfg)
    return optimized_metric(result.trainer, cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
