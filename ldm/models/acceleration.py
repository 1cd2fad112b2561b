"""Speed switches of a model, none of which changes what it computes beyond rounding: `torch.compile`, bf16
frozen towers, `channels_last`, the SDPA kernel and TF32 (the `model.compile`, `model.compile_mode`,
`model.frozen_dtype`, `model.channels_last`, `model.sdpa_backend`, `model.allow_tf32` config keys).

- Compile: `nn.Module.compile` (in place) rather than `torch.compile(module)`: the wrapper of the latter
  stores its module as `_orig_mod`, which would put `_orig_mod.` into every state-dict key, the EMA's
  parameter names and the DDP / FSDP unit names. In place, checkpoints of compiled and eager runs are the
  same files. Checkpoints written by code that did wrap (other tools) load too: `accept_compiled_keys`
  removes the prefix on load. Compiled are the nets that run on tensors: the UNet, the first stage's
  encoder and decoder, and the text transformer (tokenisation stays eager: strings cannot be traced).
- Frozen towers in bf16 (`frozen_dtype=bfloat16`): the first stage and a frozen text tower never train, so
  fp32 master weights buy nothing; in bf16 they take half the memory and run at bf16 speed even outside
  autocast. Their inputs are cast in and their outputs back to fp32 at the boundary, and their state dicts
  are written in fp32, so checkpoints do not depend on the switch.
- `channels_last`: NHWC convolution kernels (cuDNN / oneDNN) for the UNet and first stage.
- `sdpa_backend`: pins `F.scaled_dot_product_attention` to one kernel (flash / efficient / cudnn / math)
  instead of torch's choice; an unsupported choice raises instead of silently falling back.
- `allow_tf32`: TF32 tensor cores for fp32 matmuls and convolutions on Ampere+ GPUs
  (`torch.set_float32_matmul_precision("high")`); a no-op for CPU kernels.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Iterable, Mapping

import torch
from torch import nn

COMPILED_PREFIX = "_orig_mod."
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                 "math": "MATH"}
FROZEN_DTYPES = ("bfloat16", "float16", "float32")


def check_options(compile_mode: str, sdpa_backend: str | None, frozen_dtype: str | None) -> None:
    """Refuse unknown values before anything is built (each error names the key and its choices)."""
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"model.compile_mode={compile_mode!r} is not a torch.compile mode; use one of "
                         f"{', '.join(COMPILE_MODES)} (default on CPU; max-autotune-no-cudagraphs on GPU).")
    if sdpa_backend is not None and sdpa_backend not in SDPA_BACKENDS:
        raise ValueError(f"model.sdpa_backend={sdpa_backend!r} is not an attention kernel; use null (torch "
                         f"chooses) or one of {', '.join(SDPA_BACKENDS)}.")
    if frozen_dtype is not None and frozen_dtype not in FROZEN_DTYPES:
        raise ValueError(f"model.frozen_dtype={frozen_dtype!r}; use null (the training dtype) or one of "
                         f"{', '.join(FROZEN_DTYPES)}.")


# ----------------------------------------------------------------------------------------------- compile
def compile_targets(unet: nn.Module, first_stage: nn.Module, conditioner: nn.Module) -> list[nn.Module]:
    """The tensor-only nets of a latent-diffusion model: UNet, first-stage encoder / decoder, text transformer
    (a trained `transformer`, or each block of a frozen OpenCLIP tower, which is called block by block)."""
    targets = [unet, first_stage.encoder, first_stage.decoder]
    tower = getattr(conditioner, "tower", None)
    if tower is not None and hasattr(getattr(tower, "transformer", None), "resblocks"):
        targets += list(tower.transformer.resblocks)
    elif isinstance(getattr(conditioner, "transformer", None), nn.Module):
        targets.append(conditioner.transformer)
    return targets


def compile_in_place(modules: Iterable[nn.Module], mode: str = "default", backend: str = "inductor") -> None:
    """`module.compile(mode=...)` for each: compiled lazily on the first call, names and state dicts unchanged.
    `backend`: inductor (generated kernels); aot_eager traces the same graphs but runs them with eager
    kernels (seconds instead of minutes to compile: for debugging and tests)."""
    for module in modules:
        module.compile(mode=None if backend != "inductor" else mode, backend=backend)


def is_compiled(module: nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def strip_compiled_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Keys without the `_orig_mod.` a `torch.compile(module)` wrapper adds (anywhere in the key)."""
    return {key.replace(COMPILED_PREFIX, ""): value for key, value in state_dict.items()}


