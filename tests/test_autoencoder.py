"""Stage 1: the KL autoencoder net, its posterior, its losses and its LightningModule."""
import math
import types
import urllib.error
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from PIL import Image
from pytorch_lightning.loggers import CSVLogger, WandbLogger
from torch.utils.data import DataLoader, Dataset

from ldm.models.autoencoder import AutoencoderKL, psnr
from ldm.models.autoencoder_loss import AutoencoderLoss, hinge_d_loss, vanilla_d_loss
from ldm.nets.discriminator import NLayerDiscriminator
from ldm.nets.posterior import DiagonalGaussian
from ldm.nets.vae import AutoencoderNet
from ldm.utils.images import log_image_grid, save_image_grid

TINY = dict(embed_dim=4, z_channels=4, ch=32, num_res_blocks=1)


# --------------------------------------------------------------------------- the net


@pytest.mark.parametrize("ch_mult, factor", [((1, 2, 2), 4), ((1, 2, 2, 2), 8), ((1, 1, 2, 2, 2), 16)])
def test_latent_shape_follows_the_downsampling_factor(ch_mult, factor):
    vae = AutoencoderNet(**TINY, ch_mult=ch_mult)
    x = torch.randn(2, 3, 32, 64)
    reconstruction, posterior = vae(x)
    assert vae.downsampling_factor == factor
    assert posterior.sample().shape == (2, 4, 32 // factor, 64 // factor)
    assert reconstruction.shape == x.shape


def test_attention_is_placed_by_downsampling_rate():
    vae = AutoencoderNet(**TINY, ch_mult=(1, 2, 2), attention_resolutions=[1, 4])
    keys = vae.state_dict().keys()
    assert "encoder.down.0.attn.0.q.weight" in keys and "encoder.down.2.attn.0.q.weight" in keys
    assert not any(key.startswith("encoder.down.1.attn") for key in keys)
    assert "decoder.up.0.attn.1.proj_out.weight" in keys  # decoder levels hold num_res_blocks + 1
    assert not any(key.startswith("decoder.up.1.attn") for key in keys)
    assert vae(torch.randn(1, 3, 8, 8))[0].shape == (1, 3, 8, 8)  # any size, same placement


def test_bad_sizes_raise_clear_errors():
    with pytest.raises(ValueError, match="downsampling rates"):
        AutoencoderNet(**TINY, ch_mult=(1, 2, 2), attention_resolutions=[32])
    with pytest.raises(ValueError, match="multiple of norm_groups"):
        AutoencoderNet(embed_dim=4, z_channels=4, ch=48, ch_mult=(1, 2))
    with pytest.raises(ValueError, match="not divisible by the downsampling factor 4"):
        AutoencoderNet(**TINY, ch_mult=(1, 2, 2)).encode(torch.randn(1, 3, 30, 32))


# --------------------------------------------------------------------------- the posterior


def test_kl_matches_closed_form_and_torch_distributions():
    torch.manual_seed(0)
    params = torch.randn(3, 8, 5, 5)
    posterior = DiagonalGaussian(params)
    mean, logvar = params.chunk(2, dim=1)
    closed_form = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3))
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    standard = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    reference = torch.distributions.kl_divergence(q, standard).sum(dim=(1, 2, 3))
    torch.testing.assert_close(posterior.kl(), closed_form)
    torch.testing.assert_close(posterior.kl(), reference)

    other = DiagonalGaussian(torch.randn(3, 8, 5, 5))
    p = torch.distributions.Normal(other.mean, other.std)
    torch.testing.assert_close(
        posterior.kl(other), torch.distributions.kl_divergence(q, p).sum(dim=(1, 2, 3))
    )
    sample = torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(posterior.nll(sample), -q.log_prob(sample).sum(dim=(1, 2, 3)))


def test_posterior_sampling_is_seeded_and_logvar_clamped():
    params = torch.cat([torch.zeros(1, 2, 3, 3), torch.full((1, 2, 3, 3), 100.0)], dim=1)
    posterior = DiagonalGaussian(params)
    assert posterior.logvar.max().item() == 20.0
    first = posterior.sample(torch.Generator().manual_seed(7))
    again = posterior.sample(torch.Generator().manual_seed(7))
    expected = math.exp(10.0) * torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first, again)
    torch.testing.assert_close(first, expected)
    with pytest.raises(ValueError, match="mean and log-variance"):
        DiagonalGaussian(torch.zeros(1, 3, 2, 2))


# --------------------------------------------------------------------------- the losses


