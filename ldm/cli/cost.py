"""What a paper-size run costs on a CPU, said before it starts (`python train.py experiment=ldm_f8_text` on a
machine without a GPU runs for days at the paper's widths: the user should know, and know `size=small`).

The trained networks the model config describes are built on the `meta` device (no memory, no weights) and
one training batch is traced through them with torch's FLOP counter. A training step costs about three
forward passes (the backward pass about twice the forward: Kaplan et al. 2020, Sec. 2.1), and this CPU's
speed is measured on a float32 matmul, the best case, so the step time is a lower bound.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import hydra
import torch
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ldm.models.autoencoder import AutoencoderKL
from ldm.models.concat_conditioners import ConcatConditioner, concat_channels_of
from ldm.models.latent_diffusion import LatentDiffusion
from ldm.nets.unet import UNetModel
from ldm.nets.vae import AutoencoderNet
from ldm.training.stages import first_stage_config
from ldm.utils.config import CONFIG_DIR

TRAINING_STEP_FORWARDS = 3  # forward + backward (about 2 forwards)


@dataclass
class RunCost:
    parameters: dict[str, int]     # trained network -> parameter count
    flops_per_step: float          # forward + backward of one training batch
    cpu_flops_per_second: float    # measured matmul throughput of this process

    @property
    def seconds_per_step(self) -> float:
        return self.flops_per_step / self.cpu_flops_per_second


def cpu_cost_warning(cfg: DictConfig) -> str | None:
    """A warning for a `size=paper` run on the CPU, with what it costs and what to do; None otherwise."""
    if cfg.size.get("name") != "paper" or not runs_on_cpu(cfg.trainer):
        return None
    try:
        cost = estimate_cost(cfg)
    except Exception as error:  # noqa: BLE001 - an estimate must never stop a run
        return (f"size=paper on the CPU: this run uses the paper's network widths ({type(error).__name__} while "
                "estimating its cost). For a CPU run use size=small (same structure, CPU-sized networks).")
    networks = ", ".join(f"{name} {count / 1e6:,.0f}M" for name, count in cost.parameters.items())
    steps = int(cfg.trainer.get("max_steps") or -1)
    total = f", {format_duration(cost.seconds_per_step * steps)} for trainer.max_steps={steps}" if steps > 0 else ""
    gpu = " A GPU is visible: trainer=gpu uses it." if torch.cuda.is_available() else ""
    stage1 = (cfg.get("first_stage") or {}).get("experiment")
    if stage1 and not cfg.model.get("first_stage_ckpt"):
        total += f"; before that it trains its stage-1 model ({stage1}) at the same size"
    return (f"experiment={cfg.get('task_name')} at size=paper on the CPU: {sum(cost.parameters.values()) / 1e6:,.0f}M "
            f"trained parameters ({networks}), {cost.flops_per_step / 1e12:,.1f} TFLOP per training step of "
            f"{cfg.data.batch_size} images at {cfg.data.resolution} px: at least {cost.seconds_per_step:,.0f} s per "
            f"step on this CPU ({cost.cpu_flops_per_second / 1e9:,.0f} GFLOP/s measured){total}. For a CPU run "
            f"use size=small (same structure, CPU-sized networks and recipe).{gpu}")


def runs_on_cpu(trainer_cfg: DictConfig) -> bool:
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    return accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())


def estimate_cost(cfg: DictConfig) -> RunCost:
    model = OmegaConf.to_container(cfg.model, resolve=True)
    target = hydra.utils.get_class(model["_target_"])
    batch, resolution = int(cfg.data.batch_size), int(cfg.data.resolution)
    if issubclass(target, LatentDiffusion):
        networks, forward = _latent_diffusion_forward(model, batch, resolution, _latent_channels(cfg, model))
    elif issubclass(target, AutoencoderKL):
        networks, forward = _autoencoder_forward(model, batch, resolution)
    else:
        raise ValueError(f"no cost model for {target.__name__}")
    parameters = {name: sum(p.numel() for p in net.parameters() if p.requires_grad) for name, net in networks.items()}
    return RunCost(parameters, TRAINING_STEP_FORWARDS * forward, matmul_flops_per_second())


def _latent_channels(cfg: DictConfig, model: dict[str, Any]) -> int:
    """The first stage's latent channels: from `model.first_stage`, else from the stage-1 experiment's config."""
    if model.get("first_stage"):
        return int(model["first_stage"]["embed_dim"])
    if GlobalHydra.instance().is_initialized():
        return int(first_stage_config(cfg).model.vae.embed_dim)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return int(first_stage_config(cfg).model.vae.embed_dim)


def _latent_diffusion_forward(model: dict[str, Any], batch: int, resolution: int,
                              latent_channels: int) -> tuple[dict[str, nn.Module], float]:
    """UNet (in / out channels derived as LatentDiffusion derives them) and conditioner; the frozen first
    stage's encoding is not counted."""
    with torch.device("meta"):
        conditioner = hydra.utils.instantiate(model["conditioner"])
        in_channels = latent_channels + concat_channels_of(conditioner, latent_channels)
        unet = UNetModel(**{**model["unet"], "in_channels": in_channels, "out_channels": latent_channels})
    latent = resolution // int(model.get("first_stage_factor") or 8)
    with FlopCounterMode(display=False) as counter:
        cond = _conditioning(conditioner, batch)
        unet(torch.zeros(batch, in_channels, latent, latent, device="meta"),
             torch.zeros(batch, dtype=torch.long, device="meta"), **cond)
    return {"UNet": unet, "conditioner": conditioner}, counter.get_total_flops()


def _conditioning(conditioner: nn.Module, batch: int) -> dict[str, torch.Tensor]:
    """The conditioner's output for `batch` empty conditions, traced on `meta` where it can be; a Composite's
    text / class part only (concat channels are part of the UNet input above)."""
    conditioner = getattr(conditioner, "primary", conditioner)
    key = getattr(conditioner, "batch_key", None)
    if key is None or isinstance(conditioner, ConcatConditioner):
        return {}
    try:
        return conditioner([""] * batch if key == "caption" else torch.zeros(batch, dtype=torch.long, device="meta"))
    except Exception:  # noqa: BLE001 - e.g. a label check needs values: feed the output's shape instead
        width = conditioner.output_dim
        if key == "caption":
            return {"context": torch.zeros(batch, conditioner.context_length, width, device="meta")}
        return {"y": torch.zeros(batch, width, device="meta")}


def _autoencoder_forward(model: dict[str, Any], batch: int, resolution: int) -> tuple[dict[str, nn.Module], float]:
    """The autoencoder; LPIPS and the discriminator are not counted."""
    with torch.device("meta"):
        vae = AutoencoderNet(**model["vae"])
    with FlopCounterMode(display=False) as counter:
        vae(torch.zeros(batch, 3, resolution, resolution, device="meta"))
    return {"autoencoder": vae}, counter.get_total_flops()


def matmul_flops_per_second(size: int = 1024, repeats: int = 3) -> float:
    """float32 matmul FLOP/s of this process (its torch thread count), the upper end of what training gets."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return repeats * 2 * size ** 3 / (time.perf_counter() - start)


def format_duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:,.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:,.1f} h"
    return f"{seconds / 86400:,.0f} days"
