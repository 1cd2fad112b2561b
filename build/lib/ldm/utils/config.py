"""Config plumbing every layer may use: where the config tree is, plain containers for checkpoints."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf


def to_container(cfg: Any) -> Any:
    """Plain python containers for anything that ends up in a checkpoint (loadable with weights_only)."""
    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg


# The Hydra config tree ships inside the package, so an installed (non-editable) wheel finds it too.
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
