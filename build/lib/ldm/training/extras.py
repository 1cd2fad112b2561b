"""Conveniences applied before a run starts (`extras:` in train.yaml; lightning-hydra-template's convention)."""
from __future__ import annotations

import logging
import warnings

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def apply_extras(cfg: DictConfig) -> None:
    """`extras.ignore_warnings`: silence Python warnings; `extras.print_config`: log the composed config."""
    extras = cfg.get("extras") or {}
    if extras.get("ignore_warnings"):
        log.info("extras.ignore_warnings=true: Python warnings are silenced for this run.")
        warnings.filterwarnings("ignore")
    if extras.get("print_config"):
        log.info("Composed config (extras.print_config=true):\n%s", OmegaConf.to_yaml(cfg, resolve=False))
