"""`LatentDiffusion`: the stage-2 LightningModule (LDM paper, Sec. 3.2-3.3).

A frozen stage-1 autoencoder maps images to latents z0 = scale_factor * E(x); a UNet learns to predict
the noise (or v) added to them, conditioned through cross-attention (text), a class embedding (classes),
concatenation to z_t (low-res image, masked image + mask, semantic map: ldm/models/concat_conditioners.py), a
Composite of these, or nothing. The UNet's input / output channels are derived: latent (+ concat) channels.
This module owns training only: nets, schedule and samplers live in their own modules.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any, Mapping, Sequence

import hydra
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn

from ldm.diffusion.objective import DiffusionObjective
from ldm.diffusion.pipeline import LatentPipeline, posterior_sample
from ldm.diffusion.samplers import StepCallback
from ldm.diffusion.schedule import NoiseSchedule, check_prediction_type
from ldm.diffusion.settings import SamplerSettings
from ldm.models.acceleration import (
    accept_compiled_keys,
    attention_kernel,
    check_options,
    compile_in_place,
    compile_targets,
    freeze_to_dtype,
    set_tf32,
    strip_compiled_prefix,
    use_channels_last,
)
from ldm.models.concat_conditioners import (
    as_batch,
    concat_channels_of,
    condition,
    is_droppable,
    unet_inputs,
)
from ldm.models.conditioners import drop_mask
from ldm.models.ema import EMA
from ldm.models.nonfinite import NonFiniteGradientGuard
from ldm.models.optimization import (
    build_optimizer,
    check_lr_schedule,
    effective_learning_rate,
    lr_multiplier,
)
from ldm.models.sharding import full_parameters, is_sharded, shard_latent_diffusion
from ldm.nets.unet import UNetModel
from ldm.nets.vae import AutoencoderNet

NUM_TIMESTEP_BINS = 4  # the loss is also logged per quartile of t: where the model struggles shows there


class LatentDiffusion(pl.LightningModule):
    def __init__(
        self,
        unet: dict,
        conditioner: dict,
        first_stage_ckpt: str | None = None,
        first_stage: dict | None = None,
        first_stage_factor: int | None = None,
        image_size: int = 256,
        scale_factor: float | None = None,
        prediction_type: str = "eps",
        loss_type: str = "l2",
        min_snr_gamma: float | None = None,
        noise_offset: float = 0.0,
        timestep_sampling: str = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        timestep_shift: float = 1.0,
        p_uncond: float = 0.1,
        learning_rate: float = 1e-4,
        scale_lr: bool = False,
        batch_size: int | None = None,
        weight_decay: float = 0.01,
        adam_betas: Sequence[float] = (0.9, 0.999),
        warmup_steps: int = 0,
        optimizer: dict | None = None,
        lr_schedule: str = "constant",
        lr_decay_steps: int | None = None,
        min_lr_ratio: float = 0.0,
        ema_decay: float = 0.9999,
        schedule: dict | None = None,
        max_nonfinite_steps: int = 10,
        compile: bool = False,
        compile_mode: str = "default",
        compile_backend: str = "inductor",
        frozen_dtype: str | None = None,
        channels_last: bool = False,
        sdpa_backend: str | None = None,
        allow_tf32: bool = False,
    ) -> None:
        """`first_stage` holds the autoencoder's constructor arguments; its weights arrive with the state
        dict. This module opens no file: `ldm.loading.build_latent_diffusion` fills `first_stage` in from
        `first_stage_ckpt` (kept as a record of where the weights came from) and loads them, so a
        checkpoint of this module rebuilds from its hyperparameters alone. `optimizer` is a Hydra partial
        (None: AdamW with `adam_betas` and `weight_decay`); `lr_schedule` follows `warmup_steps` of linear
        warm-up (ldm.models.optimization.lr_multiplier). `compile` ... `allow_tf32`: speed switches that keep
        the state-dict layout (ldm/models/acceleration.py)."""
        super().__init__()
        self.save_hyperparameters()
        check_lr_schedule(lr_schedule, min_lr_ratio)
        check_options(compile_mode, sdpa_backend, frozen_dtype)
        if first_stage is None:
            raise ValueError(
                "LatentDiffusion needs `first_stage` (the autoencoder's constructor arguments). Build it with "
                "ldm.loading.build_latent_diffusion(config), which reads them and the weights from first_stage_ckpt."
            )
        self.first_stage = AutoencoderNet(**first_stage)
        self.first_stage.requires_grad_(False).eval()
        _check_first_stage(self.first_stage, first_stage_ckpt, first_stage_factor)

        self.conditioner = hydra.utils.instantiate(conditioner)
        self.unet = UNetModel(**derived_unet_channels(unet, self.first_stage, self.conditioner, first_stage_ckpt))
        self.schedule = NoiseSchedule(**(schedule or {}))
        check_prediction_type(self.schedule, prediction_type)
        self.objective = DiffusionObjective(prediction_type, loss_type, min_snr_gamma, noise_offset,
                                            timestep_sampling, logit_mean, logit_std, timestep_shift)
        self.register_buffer("scale_factor", torch.tensor(math.nan if scale_factor is None else scale_factor))
        self._scale_factor_ready = scale_factor is not None
        self.ema = EMA(self.trainable, decay=ema_decay) if ema_decay > 0 else None
        self.nonfinite_guard = NonFiniteGradientGuard(max_nonfinite_steps)
        self._accelerate(compile, compile_mode, compile_backend, frozen_dtype, channels_last, allow_tf32)

    def _accelerate(self, compile: bool, mode: str, backend: str, frozen_dtype: str | None, channels_last: bool,
                    allow_tf32: bool) -> None:
        """After the EMA is built (its shadows stay fp32 and keep the eager names)."""
        accept_compiled_keys(self)
        freeze_to_dtype(self.first_stage, self.conditioner, frozen_dtype)
        if channels_last:
            use_channels_last([self.unet, self.first_stage])
        set_tf32(allow_tf32)
        if compile:
            compile_in_place(compile_targets(self.unet, self.first_stage, self.conditioner), mode, backend)

    @property
    def trainable(self) -> nn.ModuleDict:
        """The weights that train (and get an EMA): the UNet and a trainable conditioner."""
        modules = {"unet": self.unet}
        if any(p.requires_grad for p in self.conditioner.parameters()):
            modules["conditioner"] = self.conditioner
        return nn.ModuleDict(modules)

    def train(self, mode: bool = True) -> "LatentDiffusion":
        super().train(mode)
        self.first_stage.eval()  # frozen: dropout / norm statistics stay in inference mode
        return self

    # ---------------------------------------------------------------- latents
    @torch.no_grad()
    def encode(self, images: torch.Tensor, generators: list[torch.Generator] | None = None) -> torch.Tensor:
        """Scaled latents: a posterior draw per image, row i from generators[i] (img2img seeds), else global RNG."""
        posterior = self.first_stage.encode(images)
        return posterior_sample(posterior.mean, posterior.std, generators) * self.scale_factor

    @torch.no_grad()
    def batch_latents(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
        """Unscaled first-stage latents of a batch: a posterior sample from cached `latent_mean` /
        `latent_std` (cached-latent shards: no encoder pass), else from encoding `image`."""
        if "latent_mean" in batch:
            mean, std = batch["latent_mean"], batch["latent_std"]
            return mean + std * torch.randn(mean.shape, device=mean.device, dtype=mean.dtype, generator=generator)
        return self.first_stage.encode(batch["image"]).sample(generator=generator)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.first_stage.decode(latents / self.scale_factor)

    def set_scale_factor(self, value: float) -> None:
        """Fix the latent scale (e.g. from an imported checkpoint); it is then never re-estimated."""
        self.scale_factor.fill_(value)
        self._scale_factor_ready = True

    def _init_scale_factor(self, batch: dict[str, Any]) -> None:
        """The paper's rescaling (Sec. 3.3 / App. G): unit-variance latents from the first batch, from its
        samples whose latents are finite only (one NaN/inf image would make the scale, and then every step,
        NaN). Computed on rank 0 and broadcast, so every rank trains on identically scaled latents."""
        latents = self.batch_latents(batch).flatten(1)
        finite = torch.isfinite(latents).all(dim=1)
        value = 1.0 / latents[finite].std() if bool(finite.any()) else torch.tensor(math.nan, device=latents.device)
        value = self.trainer.strategy.broadcast(value, src=0) if self._trainer is not None else value
        bad = int((~finite).sum())
        if not bool(torch.isfinite(value)) or float(value) <= 0:
            raise ValueError(
                f"Cannot set scale_factor from the first batch: {bad} of {len(finite)} samples have NaN/inf latents "
                f"and the others give 1/std = {float(value)}. The images hold NaN/inf (or constant) pixels, or the "
                "first stage is broken: check the data (data/inspect_shards.py), or pass model.scale_factor=VALUE.")
        if bad:
            rank_zero_warn(f"{bad} of {len(finite)} samples of the first batch have NaN/inf latents (check the "
                           f"data): scale_factor = {float(value):.5f} is computed from the others.")
        self.scale_factor.copy_(value)
        self._scale_factor_ready = True

    # ---------------------------------------------------------------- training
    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        x, kwargs = unet_inputs(latents, cond)  # a `concat` condition is stacked on z_t's channels (Fig. 3)
        with attention_kernel(self.hparams.get("sdpa_backend")):
            return self.unet(x, timesteps, **kwargs)

    def conditioning(self, batch: Mapping[str, Any], drop: torch.Tensor | None,
                     latent_size: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """The UNet's keyword arguments for a batch; concat conditions are brought to `latent_size`, a masked
        image is encoded by this model's frozen first stage (`encode_condition`)."""
        if latent_size is None:
            side = self.hparams.image_size // self.first_stage.downsampling_factor
            latent_size = (side, side)
        return condition(self.conditioner, batch, drop, latent_size=latent_size, encode=self.encode_condition)

    @torch.no_grad()
    def encode_condition(self, images: torch.Tensor) -> torch.Tensor:
        """Scaled latents of a condition image (posterior mode: a condition needs no sampling noise)."""
        return self.first_stage.encode(images).mode() * self.scale_factor

    def diffusion_losses(
        self, batch: dict[str, Any], generator: torch.Generator | None = None, p_uncond: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample losses and their timesteps (LDM paper, Eq. 2; ldm.diffusion.objective)."""
        latents = self.batch_latents(batch, generator) * self.scale_factor
        n = latents.shape[0]
        drop = drop_mask(n, p_uncond, generator=generator, device=self.device) if p_uncond > 0 else None
        cond = self.conditioning(batch, drop, latent_size=latents.shape[-2:])
        return self.objective(lambda z, t: self(z, t, cond), self.schedule, latents, generator)

    def on_train_batch_start(self, batch: dict[str, Any], batch_idx: int) -> None:
        if not self._scale_factor_ready:
            self._init_scale_factor(batch)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        losses, t = self.diffusion_losses(batch, p_uncond=self.hparams.p_uncond)
        loss = losses.mean()
        n = losses.shape[0]
        self.log("train/loss", loss, batch_size=n)
        # corrupt samples the data pipeline dropped while building this batch (summed over the epoch)
        skipped = float(batch.get("num_skipped", 0))
        self.log("data/skipped_samples", skipped, reduce_fx="sum", on_epoch=True, batch_size=n)
        self._log_loss_by_timestep("train", losses, t)
        if self._is_logging_step():
            # host syncs happen here only: the progress bar value and the non-finite step check
            self.log("loss", loss, prog_bar=True, logger=False, batch_size=n)
            self.log("train/skipped_nonfinite_steps", float(self.nonfinite_guard.skipped_steps()))
            self.nonfinite_guard.check()
        return loss

    def _is_logging_step(self) -> bool:
        return self._trainer is None or (self.global_step + 1) % self.trainer.log_every_n_steps == 0

    def _log_loss_by_timestep(self, stage: str, losses: torch.Tensor, t: torch.Tensor) -> None:
        bins = (t * NUM_TIMESTEP_BINS) // self.schedule.num_timesteps
        onehot = nn.functional.one_hot(bins, NUM_TIMESTEP_BINS).to(losses.dtype)
        sums, counts = losses @ onehot, onehot.sum(0)
        for i in range(NUM_TIMESTEP_BINS):
            # weighted by the bin's count, so the epoch average is the true per-sample mean of the bin
            mean = sums[i] / counts[i].clamp(min=1)
            self.log(f"{stage}/loss_t_q{i + 1}", mean, batch_size=1, sync_dist=stage == "val")

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.nonfinite_guard.arm(optimizer, self.trainable.parameters())

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # the EMA follows each real optimizer step (once per accumulated batch), and before
        # ModelCheckpoint saves, so a mid-run checkpoint holds the EMA of its own step
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update(self.trainable)

    # ---------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        self._ema_scope = self.ema_weights()
        self._ema_scope.__enter__()

    def on_validation_epoch_end(self) -> None:
        self._ema_scope.__exit__(None, None, None)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        # fixed noise and timesteps per batch, so validation losses are comparable across the run
        generator = torch.Generator(device=self.device).manual_seed(batch_idx)
        losses, t = self.diffusion_losses(batch, generator=generator)
        self.log("val/loss", losses.mean(), batch_size=losses.shape[0], sync_dist=True, prog_bar=True)
        self._log_loss_by_timestep("val", losses, t)

    def ema_weights(self):
        """Context in which the trainable weights are the EMA weights (a no-op without EMA)."""
        return self.ema.swap(self.trainable) if self.ema is not None else nullcontext()

    # ---------------------------------------------------------------- sampling
    def pipeline(self) -> LatentPipeline:
        """Conditions -> images with this model's nets (ldm.diffusion.pipeline): `forward` as the denoiser (it
        stacks a `concat` condition on z_t), `conditioning` for the (un)conditional inputs at the latent size."""
        return LatentPipeline(
            self, self.conditioning, is_droppable(self.conditioner), self.schedule, self.encode, self.decode,
            self.first_stage.embed_dim, self.first_stage.downsampling_factor, self.hparams.prediction_type,
            self.device, self.encode_condition,
        )

    @torch.no_grad()
    def generate(
        self,
        conditions: Sequence[str] | torch.Tensor | Mapping[str, Any] | None = None,
        num_samples: int | None = None,
        settings: SamplerSettings | dict | None = None,
        *,
        seed_offset: int = 0,
        image_size: int | Sequence[int] | None = None,
        init_images: torch.Tensor | None = None,
        strength: float = 1.0,
        progress: bool = False,
        negative_prompt: str | Sequence[str] | None = None,
        callback: StepCallback | None = None,
        **overrides: Any,
    ) -> torch.Tensor:
        """Images in [-1, 1] for prompts / class labels (or `num_samples` for unconditional models), or for a
        batch of conditions ({"caption": [...], "lowres": ..., "image": ..., "mask": ..., "semantic_map": ...}),
        sampled with `settings` (SamplerSettings defaults where None; keyword `overrides` such as steps=20 win).
        Sample i uses the seed `seed + seed_offset + i`, so it is the same whatever the batch size. `image_size`
        is a side or (height, width), multiples of the first stage's factor (None: the training size);
        `negative_prompt` replaces the empty prompt in guidance's unconditional branch (LatentPipeline.conditions)."""
        with full_parameters(self):  # sharded (FSDP2): gathered once, not in each of the steps' forwards
            return self.pipeline()(
                as_batch(self.conditioner, conditions), num_samples, SamplerSettings.of(settings, **overrides),
                image_size=image_size or self.hparams.image_size, seed_offset=seed_offset, init_images=init_images,
                strength=strength, progress=progress, negative_prompt=negative_prompt, callback=callback,
            )

    # ---------------------------------------------------------------- optimisation
    def configure_model(self) -> None:
        """Under Lightning's ModelParallelStrategy (`trainer=fsdp2`): FSDP2-shard the trainable nets and the EMA
        over the data-parallel mesh (ldm/models/sharding.py). Other strategies set no mesh: nothing happens."""
        mesh = getattr(self, "_device_mesh", None)
        if mesh is not None and not is_sharded(self.unet):
            shard_latent_diffusion(self, mesh["data_parallel"] if mesh.mesh_dim_names else mesh)

    def configure_optimizers(self) -> Any:
        lr = effective_learning_rate(self.hparams.learning_rate, self.hparams.scale_lr, self._trainer,
                                     self.hparams.batch_size)
        hp = self.hparams
        optimizer = build_optimizer(hp.get("optimizer"), self.trainable.parameters(), lr,
                                    betas=tuple(hp.adam_betas), weight_decay=hp.weight_decay)
        schedule, warmup, min_ratio = hp.get("lr_schedule", "constant"), hp.warmup_steps, hp.get("min_lr_ratio", 0.0)
        total = hp.get("lr_decay_steps") or (self._trainer.max_steps if self._trainer is not None else None)
        if schedule != "constant":
            lr_multiplier(warmup, schedule, warmup, total, min_ratio)  # a missing decay length fails here, not mid-run
        # a lambda (not a callable object): LambdaLR then saves no schedule state, so a resume with a new
        # trainer.max_steps ("train longer") decays to the new end
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_multiplier(step, schedule, warmup, total, min_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = strip_compiled_prefix(checkpoint["state_dict"])  # eager names, always

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._scale_factor_ready = not math.isnan(float(checkpoint["state_dict"]["scale_factor"]))


def _check_first_stage(first_stage: AutoencoderNet, ckpt: str | None, factor: int | None) -> None:
    if factor is not None and first_stage.downsampling_factor != factor:
        raise ValueError(
            f"The stage-1 model {ckpt} has downsampling factor f={first_stage.downsampling_factor}, but this "
            f"experiment expects f={factor}. Pass a stage-1 checkpoint of ae_kl_f{factor}, or use the "
            f"experiment ldm_f{first_stage.downsampling_factor}_* that matches it."
        )


def derived_unet_channels(unet: dict, first_stage: AutoencoderNet, conditioner: nn.Module, ckpt: str | None) -> dict:
    """The UNet arguments with `in_channels` = latent + concatenated-condition channels and `out_channels` =
    latent channels, never typed twice: null (or absent) derives them, a different explicit value is an error."""
    latent = first_stage.embed_dim
    concat = concat_channels_of(conditioner, latent)
    derived = {"in_channels": latent + concat, "out_channels": latent}
    why = (f"the stage-1 model {ckpt or '(built in)'} makes latents with {latent} channels (f="
           f"{first_stage.downsampling_factor})" + (f", plus {concat} concatenated condition channels" if concat else ""))
    for key, value in derived.items():
        given = unet.get(key)
        if given is not None and given != value:
            raise ValueError(f"model.unet.{key}={given}, but {why}: {key} must be {value}. Leave model.unet.{key} "
                             f"out (null derives it), or pass a stage-1 checkpoint / conditioner that gives {given}.")
    return {**unet, **derived}