def test_patchgan_gives_patch_logits_and_dcgan_init():
    torch.manual_seed(0)
    disc = NLayerDiscriminator(ndf=64, n_layers=3)
    assert disc(torch.randn(2, 3, 32, 32)).shape == (2, 1, 2, 2)
    conv = disc.main[2].weight
    assert conv.std().item() == pytest.approx(0.02, rel=0.05)
    assert disc.main[3].weight.mean().item() == pytest.approx(1.0, abs=0.01)
    actnorm = NLayerDiscriminator(ndf=8, n_layers=2, use_actnorm=True)
    features = actnorm.main[:4](torch.randn(4, 3, 16, 16) * 5 + 3)  # up to the first ActNorm
    # normalised per channel by the first training batch
    torch.testing.assert_close(features.mean(dim=(0, 2, 3)), torch.zeros(16), atol=1e-5, rtol=0)
    torch.testing.assert_close(features.std(dim=(0, 2, 3)), torch.ones(16), atol=1e-4, rtol=0)


def _generator_case(disc_start: int, global_step: int, last_layer: bool = True):
    """A one-conv 'decoder' so that the adaptive weight can be recomputed by hand."""
    torch.manual_seed(0)
    loss = AutoencoderLoss(
        disc_start=disc_start, perceptual_weight=0.0, disc_ndf=8, disc_num_layers=2, kl_weight=0.1,
        logvar_init=0.3,
    )
    decoder_out = torch.nn.Conv2d(4, 3, 3, padding=1)
    inputs = torch.rand(2, 3, 16, 16) * 2 - 1
    posterior = DiagonalGaussian(torch.randn(2, 8, 16, 16))
    reconstructions = decoder_out(posterior.mode())
    total, log = loss.generator_loss(
        inputs, reconstructions, posterior, global_step,
        last_layer=decoder_out.weight if last_layer else None,
    )
    return loss, decoder_out, inputs, posterior, reconstructions, total, log


def test_adaptive_weight_is_the_gradient_norm_ratio():
    loss, decoder_out, inputs, posterior, reconstructions, total, log = _generator_case(0, 0)
    logvar = torch.tensor(0.3)
    nll = ((inputs - reconstructions).abs() / logvar.exp() + logvar).sum() / 2
    g_loss = -loss.discriminator(reconstructions).mean()
    (nll_grad,) = torch.autograd.grad(nll, decoder_out.weight, retain_graph=True)
    (g_grad,) = torch.autograd.grad(g_loss, decoder_out.weight, retain_graph=True)
    expected = (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0, 1e4) * 0.5
    torch.testing.assert_close(log["d_weight"], expected)
    torch.testing.assert_close(log["nll_loss"], nll.detach())
    torch.testing.assert_close(log["g_loss"], g_loss.detach())
    kl = posterior.kl().sum() / 2
    torch.testing.assert_close(total, nll + 0.1 * kl + expected * g_loss)


def test_discriminator_is_off_before_disc_start_and_on_after():
    loss, _, inputs, _, reconstructions, total, log = _generator_case(disc_start=5, global_step=4)
    assert not loss.discriminator_active(4) and loss.discriminator_active(5)
    assert log["g_loss"].item() == 0.0 and log["d_weight"].item() == 0.0
    torch.testing.assert_close(total.detach(), log["nll_loss"] + 0.1 * log["kl_loss"])
    d_before, _ = loss.discriminator_loss(inputs, reconstructions, global_step=4)
    assert d_before.item() == 0.0

    loss, _, inputs, _, reconstructions, _, log = _generator_case(disc_start=5, global_step=5)
    assert log["g_loss"].item() != 0.0 and log["d_weight"].item() > 0.0
    d_after, d_log = loss.discriminator_loss(inputs, reconstructions, global_step=5)
    real, fake = loss.discriminator(inputs), loss.discriminator(reconstructions)
    expected = 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())
    torch.testing.assert_close(d_after, expected)
    torch.testing.assert_close(d_log["logits_real"], real.mean().detach())


def test_evaluation_logs_the_adversarial_term_unweighted():
    _, _, _, _, _, total, log = _generator_case(disc_start=0, global_step=3, last_layer=False)
    assert log["g_loss"].item() != 0.0 and log["d_weight"].item() == 0.0
    torch.testing.assert_close(total.detach(), log["nll_loss"] + 0.1 * log["kl_loss"])


def test_gan_losses_match_their_formulas():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.5])
    hinge = 0.5 * ((0 + 0.5 + 2) / 3 + (0 + 1 + 2.5) / 3)  # relu(1 - real), relu(1 + fake)
    assert hinge_d_loss(real, fake).item() == pytest.approx(hinge)

    def softplus(v: float) -> float:
        return math.log1p(math.exp(v))

    vanilla = 0.5 * (
        sum(softplus(-v) for v in (2.0, 0.5, -1.0)) / 3 + sum(softplus(v) for v in (-2.0, 0.0, 1.5)) / 3
    )
    assert vanilla_d_loss(real, fake).item() == pytest.approx(vanilla)
    with pytest.raises(ValueError, match="disc_loss must be one of"):
        AutoencoderLoss(disc_start=0, perceptual_weight=0, disc_loss="wasserstein")


