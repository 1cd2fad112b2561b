"""Stage 1 LightningModule: the KL autoencoder against its PatchGAN (Rombach et al. 2022, sec. 3.1)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.core.optimizer import LightningOptimizer
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor

from ldm.models.autoencoder_loss import AutoencoderLoss
from ldm.models.nonfinite import NonFiniteTrainingError
from ldm.models.optimization import global_batch_size
from ldm.nets.posterior import DiagonalGaussian
from ldm.nets.vae import AutoencoderNet
from ldm.utils.images import interleave, log_image_grid, save_image_grid


class AutoencoderKL(pl.LightningModule):
    """`vae` and `loss` are the keyword arguments of `AutoencoderNet` and `AutoencoderLoss`.

    Two Adam optimizers take turns on every batch (manual optimisation): the autoencoder with
    the loss's learned log-variance, then the discriminator, which is skipped entirely before
    `loss.disc_start`. `global_step` counts training batches, as in the CompVis code: only the
    autoencoder step advances it (Lightning would otherwise count both optimizers' steps,
    Lightning issue #17958), so `max_steps`, `disc_start` and checkpoint intervals agree.
    A loss that is NaN or inf skips its optimizer step; `nonfinite_steps` counts those skips.
    With `scale_lr`, `learning_rate` is per sample and is multiplied by the global batch size
    (`batch_size` x devices x nodes), the CompVis convention.
    """

    def __init__(
        self,
        vae: dict[str, Any],
        loss: dict[str, Any],
        learning_rate: float = 4.5e-6,
        adam_betas: tuple[float, float] = (0.5, 0.9),
        num_log_images: int = 8,
        scale_lr: bool = False,
        batch_size: int | None = None,
        max_nonfinite_steps: int = 10,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.vae = AutoencoderNet(**vae)
        self.loss = AutoencoderLoss(**loss)
        self.nonfinite_steps = 0
        self._nonfinite_in_a_row = 0

    @property
    def latent_channels(self) -> int:
        return self.vae.latent_channels

    @property
    def downsampling_factor(self) -> int:
        return self.vae.downsampling_factor

    def encode(self, x: Tensor) -> DiagonalGaussian:
        return self.vae.encode(x)

    def decode(self, z: Tensor) -> Tensor:
        return self.vae.decode(z)

    def forward(self, x: Tensor) -> tuple[Tensor, DiagonalGaussian]:
        return self.vae(x)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        lr, betas = self.hparams.learning_rate, tuple(self.hparams.adam_betas)
        if self.hparams.scale_lr:
            lr *= global_batch_size(self.trainer, self.hparams.batch_size)
        autoencoder_params = [*self.vae.parameters(), self.loss.logvar]
        return [
            torch.optim.Adam(autoencoder_params, lr=lr, betas=betas),
            torch.optim.Adam(self.loss.discriminator.parameters(), lr=lr, betas=betas),
        ]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        images = batch["image"]
        autoencoder_opt, discriminator_opt = self.optimizers()
        step = self.global_step
        with self.toggled_optimizer(autoencoder_opt):
            reconstructions, posterior = self.vae(images)
            loss, log = self.loss.generator_loss(
                images, reconstructions, posterior, step, last_layer=self.vae.decoder.conv_out.weight
            )
            self._guarded_step(autoencoder_opt, loss, "autoencoder", advances_global_step=True)
        if self.loss.discriminator_active(step):
            with self.toggled_optimizer(discriminator_opt):
                d_loss, d_log = self.loss.discriminator_loss(images, reconstructions, step)
                self._guarded_step(
                    discriminator_opt, d_loss, "discriminator", advances_global_step=False
                )
            log.update(d_log)
        log["nonfinite_steps"] = float(self.nonfinite_steps)
        total = log.pop("loss")
        batch_size = images.shape[0]
        self.log("train/loss", total, batch_size=batch_size)  # with the learned log-variance: unbounded below
        if "rec_loss" in log:  # the headline (progress bar, as the log's progress lines): reconstruction quality
            self.log("train/rec_loss", log.pop("rec_loss"), prog_bar=True, batch_size=batch_size)
        # corrupt samples the data pipeline dropped while building this batch (summed over the epoch)
        self.log("data/skipped_samples", float(batch.get("num_skipped", 0)), reduce_fx="sum", on_epoch=True,
                 batch_size=batch_size)
        self.log_dict({f"train/{name}": value for name, value in log.items()}, batch_size=batch_size)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        images = batch["image"]
        posterior = self.vae.encode(images)
        reconstructions = self.vae.decode(posterior.mode())  # deterministic, comparable across runs
        _, log = self.loss.generator_loss(images, reconstructions, posterior, self.global_step)
        log["psnr"] = psnr(images, reconstructions)
        if self.loss.perceptual_loss is not None and self.loss.lpips_pretrained:
            log["lpips"] = log["p_loss"]
        self.log_dict(
            {f"val/{name}": value for name, value in log.items()},
            sync_dist=True,
            batch_size=images.shape[0],
        )
        if batch_idx == 0:
            self._save_reconstruction_grid(images, reconstructions)

    def _guarded_step(
        self, optimizer: LightningOptimizer, loss: Tensor, name: str, advances_global_step: bool
    ) -> None:
        """Backward and step, unless the loss is not finite on some rank: then every rank skips."""
        finite = self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True)
        if not finite:
            self.on_nonfinite_loss(name)
            return
        self._nonfinite_in_a_row = 0
        optimizer.zero_grad()
        self.manual_backward(loss)
        if advances_global_step:
            optimizer.step()
        else:  # through the strategy (precision plugins apply) but outside Lightning's step count
            self.trainer.strategy.optimizer_step(optimizer.optimizer, closure=lambda: None)

    def on_nonfinite_loss(self, name: str) -> None:
        """Count and report a skipped step; stop after `max_nonfinite_steps` in a row. The weights are
        then still the last good ones (skipped steps do not advance `global_step`, so no periodic
        checkpoint was written meanwhile): the trainer saves them and the error names the file."""
        self.nonfinite_steps += 1
        self._nonfinite_in_a_row += 1
        rank_zero_warn(
            f"non-finite {name} loss at global step {self.global_step}: skipped this optimizer "
            f"step ({self.nonfinite_steps} skipped so far)"
        )
        if self._nonfinite_in_a_row >= self.hparams.max_nonfinite_steps:
            raise NonFiniteTrainingError(
                f"{self._nonfinite_in_a_row} optimizer steps in a row had a NaN/inf {name} loss (limit "
                f"model.max_nonfinite_steps={self.hparams.max_nonfinite_steps}); the run is stopped. Lower the "
                "learning rate or check the data."
            )

    def _save_reconstruction_grid(self, images: Tensor, reconstructions: Tensor) -> None:
        """PNG with inputs in the left column and reconstructions in the right, plus logger copy."""
        count = self.hparams.num_log_images
        if count <= 0:
            return
        if not self.trainer.is_global_zero:
            return
        grid = interleave(images[:count], reconstructions[:count])
        path = Path(self.trainer.default_root_dir) / "images" / f"recon_step{self.global_step:07d}.png"
        save_image_grid(grid, path, nrow=2)
        caption = "input | reconstruction"
        log_image_grid(self.trainer, "val/reconstructions", path, self.global_step, caption)


def psnr(images: Tensor, reconstructions: Tensor) -> Tensor:
    """Mean per-image PSNR in dB on [0, 1] images (inputs in [-1, 1]; reconstructions clipped)."""
    target = (images.float() + 1.0) / 2.0
    estimate = ((reconstructions.float() + 1.0) / 2.0).clamp(0.0, 1.0)
    mse = (target - estimate).pow(2).flatten(1).mean(dim=1)
    return (-10.0 * torch.log10(mse.clamp_min(1e-10))).mean()
