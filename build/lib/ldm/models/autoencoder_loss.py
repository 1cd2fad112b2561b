"""Training losses.

`AutoencoderLoss` is the first-stage objective of Rombach et al. 2022 (appendix G, eq. 25):
an L1 (or L2) + LPIPS reconstruction term under a learned scalar log-variance, a small KL pull towards
N(0, I), and a hinge PatchGAN term whose weight adapts to the gradient scale (Esser et al. 2021,
eq. 7) and switches on at `disc_start`.
"""
from __future__ import annotations

import urllib.error
import warnings
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.nets.discriminator import NLayerDiscriminator
from ldm.nets.posterior import DiagonalGaussian
from ldm.utils.downloads import offline_reason

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
ADAPTIVE_WEIGHT_EPS = 1e-4
ADAPTIVE_WEIGHT_MAX = 1e4


class AutoencoderLoss(nn.Module):
    """Generator and discriminator objectives of the KL autoencoder.

    `lpips_pretrained=False` gives LPIPS a randomly initialised VGG trunk (with the calibrated
    linear heads that ship in the lpips wheel): it needs no download and is meant for tests
    only, since random features are not a perceptual metric. `perceptual_weight=0` drops LPIPS.
    """

    def __init__(
        self,
        disc_start: int,
        kl_weight: float = 1e-6,
        pixel_weight: float = 1.0,
        pixel_loss: Literal["l1", "l2"] = "l1",
        perceptual_weight: float = 1.0,
        disc_weight: float = 0.5,
        disc_factor: float = 1.0,
        logvar_init: float = 0.0,
        disc_num_layers: int = 3,
        disc_ndf: int = 64,
        disc_loss: Literal["hinge", "vanilla"] = "hinge",
        lpips_pretrained: bool = True,
    ) -> None:
        super().__init__()
        if pixel_loss not in _PIXEL_LOSSES:
            raise ValueError(f"pixel_loss must be one of {sorted(_PIXEL_LOSSES)}, got {pixel_loss!r}")
        if disc_loss not in _DISC_LOSSES:
            raise ValueError(f"disc_loss must be one of {sorted(_DISC_LOSSES)}, got {disc_loss!r}")
        self.disc_start = disc_start
        self.kl_weight = kl_weight
        self.pixel_weight = pixel_weight
        self._pixel_loss = _PIXEL_LOSSES[pixel_loss]
        self.perceptual_weight = perceptual_weight
        self.disc_weight = disc_weight
        self.disc_factor = disc_factor
        self.lpips_pretrained = lpips_pretrained
        self.logvar = nn.Parameter(torch.full((), float(logvar_init)))
        self.perceptual_loss = build_lpips(lpips_pretrained) if perceptual_weight > 0 else None
        self.discriminator = NLayerDiscriminator(ndf=disc_ndf, n_layers=disc_num_layers)
        self._disc_loss = _DISC_LOSSES[disc_loss]

    def discriminator_active(self, global_step: int) -> bool:
        return self.disc_factor > 0 and global_step >= self.disc_start

    def generator_loss(
        self,
        inputs: Tensor,
        reconstructions: Tensor,
        posterior: DiagonalGaussian,
        global_step: int,
        last_layer: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss of the autoencoder (plus its learned log-variance) and the terms to log.

        `last_layer` is the decoder's last weight (`decoder.conv_out.weight`); the adversarial
        weight needs its gradients. Pass None in evaluation: the adversarial term is then
        logged but weighted by zero.
        """
        rec_loss = self.pixel_weight * self._pixel_loss(inputs - reconstructions)
        log: dict[str, Tensor] = {"pixel_loss": rec_loss.detach().mean()}
        if self.perceptual_loss is not None:
            p_loss = self.perceptual_loss(inputs.contiguous(), reconstructions.contiguous())
            rec_loss = rec_loss + self.perceptual_weight * p_loss
            log["p_loss"] = p_loss.detach().mean()
        batch = inputs.shape[0]
        # Laplace-style likelihood with one learned scale: rec / exp(logvar) + logvar per pixel.
        nll_loss = (rec_loss / self.logvar.exp() + self.logvar).sum() / batch
        kl_loss = posterior.kl().sum() / batch
        loss = nll_loss + self.kl_weight * kl_loss

        zero = inputs.new_zeros(())
        g_loss, d_weight = zero, zero
        if self.discriminator_active(global_step):
            g_loss = -self.discriminator(reconstructions.contiguous()).mean()
            if last_layer is not None:
                d_weight = self.adaptive_weight(nll_loss, g_loss, last_layer)
            loss = loss + d_weight * self.disc_factor * g_loss

        log.update(
            loss=loss.detach(),
            rec_loss=rec_loss.detach().mean(),
            nll_loss=nll_loss.detach(),
            kl_loss=kl_loss.detach(),
            logvar=self.logvar.detach(),
            g_loss=g_loss.detach(),
            d_weight=d_weight,
        )
        return loss, log

    def discriminator_loss(
        self, inputs: Tensor, reconstructions: Tensor, global_step: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss of the PatchGAN on real inputs vs (detached) reconstructions; zero before disc_start."""
        logits_real = self.discriminator(inputs.detach().contiguous())
        logits_fake = self.discriminator(reconstructions.detach().contiguous())
        factor = self.disc_factor if self.discriminator_active(global_step) else 0.0
        d_loss = factor * self._disc_loss(logits_real, logits_fake)
        log = {
            "disc_loss": d_loss.detach(),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }
        return d_loss, log

    def adaptive_weight(self, nll_loss: Tensor, g_loss: Tensor, last_layer: Tensor) -> Tensor:
        """lambda = ||grad_L nll|| / (||grad_L g|| + 1e-4) at the decoder's last layer L
        (Esser et al. 2021, eq. 7), clamped to [0, 1e4], times disc_weight; no gradient flows."""
        (nll_grads,) = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)
        (g_grads,) = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
        weight = nll_grads.norm() / (g_grads.norm() + ADAPTIVE_WEIGHT_EPS)
        return weight.clamp(0.0, ADAPTIVE_WEIGHT_MAX).detach() * self.disc_weight


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


