"""`python sample.py ...`: sample images from a trained latent-diffusion checkpoint.

    python sample.py ckpt=PATH prompt="a red circle at the top left" n=16 sampling.steps=50 sampling.cfg_scale=5 out=DIR

    python sample.py ckpt=PATH task=inpaint image=IMG.png mask=MASK.png prompt="a red circle" n=4 out=DIR

Writes DIR/00000.png ..., DIR/grid.png (one row per prompt / class; with task=: condition | samples) and
DIR/samples.json.
"""
import logging

from omegaconf import DictConfig, ListConfig, OmegaConf

from ldm.cli.entry import hydra_entry
from ldm.inference.sampling import sample_checkpoint
from ldm.inference.tasks import sample_task
from ldm.utils.files import CorruptCheckpointError, UnsafeCheckpointError

log = logging.getLogger("sample")


@hydra_entry("sample", "sample.py", user_errors=(ValueError, FileNotFoundError, CorruptCheckpointError, UnsafeCheckpointError))
def main(cfg: DictConfig) -> None:
    common = dict(prompts=[cfg.prompt] if cfg.prompt else [], prompts_file=cfg.prompts_file,
                  class_labels=_labels(cfg.class_label), n=cfg.n, batch_size=cfg.batch_size,
                  sampling=OmegaConf.to_container(cfg.sampling, resolve=True), use_ema=cfg.use_ema,
                  device=cfg.device, precision=cfg.precision)
    extra = dict(negative_prompt=cfg.negative_prompt, height=cfg.height, width=cfg.width)
    if cfg.task:
        if any(value is not None for value in extra.values()):
            raise ValueError("negative_prompt= / height= / width= apply to prompt / class sampling, not to task=: "
                             "a task's size is its input image's.")
        records = sample_task(cfg.ckpt, cfg.out, cfg.task, image=cfg.image, mask=cfg.mask,
                              semantic_map=cfg.map, strength=cfg.strength, **common)
    else:
        if cfg.image or cfg.mask or cfg.map:
            raise ValueError("image= / mask= / map= need task=img2img|sr|inpaint|semantic.")
        records = sample_checkpoint(cfg.ckpt, cfg.out, **common, **extra, progress=cfg.progress)
    log.info("Wrote %d samples, grid.png and samples.json to %s", len(records), cfg.out)


def _labels(class_label) -> list[int]:
    if class_label is None:
        return []
    return [int(c) for c in class_label] if isinstance(class_label, ListConfig) else [int(class_label)]


if __name__ == "__main__":
    main()
