"""The loading layer: the only place that builds models from files. Our training checkpoints and exports
(`checkpoints.py`, `exported.py`), CompVis / Stable Diffusion files (`compvis.py`, `stable_diffusion.py`),
`init_from=` weights (`init_from.py`) and the diffusers export (`diffusers_export.py`). See README "Recipes"."""
from ldm.loading.checkpoints import (
    build_latent_diffusion,
    build_model,
    init_from,
    load_any_latent_diffusion,
    load_autoencoder,
    load_first_stage,
    load_latent_diffusion,
    upgrade_targets,
)
from ldm.loading.compvis import load_any_first_stage, load_compvis_first_stage
from ldm.loading.exported import load_exported, save_exported, without_weight_sources
from ldm.loading.init_from import load_weights_into
from ldm.loading.stable_diffusion import load_sd_checkpoint
from ldm.loading.state_dicts import CheckpointMismatchError

__all__ = [
    "CheckpointMismatchError",
    "build_latent_diffusion",
    "build_model",
    "init_from",
    "load_any_first_stage",
    "load_any_latent_diffusion",
    "load_autoencoder",
    "load_compvis_first_stage",
    "load_exported",
    "load_first_stage",
    "load_latent_diffusion",
    "load_sd_checkpoint",
    "load_weights_into",
    "save_exported",
    "upgrade_targets",
    "without_weight_sources",
]
