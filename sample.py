"""Sample images from a trained latent-diffusion checkpoint.

    python sample.py ckpt=PATH prompt="a red circle at the top left" n=16 sampler=ddim steps=50 cfg_scale=5 out=DIR

Writes DIR/00000.png ..., DIR/grid.png (one row per prompt / class) and DIR/samples.json.
"""
import logging
import sys

import hydra
from omegaconf import DictConfig

from ldm.generation import SamplerSettings, conditions_for, generate_to_dir, load_latent_diffusion, read_prompts
from ldm.hardware import autocast_dtype, resolve_device

log = logging.getLogger("sample")


@hydra.main(version_base="1.3", config_path="configs", config_name="sample")
def main(cfg: DictConfig) -> None:
    try:
        settings = SamplerSettings(cfg.sampler, cfg.steps, cfg.eta, cfg.cfg_scale, cfg.seed)
        model = load_latent_diffusion(cfg.ckpt, use_ema=cfg.use_ema, device=resolve_device(cfg.device))
        conditions = conditions_for(model, read_prompts(cfg.prompt, cfg.prompts_file), _labels(cfg.class_label), cfg.n)
        dtype = autocast_dtype(cfg.precision)
    except (ValueError, FileNotFoundError) as error:
        log.error("%s", error)
        sys.exit(2)
    generate_to_dir(model, conditions, cfg.out, settings, batch_size=cfg.batch_size, ckpt=cfg.ckpt,
                    per_row=cfg.n, autocast_dtype=dtype)
    log.info("Wrote %d samples, grid.png and samples.json to %s", len(conditions), cfg.out)


def _labels(class_label) -> list[int]:
    if class_label is None:
        return []
    return [int(c) for c in class_label] if not isinstance(class_label, (int, str)) else [int(class_label)]


if __name__ == "__main__":
    main()
