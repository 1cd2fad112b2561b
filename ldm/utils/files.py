"""Checkpoint I/O that never runs code from a file and never leaves a half-written checkpoint.

Loading: `.ckpt`/`.pt`/`.pth`/`.bin` go through `torch.load(weights_only=True)`, whose unpickler only
rebuilds tensors and plain containers, so a pickle that carries code (a `__reduce__` calling
`os.system`) is refused before anything runs; `.safetensors` holds no code by construction.

Our own Lightning checkpoints need no extra allowlist: with hyperparameters saved as plain
dicts/lists (the LightningModules receive `_convert_: all` configs) a Lightning 2.6 checkpoint holds
only dicts, lists, tuples, str/int/float, `OrderedDict` and tensors (model, optimizer, lr-scheduler,
loops, ModelCheckpoint state). OmegaConf containers are deliberately *not* allowlisted: pickled, they
drag in node, metadata and `typing` objects; convert them with `OmegaConf.to_container` instead.

Saving: `save_atomic` (and `write_atomic` for any bytes) writes to a temporary file beside the target, fsyncs it
and `os.replace`s it into place, so a SIGKILL mid-write leaves the previous file (a `last.ckpt`) intact.
"""
from __future__ import annotations

import os
import pickle
import re
import uuid
from typing import Any, BinaryIO, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file as load_safetensors

SAFETENSORS_SUFFIX = ".safetensors"
TEMPORARY_NAME = re.compile(r"^\..+\.\d+\.[0-9a-f]{8}\.tmp$")  # save_atomic's `.{name}.{pid}.{random}.tmp`


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The file's pickle references code or types outside the weights-only allowlist."""


class CorruptCheckpointError(RuntimeError):
    """The file is truncated or not a checkpoint at all."""


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """What the file holds (a Lightning checkpoint dict, or a flat state dict for `.safetensors`),
    loaded without executing any code from it. `map_location` is `torch.load`'s."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Checkpoint not found: {path!r} (working directory {os.getcwd()!r}). Check the path; run "
            "directories keep theirs in <run dir>/checkpoints/last.ckpt."
        )
    if path.endswith(SAFETENSORS_SUFFIX):
        device = str(map_location) if isinstance(map_location, (str, torch.device)) else "cpu"
        try:
            return load_safetensors(path, device=device)
        except SafetensorError as error:
            raise CorruptCheckpointError(_not_safetensors_message(path, error)) from None
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" not in str(error) or not re.search(r"GLOBAL |Unsupported global", str(error)):
            reason = str(error).split("WeightsUnpickler error:")[-1].strip().split("\n\n")[0].strip()
            raise CorruptCheckpointError(f"{path!r} is not a readable torch checkpoint ({reason}): it is "
                                         "truncated or another format.") from None
        raise UnsafeCheckpointError(_unsafe_message(path, str(error))) from None
    except (EOFError, RuntimeError) as error:
        if isinstance(error, RuntimeError) and "PytorchStreamReader" not in str(error):
            raise
        raise CorruptCheckpointError(
            f"{path!r} is truncated or not a torch checkpoint ({error}). If a run was killed while "
            "saving, use an earlier checkpoint."
        ) from error


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` to `path` so that readers see either the old file or the complete new one."""
    write_atomic(path, lambda file: torch.save(obj, file))


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call `write(file)` on a temporary file beside `path`, then rename it into place: the one atomic write
    of the project (checkpoints, shards, metric caches, classifier weights).

    The temporary file lives in the target's directory (same file system, so `os.replace` is an
    atomic rename) and is named `.<name>.<pid>.<random>.tmp` (TEMPORARY_NAME), so a killed writer's leftover
    is recognisable; fsync of the file and then of the directory makes both the bytes and the rename survive
    a power loss, not only a killed process."""
    path = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    # (TEMPORARY_NAME matches it: remove_stale_temporaries finds what a killed write left behind)
    # os.open with 0o666 honours the umask, unlike tempfile.mkstemp (always 0o600)
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(descriptor, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    _fsync_directory(directory)


def remove_stale_temporaries(directory: str | os.PathLike) -> list[str]:
    """Delete the temporary files of `save_atomic` writes that were killed (SIGKILL, node failure) in
    `directory`; returns their paths. Call it only where no write can be under way (a run's own checkpoint
    directory at start-up): each one is a partial checkpoint, often gigabytes."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return []
    stale = [os.path.join(directory, name) for name in sorted(os.listdir(directory)) if TEMPORARY_NAME.match(name)]
    for path in stale:
        os.remove(path)
    return stale


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a `.safetensors` file header (empty when it has none)."""
    try:
        with safe_open(os.fspath(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except SafetensorError as error:
        raise CorruptCheckpointError(_not_safetensors_message(os.fspath(path), error)) from None


def _not_safetensors_message(path: str, error: Exception) -> str:
    return (f"{path!r} is not a readable safetensors file ({error}): it is truncated, or another format renamed "
            "to .safetensors (a torch .ckpt keeps its .ckpt name). Download or export it again "
            "(`python -m ldm.cli.export ... format=safetensors`).")


def _unsafe_message(path: str, torch_message: str) -> str:
    found = re.search(r"GLOBAL ([\w.]+)", torch_message)
    culprit = found.group(1) if found else "an object outside the allowlist"
    message = (
        f"Refused to load {path!r}: its pickle references {culprit}, which weights-only loading does not "
        "allow because unpickling it could run arbitrary code. Nothing from the file was executed."
    )
    if culprit.startswith("omegaconf."):
        return message + (
            " The checkpoint stores OmegaConf containers (usually hyperparameters): save plain "
            "containers instead (OmegaConf.to_container(cfg, resolve=True), or Hydra `_convert_: all`)."
        )
    return message + (
        " If you trust the file, convert it once with torch.load(path, weights_only=False) and save "
        "its state_dict (or use safetensors)."
    )


def _fsync_directory(directory: str) -> None:
    if os.name != "posix":  # directories cannot be opened for fsync on Windows
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