_DISC_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}

# Per-pixel reconstruction error. L1 is the paper's, and works together with LPIPS. Without LPIPS
# (offline, or CPU-sized runs) L2 learns small objects far faster: while the decoder cannot yet
# place an object, L1's optimum is the per-pixel median, i.e. the background, and its gradient
# does not grow with the error; L2 pulls towards the mean and weighs the large object errors most.
_PIXEL_LOSSES = {"l1": torch.abs, "l2": torch.square}


def build_lpips(pretrained: bool = True) -> nn.Module:
    """Frozen LPIPS-VGG (Zhang et al. 2018) on [-1, 1] images, returning (B, 1, 1, 1).

    All its tensors become non-persistent buffers: they never reach an optimizer and never bloat
    a checkpoint (they are rebuilt from the VGG file and the lpips wheel on load).
    """
    if pretrained:
        ensure_vgg16_weights()
    import lpips  # deferred: importing it costs seconds and only this function needs it

    with warnings.catch_warnings():  # lpips calls torchvision's deprecated `pretrained=` API
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net="vgg", pnet_rand=not pretrained, verbose=False)
    _freeze_as_buffers(model)
    return _EvalOnly(model)


def ensure_vgg16_weights() -> Path:
    """Return the cached torchvision VGG16 file, downloading it if allowed; fail fast if not.

    Without this check, offline runs spend seconds building VGG16 and then die in a urllib
    traceback that names neither the file nor the way out.
    """
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(VGG16_URL).name
    if path.is_file():
        return path
    if (reason := offline_reason()) is not None:
        raise FileNotFoundError(_missing_vgg_message(path, reason))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(VGG16_URL, str(path), hash_prefix=path.stem.split("-")[-1])
    except (urllib.error.URLError, OSError, RuntimeError) as error:
        raise FileNotFoundError(_missing_vgg_message(path, f"download failed: {error}")) from error
    return path


def _missing_vgg_message(path: Path, reason: str) -> str:
    return (
        f"The LPIPS perceptual loss needs torchvision's ImageNet VGG16 weights ({reason}). "
        f"Either place the file {path.name} at {path} (get it from {VGG16_URL}; the folder is "
        "$TORCH_HOME/hub/checkpoints), or train without the perceptual term by setting "
        "loss.perceptual_weight=0 (train.py command line: model.loss.perceptual_weight=0)."
    )


def _freeze_as_buffers(model: nn.Module) -> None:
    for module in model.modules():
        tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        for name, tensor in tensors:
            delattr(module, name)
            module.register_buffer(name, tensor.detach(), persistent=False)


class _EvalOnly(nn.Module):
    """Keeps the wrapped module in eval mode (LPIPS has dropout) whatever `.train()` says."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module.eval()

    def train(self, mode: bool = True) -> _EvalOnly:
        super().train(mode)
        self.module.eval()
        return self

    def forward(self, *args: Tensor) -> Tensor:
        return self.module(*args)
