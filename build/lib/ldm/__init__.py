"""ldm: Latent Diffusion Models on Lightning, Hydra and WebDataset.

The public classes are imported lazily so that `import ldm` stays cheap for scripts
(data tools, metrics) that never touch the LightningModules.
"""
from importlib import import_module
from typing import Any

__all__ = ["AutoencoderKL", "LatentDiffusion"]

_EXPORTS = {"AutoencoderKL": "ldm.models", "LatentDiffusion": "ldm.models"}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ldm' has no attribute {name!r}")
