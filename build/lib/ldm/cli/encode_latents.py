"""`python -m ldm.cli.encode_latents first_stage_ckpt=PATH data=... out=DIR`: encode a data set once
with a frozen first stage (configs/encode_latents.yaml); stage 2 then trains from `data=latents`."""
import logging
import sys

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from ldm.inference.latent_cache import META_FILE, encode_latents
from ldm.utils.devices import resolve_device

log = logging.getLogger("encode_latents")


@hydra.main(version_base="1.3", config_path="../configs", config_name="encode_latents")
def main(cfg: DictConfig) -> None:
    """`python -m ldm.cli.encode_latents first_stage_ckpt=PATH data=... out=DIR` (configs/encode_latents.yaml)."""
    try:
        datamodule: pl.LightningDataModule = hydra.utils.instantiate(cfg.data)
        meta = encode_latents(cfg.first_stage_ckpt, datamodule, cfg.out, batch_size=cfg.batch_size,
                              device=str(resolve_device(cfg.device)), splits=tuple(cfg.splits))
    except (ValueError, FileNotFoundError) as error:
        log.error("%s", error)
        sys.exit(2)
    log.info("encoded %s with %s -> %s/%s", OmegaConf.to_container(cfg.splits), meta["first_stage"]["checkpoint"],
             cfg.out, META_FILE)


if __name__ == "__main__":
    main()
