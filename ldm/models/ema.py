"""Exponential moving average of a module's trainable weights (the LDM paper samples with EMA weights).

    shadow <- decay_n * shadow + (1 - decay_n) * param

With warm-up (CompVis `LitEma`), decay_n = min(decay, (1 + n) / (10 + n)) where n counts updates,
this one included: early shadows follow the fast-changing weights (decay_1 = 2/11, decay_90 = 0.91)
instead of staying near the random initialisation for ~1/(1 - decay) steps.

The shadows are buffers of this module, so they travel in the owner's state_dict (under
`<attribute>.<param name without dots>`, the key layout of `LitEma`), move with `.to(device)`, and
are invisible to an optimizer built from `parameters()`. The owner passes the tracked module to
every call instead of this module keeping a reference, which would register the weights twice.

Under FSDP2 the parameters are DTensor shards; `shard_like` shards each shadow with its parameter's
placements, and every update / copy then runs on the local shards alone (no communication). The state
dict then holds DTensor shadows, which torch.distributed.checkpoint saves sharded or gathers in full.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

NUM_UPDATES = "num_updates"


class EMA(nn.Module):
    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True) -> None:
        """Tracks `model`'s floating-point parameters that require grad (frozen parts need no average).
        Pass an `nn.ModuleDict` to average several modules together (UNet + trainable conditioner)."""
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay} (typical: 0.9999; 0 disables averaging).")
        self.decay = decay
        self.warmup = warmup
        self.param_names: list[str] = []
        for name, param in model.named_parameters():
            if not (param.requires_grad and param.is_floating_point()):
                continue
            buffer_name = name.replace(".", "")
            if buffer_name == NUM_UPDATES or buffer_name in self._buffers:
                raise ValueError(
                    f"EMA buffer name {buffer_name!r} (from parameter {name!r}) collides with another "
                    "parameter once dots are removed; rename one of them."
                )
            self.register_buffer(buffer_name, param.detach().clone())
            self.param_names.append(name)
        self.register_buffer(NUM_UPDATES, torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step: a single fused `_foreach_lerp_` over all tensors, decay kept on the device."""
        self.num_updates += 1
        decay: torch.Tensor | float = self.decay
        if self.warmup:
            n = self.num_updates.to(torch.float32)
            decay = torch.clamp((1 + n) / (10 + n), max=self.decay)
        # lerp(shadow, param, w) = shadow + w (param - shadow) = decay * shadow + (1 - decay) * param
        torch._foreach_lerp_(_local(self.shadows()), _local(self._tracked(model)), 1 - decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's tracked weights with the averages."""
        torch._foreach_copy_(_local(self._tracked(model)), _local(self.shadows()))

    @contextmanager
    def swap(self, model: nn.Module) -> Iterator[None]:
        """Run the block with the EMA weights in `model`; its own weights come back afterwards,
        even when the block raises."""
        params = _local(self._tracked(model))
        with torch.no_grad():
            backup = [p.detach().clone() for p in params]
        self.copy_to(model)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, backup)

    @torch.no_grad()
    def shard_like(self, model: nn.Module) -> None:
        """Shard each shadow as its (FSDP2 DTensor) parameter is sharded; plain parameters keep plain shadows."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        for name, param in zip(self.param_names, self._tracked(model)):
            key = name.replace(".", "")
            shadow = self._buffers[key]
            if isinstance(param, DTensor) and not isinstance(shadow, DTensor):
                self._buffers[key] = distribute_tensor(shadow.to(param.device), param.device_mesh, param.placements)

    def shadows(self) -> list[torch.Tensor]:
        return [self._buffers[name.replace(".", "")] for name in self.param_names]

    def _tracked(self, model: nn.Module) -> list[torch.Tensor]:
        params = dict(model.named_parameters())
        missing = [name for name in self.param_names if name not in params]
        if missing:
            raise KeyError(
                f"EMA tracks parameters that this model does not have: {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}. Pass the same module (names) the EMA was built from."
            )
        return [params[name] for name in self.param_names]


def _local(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The local shards of DTensors (the tensors themselves otherwise): in-place ops on them write the DTensor."""
    return [t._local_tensor if hasattr(t, "_local_tensor") else t for t in tensors]
