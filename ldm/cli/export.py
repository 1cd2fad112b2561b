"""Export a latent-diffusion model: `python -m ldm.cli.export ckpt=PATH format=diffusers|safetensors out=...`.

`format=diffusers` writes a diffusers folder (unet/, vae/, scheduler/, model_index.json) and lists
what it could not represent (the text encoder) in DIR/README.md; `format=safetensors` writes our
weights and resolved config to one file that `ldm.loading.load_exported` reads back.
"""
import logging

from omegaconf import DictConfig, OmegaConf

from ldm.cli.entry import hydra_entry
from ldm.diffusion.settings import SamplerSettings
from ldm.loading.checkpoints import load_any_latent_diffusion
from ldm.loading.diffusers_export import export_diffusers
from ldm.loading.exported import save_exported

log = logging.getLogger("export")
FORMATS = ("diffusers", "safetensors")


def export(ckpt: str, format: str, out: str, use_ema: bool = True, preset: str | None = None,
           sampling: dict | None = None) -> list[str]:
    """Write `ckpt` to `out` in `format`; returns the parts that could not be exported. `sampling` (a
    `sampling` config node) chooses the diffusers scheduler and its timestep grid."""
    if format not in FORMATS:
        raise ValueError(f"format={format!r}: choose one of {', '.join(FORMATS)}.")
    model = load_any_latent_diffusion(ckpt, use_ema, preset)
    if format == "safetensors":
        save_exported(model, out, use_ema=False)  # the chosen weights are in place already
        return []
    return export_diffusers(model, out, use_ema=False, sampling=SamplerSettings.of(sampling))


@hydra_entry("export", "python -m ldm.cli.export", user_errors=(ValueError, FileNotFoundError))
def main(cfg: DictConfig) -> None:
    not_exported = export(cfg.ckpt, cfg.format, cfg.out, cfg.use_ema, cfg.preset,
                          OmegaConf.to_container(cfg.sampling, resolve=True))
    for item in not_exported:
        log.warning("Not exported: %s", item)
    log.info("Wrote %s (%s)", cfg.out, cfg.format)


if __name__ == "__main__":
    main()
