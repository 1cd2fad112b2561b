"""Library messages that say nothing to an ldm user, silenced by exact text (nothing else is filtered):

- Lightning >= 2.6.1 advertises its cloud logger ("💡 Tip: ... litlogger ...") at the start of every fit;
- Lightning 2.6 builds torch's deprecated `LeafSpec` (torch 2.14: "`isinstance(treespec, LeafSpec)` is
  deprecated"), a FutureWarning about Lightning's own code that users cannot act on;
- open_clip logs each step of finding a tokenizer or model config at INFO through the root logger
  ("Parsing tokenizer identifier ...", "Using default SimpleTokenizer."): its INFO records are dropped, its
  warnings kept.

Lightning's "`weights_only` was not set" note is not filtered: ldm passes `weights_only=False` where it
saves a full (resumable) checkpoint, so the note does not arise (loading stays weights-only, see
ldm/training/checkpoint_io.py).
"""
from __future__ import annotations

import importlib.util
import logging
import os
import warnings

# Lightning logs `rank_zero_info` through whichever of these loggers its modules registered last.
LIGHTNING_RANK_ZERO_LOGGERS = ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero",
                               "lightning_utilities.core.rank_zero")
SILENCED_LOG_PREFIXES = ("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]",)
SILENCED_WARNINGS = ((r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),)


class DropMessages(logging.Filter):
    """Drops log records whose message starts with one of `prefixes`."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


class DropInfoFrom(logging.Filter):
    """Drops records below WARNING that code under `directory` logged."""

    def __init__(self, directory: str) -> None:
        super().__init__()
        self.directory = os.path.join(directory, "")

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.pathname.startswith(self.directory)


def package_dir(name: str) -> str | None:
    """Where an installed package lives, without importing it."""
    spec = importlib.util.find_spec(name)
    return os.path.dirname(spec.origin) if spec and spec.origin else None


def quiet_library_noise() -> None:
    """Install the filters (idempotent); every Hydra main calls it before it runs."""
    for name in LIGHTNING_RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessages) for f in logger.filters):
            logger.addFilter(DropMessages(SILENCED_LOG_PREFIXES))
    root = logging.getLogger()
    open_clip_dir = package_dir("open_clip")
    if open_clip_dir and not any(isinstance(f, DropInfoFrom) for f in root.filters):
        root.addFilter(DropInfoFrom(open_clip_dir))
    for message, category in SILENCED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
