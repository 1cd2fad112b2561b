"""Run-level config helpers: the identity of a config (cache keys) and `ckpt_path=last`."""
from __future__ import annotations

import glob
import hashlib
import json
import os

from omegaconf import DictConfig, OmegaConf


def config_hash(cfg: DictConfig | dict, exclude: tuple[str, ...] = ("paths", "hydra", "sampling", "size")) -> str:
    """A short stable hash of a resolved config, ignoring where things are written and how samples are drawn
    (`sampling` changes no trained weight, so a stage-1 model cached before the group existed still matches).
    `size` is a preset: what it changes is resolved into the model / data / trainer keys that are hashed, and a
    knob only stage 2 reads (e.g. `size.text_vocabulary`) must not retrain every cached autoencoder."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    for key in exclude:
        container.pop(key, None)
    blob = json.dumps(container, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def resolve_ckpt_path(ckpt_path: str | None, log_dir: str, task_name: str) -> str | None:
    """`last` means the newest `runs/<time>/checkpoints/last.ckpt` of this task (never a sweep trial's: pass its
    path to continue one); other paths must exist."""
    if ckpt_path is None:
        return None
    if ckpt_path == "last":
        pattern = os.path.join(log_dir, task_name, "runs", "*", "checkpoints", "last.ckpt")  # a file or FSDP dir
        candidates = sorted(glob.glob(pattern), key=os.path.getmtime)
        if not candidates:
            raise FileNotFoundError(
                f"ckpt_path=last: no checkpoint matches {pattern}. Train first, or pass ckpt_path=PATH (e.g. a sweep "
                "trial's <multirun dir>/<job>/checkpoints/last.ckpt)."
            )
        return candidates[-1]
    if not os.path.exists(ckpt_path):
        raise FileNotFoundError(f"ckpt_path={ckpt_path!r} does not exist. Pass an existing .ckpt or `last`.")
    return ckpt_path


def run_dir_of(checkpoint: str | None) -> str | None:
    """The run directory a checkpoint was written into (`<run dir>/checkpoints/<file>`), else None."""
    if checkpoint is None:
        return None
    folder = os.path.dirname(os.path.abspath(checkpoint))
    return os.path.dirname(folder) if os.path.basename(folder) == "checkpoints" else None
