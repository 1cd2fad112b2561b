"""Checkpoint interop: import CompVis / Stable Diffusion checkpoints, export to diffusers and to
our own shareable safetensors format. See README "Recipes" and docs/architecture.md."""
from ldm.interop.compvis import (
    MissingConditioner,
    load_any_first_stage,
    load_compvis_first_stage,
    load_sd_checkpoint,
)
from ldm.interop.exported import load_exported, save_exported, without_weight_sources
from ldm.interop.state_dicts import CheckpointMismatchError
from ldm.interop.weights import load_weights_into

__all__ = [
    "CheckpointMismatchError",
    "MissingConditioner",
    "load_any_first_stage",
    "load_compvis_first_stage",
    "load_exported",
    "load_sd_checkpoint",
    "load_weights_into",
    "save_exported",
    "without_weight_sources",
]
