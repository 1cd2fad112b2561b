"""Exact state-dict loading with an error that says what did not match.

`load_state_dict(strict=True)` stops at the first shape mismatch and prints every missing key of a
934-key UNet; a user loading the wrong release needs the *pattern* instead: how many keys are
missing, unexpected or mis-shaped, the first few of each, and which preset or option to try.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

SHOWN_PER_KIND = 5


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not fit the model built for it: nothing was loaded."""


def load_exact(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str, hint: str = "") -> None:
    """Load every tensor of `module` from `state_dict`, or raise listing all disagreements.

    A partial load is never silent: a key missing on either side or a shape that differs raises
    `CheckpointMismatchError` before any tensor is copied. `hint` ends the message (the fix)."""
    message = describe_mismatch(module.state_dict(), state_dict)
    if message:
        raise CheckpointMismatchError(f"{source} does not fit the model: {message}{' ' + hint if hint else ''}")
    module.load_state_dict(state_dict, strict=True)


def describe_mismatch(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]) -> str:
    """'' when names and shapes agree, else counts and the first few missing / unexpected / mis-shaped keys."""
    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    misshaped = [
        f"{key} {list(found[key].shape)} (model: {list(expected[key].shape)})"
        for key in expected
        if key in found and found[key].shape != expected[key].shape
    ]
    parts = [
        _listing(name, items)
        for name, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
        if items
    ]
    return "; ".join(parts) + ("." if parts else "")


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str, new_prefix: str = "") -> dict[str, torch.Tensor]:
    """The entries under `prefix`, renamed to `new_prefix` + the rest of the key."""
    return {new_prefix + key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}


def _listing(kind: str, items: list[str]) -> str:
    more = f", ... ({len(items) - SHOWN_PER_KIND} more)" if len(items) > SHOWN_PER_KIND else ""
    return f"{len(items)} {kind} keys [{', '.join(items[:SHOWN_PER_KIND])}{more}]"
