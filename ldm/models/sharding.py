"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for the project's nets: the units, and the pieces a sharded
latent-diffusion model needs beyond sharding (its EMA, full parameters for sampling).

Units: one per UNet ResBlock / BasicTransformerBlock / SpatialTransformer, VAE ResnetBlock and text
transformer layer; each holds a few MB-GB of weights and runs as one piece of the forward pass, so FSDP
all-gathers one unit while the previous one computes. FSDP1 (`configs/trainer/fsdp.yaml`, Lightning's
FSDPStrategy, GPUs only) wraps the same classes (`ldm.training.distributed.fsdp_wrap_policy`).

What is sharded in a LatentDiffusion (`shard_latent_diffusion`): the weights that train, UNet and a
trainable conditioner, whose optimizer state is what FSDP saves memory on. The frozen first stage stays
replicated: LatentDiffusion calls its `encode` / `decode` methods, not its forward, so FSDP's forward hooks
would never gather it. The EMA shadows are sharded exactly like their parameters (`EMA.shard_like`), so
the per-step update stays local and costs 1/world of the memory.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from ldm.nets.attention import BasicTransformerBlock, SpatialTransformer
from ldm.nets.unet import ResBlock
from ldm.nets.vae import ResnetBlock

FSDP_UNIT_CLASSES: tuple[type[nn.Module], ...] = (
    ResBlock, BasicTransformerBlock, SpatialTransformer, ResnetBlock, nn.TransformerEncoderLayer,
)


def fsdp_unit_classes() -> set[type[nn.Module]]:
    """UNet ResBlock / BasicTransformerBlock / SpatialTransformer, VAE ResnetBlock, text transformer layers
    (and open_clip's when it is installed)."""
    classes = set(FSDP_UNIT_CLASSES)
    try:
        from open_clip.transformer import ResidualAttentionBlock
    except ImportError:  # open_clip is optional for models without a frozen CLIP text tower
        return classes
    return classes | {ResidualAttentionBlock}


def fsdp_unit_names(model: nn.Module) -> list[str]:
    """Qualified names of the submodules the wrap policy makes FSDP units (outer before inner)."""
    classes = tuple(fsdp_unit_classes())
    return [name for name, module in model.named_modules() if name and isinstance(module, classes)]


def fully_shard_units(model: nn.Module, **fully_shard_kwargs) -> nn.Module:
    """Shard `model` with torch FSDP2 (`fully_shard`) at the same units as `fsdp_wrap_policy`, then the root.

    Inner units first, so each unit owns exactly the parameters not claimed by a unit inside it."""
    from torch.distributed.fsdp import fully_shard

    modules = dict(model.named_modules())
    for name in reversed(fsdp_unit_names(model)):
        fully_shard(modules[name], **fully_shard_kwargs)
    return fully_shard(model, **fully_shard_kwargs)


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def shard_latent_diffusion(model: nn.Module, mesh, **fully_shard_kwargs) -> None:
    """Shard a LatentDiffusion's trainable nets over `mesh` (1-D, data parallel) and its EMA like them."""
    trainable = model.trainable
    for module in trainable.values():
        fully_shard_units(module, mesh=mesh, **fully_shard_kwargs)
    if model.ema is not None:
        model.ema.shard_like(trainable)


@contextmanager
def full_parameters(module: nn.Module) -> Iterator[None]:
    """Every FSDP unit of `module` gathered for the block, none re-sharded after a forward: sampling's many
    forwards then cost no all-gather each (every rank must enter: the gather is collective). A no-op for a
    module without FSDP units."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    if not units:
        yield
        return
    for unit in units:
        unit.unshard()
        unit.set_reshard_after_forward(False)
    try:
        yield
    finally:
        for unit in units:
            unit.set_reshard_after_forward(True)
            unit.reshard()