@pytest.mark.parametrize("pixel_loss", ["l1", "l2"])
def test_generator_loss_is_the_pixel_nll_under_the_learned_logvar_plus_kl(pixel_loss):
    torch.manual_seed(0)
    inputs, reconstructions = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    posterior = DiagonalGaussian(torch.randn(2, 8, 2, 2))
    loss_fn = AutoencoderLoss(disc_start=10, perceptual_weight=0, pixel_loss=pixel_loss, logvar_init=0.7,
                              kl_weight=1e-3)
    loss, log = loss_fn.generator_loss(inputs, reconstructions, posterior, global_step=0)
    error = (inputs - reconstructions).abs()
    pixel = error if pixel_loss == "l1" else error**2
    logvar = torch.tensor(0.7)
    nll = (pixel / logvar.exp() + logvar).sum() / 2
    kl = (0.5 * (posterior.mean**2 + posterior.var - 1 - posterior.logvar)).sum() / 2
    assert loss.item() == pytest.approx((nll + 1e-3 * kl).item(), rel=1e-5)
    assert log["pixel_loss"].item() == pytest.approx(pixel.mean().item(), rel=1e-6)
    with pytest.raises(ValueError, match="pixel_loss must be one of"):
        AutoencoderLoss(disc_start=0, perceptual_weight=0, pixel_loss="huber")


def test_missing_vgg_weights_fail_fast_offline_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    expected_file = tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth"
    with pytest.raises(FileNotFoundError) as error:
        AutoencoderLoss(disc_start=0)
    message = str(error.value)
    assert str(expected_file) in message and "loss.perceptual_weight=0" in message

    def no_network(url, dst, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(FileNotFoundError, match="download failed: .*Name or service not known"):
        AutoencoderLoss(disc_start=0)


def test_random_trunk_lpips_is_frozen_in_eval_and_kept_out_of_checkpoints():
    loss = AutoencoderLoss(disc_start=0, lpips_pretrained=False, disc_ndf=8, disc_num_layers=2)
    assert not any("perceptual" in key for key in loss.state_dict())
    trainable = {name for name, _ in loss.named_parameters()}
    disc_names = {f"discriminator.{name}" for name, _ in loss.discriminator.named_parameters()}
    assert trainable == {"logvar"} | disc_names
    loss.train()
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    first, second = loss.perceptual_loss(x, y), loss.perceptual_loss(x, y)
    assert torch.equal(first, second) and first.min() > 0  # dropout stays off in training
    assert loss.perceptual_loss(x, x).abs().max() < 1e-6


# --------------------------------------------------------------------------- the LightningModule


class SmoothImages(Dataset):
    """Low-frequency random images in [-1, 1] in the project's batch format."""

    def __init__(self, count: int = 8, size: int = 16, poison: bool = False) -> None:
        generator = torch.Generator().manual_seed(0)
        coarse = torch.rand(count, 3, 4, 4, generator=generator) * 2 - 1
        self.images = F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
        if poison:
            self.images[:, :, 0, 0] = float("nan")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "caption": "", "class_label": -1, "key": f"{index:05d}"}


def tiny_module(disc_start: int, learning_rate: float = 2e-3) -> AutoencoderKL:
    vae = dict(embed_dim=4, z_channels=4, ch=16, ch_mult=[1, 2], num_res_blocks=1, norm_groups=8)
    loss = dict(disc_start=disc_start, perceptual_weight=0.0, disc_ndf=8, disc_num_layers=2)
    return AutoencoderKL(vae=vae, loss=loss, learning_rate=learning_rate, num_log_images=3)


def tiny_trainer(root: Path, **overrides) -> pl.Trainer:
    settings = dict(
        accelerator="cpu", devices=1, logger=CSVLogger(root), default_root_dir=root,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=1, log_every_n_steps=1,
    )
    return pl.Trainer(**{**settings, **overrides})


