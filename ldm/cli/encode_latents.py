"""`python -m ldm.cli.encode_latents first_stage_ckpt=PATH data=... out=DIR`: encode a data set once
with a frozen first stage (configs/encode_latents.yaml); stage 2 then trains from `data=latents`."""
import logging

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from ldm.cli.entry import hydra_entry
from ldm.inference.latent_cache import META_FILE, encode_latents
from ldm.utils.devices import resolve_device

log = logging.getLogger("encode_latents")




@hydra_entry("encode_latents", "python -m ldm.cli.encode_latents",
             user_errors=(ValueError, FileNotFoundError))
def main(cfg: DictConfig) -> None:
    """`python -m ldm.cli.encode_latents first_stage_ckpt=PATH data=... out=DIR` (configs/encode_latents.yaml)."""
    datamodule: pl.LightningDataModule = hydra.utils.instantiate(cfg.data)
    meta = encode_latents(cfg.first_stage_ckpt, datamodule, cfg.out, batch_size=cfg.batch_size,
                          device=str(resolve_device(cfg.device)), splits=tuple(cfg.splits),
                          flip=bool(cfg.get("flip", False)))
    log.info("encoded %s with %s -> %s/%s", OmegaConf.to_container(cfg.splits), meta["first_stage"]["checkpoint"],
             cfg.out, META_FILE)


if __name__ == "__main__":
    main()