def accept_compiled_keys(module: nn.Module) -> None:
    """Make `module.load_state_dict` take state dicts written through a `torch.compile` wrapper."""

    def hook(state_dict, prefix, *args) -> None:
        for key in [k for k in state_dict if COMPILED_PREFIX in k]:
            state_dict[key.replace(COMPILED_PREFIX, "")] = state_dict.pop(key)

    module._register_load_state_dict_pre_hook(hook)


# ------------------------------------------------------------------------------------------ frozen towers
def run_frozen_in(module: nn.Module, dtype: torch.dtype, entries: Iterable[nn.Module],
                  exits: Iterable[nn.Module]) -> None:
    """Keep a frozen `module`'s weights in `dtype`: floating inputs of `entries` are cast to it, floating
    outputs of `exits` back to fp32, and its state dict is written in fp32 (checkpoints stay alike)."""
    if any(p.requires_grad for p in module.parameters()):
        raise ValueError(f"{type(module).__name__} trains: only frozen modules run in model.frozen_dtype.")
    module.to(dtype)
    for entry in entries:
        entry.register_forward_pre_hook(lambda _, args, kwargs: (_cast(args, dtype), _cast(kwargs, dtype)),
                                        with_kwargs=True)
    for exit_ in exits:
        exit_.register_forward_hook(lambda _, args, output: _cast(output, torch.float32))

    def upcast(_module, state_dict, prefix, _metadata) -> None:
        for key, value in state_dict.items():
            if key.startswith(prefix) and torch.is_tensor(value) and value.dtype == dtype:
                state_dict[key] = value.float()

    module._register_state_dict_hook(upcast)


def freeze_to_dtype(first_stage: nn.Module, conditioner: nn.Module, dtype_name: str | None) -> None:
    """`model.frozen_dtype`: the first stage, and the conditioner when it is frozen, run in that dtype."""
    if dtype_name is None or dtype_name == "float32":
        return
    dtype = getattr(torch, dtype_name)
    run_frozen_in(first_stage, dtype, entries=[first_stage.encoder, first_stage.post_quant_conv],
                  exits=[first_stage.quant_conv, first_stage.decoder])
    params = list(conditioner.parameters())
    if params and not any(p.requires_grad for p in params):
        run_frozen_in(conditioner, dtype, entries=[conditioner], exits=[conditioner])


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if torch.is_tensor(value):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, dtype) for v in value)
    return value


# ------------------------------------------------------------------------------ layout, kernels, TF32
def use_channels_last(modules: Iterable[nn.Module]) -> None:
    """NHWC weights, and NHWC inputs at each module's entry (4-D floating tensors only)."""
    for module in modules:
        module.to(memory_format=torch.channels_last)
        module.register_forward_pre_hook(lambda _, args: tuple(_nhwc(a) for a in args))


def _nhwc(value: Any) -> Any:
    if torch.is_tensor(value) and value.ndim == 4 and value.is_floating_point():
        return value.contiguous(memory_format=torch.channels_last)
    return value


def attention_kernel(backend: str | None):
    """A context pinning SDPA to `backend` (null: torch's own choice)."""
    if backend is None:
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, SDPA_BACKENDS[backend]))


def set_tf32(allow: bool) -> None:
    """TF32 for fp32 matmuls (cuBLAS) and convolutions (cuDNN); only ever switched on, never off, so
    loading a model cannot undo a setting the user made."""
    if not allow:
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