def mean_l1(model: AutoencoderKL, images: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        error = (model.decode(model.encode(images).mode()) - images).abs().mean().item()
    model.train(was_training)
    return error


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("ae_fit")
    data = SmoothImages()
    model = tiny_module(disc_start=20)
    before = mean_l1(model, data.images)
    disc_before = [p.detach().clone() for p in model.loss.discriminator.parameters()]
    trainer = tiny_trainer(root, max_steps=30, check_val_every_n_epoch=15)
    loader = DataLoader(data, batch_size=4, shuffle=True)
    trainer.fit(model, loader, DataLoader(data, batch_size=4))
    return types.SimpleNamespace(
        model=model, trainer=trainer, data=data, before=before, disc_before=disc_before, root=root
    )


def test_fit_lowers_the_reconstruction_loss(trained):
    assert trained.trainer.global_step == 30  # batches, although the discriminator also stepped
    assert mean_l1(trained.model, trained.data.images) < 0.75 * trained.before
    disc_after = list(trained.model.loss.discriminator.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(trained.disc_before, disc_after))
    logged = trained.trainer.logged_metrics
    for name in ("train/loss", "train/rec_loss", "train/kl_loss", "train/nll_loss", "train/g_loss",
                 "train/d_weight", "train/disc_loss", "train/logits_real", "val/rec_loss", "val/psnr"):
        assert name in logged, name
    assert trained.model.nonfinite_steps == 0


def test_validation_writes_an_input_vs_reconstruction_grid(trained):
    path = Path(trained.trainer.default_root_dir) / "images" / "recon_step0000030.png"
    assert path.is_file()
    with Image.open(path) as grid:  # 2 columns (input | output), num_log_images rows, 2-px padding
        assert grid.size == (2 * 16 + 3 * 2, 3 * 16 + 4 * 2)


def test_checkpoint_round_trip_gives_identical_outputs(trained, tmp_path):
    path = tmp_path / "ae.ckpt"
    trained.trainer.save_checkpoint(path)
    loaded = AutoencoderKL.load_from_checkpoint(path)
    assert loaded.hparams == trained.model.hparams
    assert (loaded.latent_channels, loaded.downsampling_factor) == (4, 2)
    images = trained.data.images
    trained.model.eval()
    loaded.eval()
    with torch.no_grad():
        expected = trained.model.decode(trained.model.encode(images).mode())
        assert torch.equal(loaded.decode(loaded.encode(images).mode()), expected)
        assert torch.equal(loaded(images)[1].mean, trained.model(images)[1].mean)


def test_scale_lr_multiplies_by_the_global_batch_size(tmp_path):
    model = AutoencoderKL(**{**tiny_module(0).hparams, "scale_lr": True, "batch_size": 4})
    model.trainer = tiny_trainer(tmp_path, max_steps=1)
    autoencoder_opt, discriminator_opt = model.configure_optimizers()
    assert autoencoder_opt.param_groups[0]["lr"] == pytest.approx(2e-3 * 4)
    assert discriminator_opt.param_groups[0]["lr"] == pytest.approx(2e-3 * 4)
    unscaled = AutoencoderKL(**{**tiny_module(0).hparams, "scale_lr": True})
    unscaled.trainer = model.trainer
    with pytest.raises(ValueError, match="batch_size"):
        unscaled.configure_optimizers()


def test_nonfinite_losses_skip_their_steps(tmp_path):
    torch.manual_seed(0)
    model = tiny_module(disc_start=0)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=0)
    with pytest.warns(UserWarning, match="non-finite autoencoder loss"):
        trainer.fit(model, DataLoader(SmoothImages(poison=True), batch_size=4))
    assert model.nonfinite_steps == 4  # 2 batches x (autoencoder + discriminator)
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name


def test_psnr_matches_its_definition():
    images = torch.zeros(2, 3, 4, 4)
    noisy = images + 0.2  # 0.1 off on [0, 1] images: mse 0.01 -> 20 dB
    assert psnr(images, noisy).item() == pytest.approx(20.0, abs=1e-4)


# --------------------------------------------------------------------------- visualisation


class RecordingWandbLogger(WandbLogger):
    def __init__(self) -> None:
        super().__init__(offline=True)
        self.calls: list[tuple] = []

    def log_image(self, key, images, step=None, **kwargs) -> None:
        self.calls.append((key, images, step, kwargs))


def test_grids_are_saved_and_sent_only_to_image_loggers(tmp_path):
    path = save_image_grid(torch.rand(5, 3, 8, 8) * 2 - 1, tmp_path / "sub" / "grid.png", nrow=5)
    with Image.open(path) as grid:
        assert grid.size == (5 * 8 + 6 * 2, 8 + 2 * 2)
    wandb_logger = RecordingWandbLogger()
    trainer = types.SimpleNamespace(loggers=[CSVLogger(tmp_path), wandb_logger])
    log_image_grid(trainer, "val/grid", path, step=12, caption="input | reconstruction")
    log_image_grid(trainer, "val/batch", torch.zeros(2, 3, 8, 8), step=13)
    (key, images, step, kwargs), (key2, images2, _, kwargs2) = wandb_logger.calls
    assert (key, images, step) == ("val/grid", [str(path)], 12)
    assert kwargs == {"caption": ["input | reconstruction"]}
    assert key2 == "val/batch" and images2[0].shape == (3, 12, 22) and kwargs2 == {}
    assert torch.allclose(images2[0][:, 2:10, 2:10], torch.tensor(0.5))  # [-1, 1] -> [0, 1]
    with pytest.raises(FileNotFoundError, match="no image to log"):
        log_image_grid(trainer, "val/grid", tmp_path / "missing.png", step=1)
