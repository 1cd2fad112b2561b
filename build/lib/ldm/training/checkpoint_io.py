"""Lightning's checkpoint I/O with atomic local saves and weights-only loads (ldm/utils/files.py)."""
from __future__ import annotations

from typing import Any, Callable

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning_fabric.utilities.cloud_io import get_filesystem
from pytorch_lightning.plugins.io import TorchCheckpointIO

from ldm.utils.files import load_checkpoint, save_atomic


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning `CheckpointIO` plugin: atomic local saves, weights-only loads.

    Use `Trainer(plugins=[AtomicCheckpointIO()])`. Remote URLs (s3://, gs://, ...) fall back to
    Lightning's own writer: object stores replace an object atomically on upload."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        save_atomic(checkpoint, path)

    def load_checkpoint(
        self,
        path: Any,
        map_location: Callable | str | torch.device | None = None,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Weights-only unless the caller explicitly passes `weights_only=False`
        (`Trainer.fit(ckpt_path=..., weights_only=False)` for a checkpoint you trust)."""
        if weights_only is False or not _is_local(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only is not False)
        return load_checkpoint(path, map_location=map_location or "cpu")


def _is_local(path: Any) -> bool:
    return isinstance(get_filesystem(path), LocalFileSystem)
