"""The training objective (ldm/diffusion/objective.py) against LDM Eq. 2 written out by hand, its options (offset
noise, timestep distributions, min-SNR weights), and LatentDiffusion.diffusion_losses delegating to it."""
import pytest
import torch
from tiny_models import tiny_text_ldm

from ldm.diffusion.objective import DiffusionObjective, timestep_density
from ldm.diffusion.schedule import NoiseSchedule
from ldm.models.latent_diffusion import LatentDiffusion

SCHEDULE = NoiseSchedule().double()
WEIGHT = torch.randn(3, 3, generator=torch.Generator().manual_seed(9), dtype=torch.float64)


def denoiser(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed, t-dependent linear map of the channels: something that is not the target."""
    return torch.einsum("oc,bchw->bohw", WEIGHT, z) * (1 + t.double() / 1000).view(-1, 1, 1, 1)


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    return x0, noise, torch.tensor([0, 1, 250, 500, 998, 999])


@pytest.mark.parametrize("prediction_type", ["eps", "v"])
@pytest.mark.parametrize("loss_type", ["l2", "l1"])
def test_losses_at_are_equation_2(prediction_type: str, loss_type: str) -> None:
    x0, noise, t = batch()
    ab = SCHEDULE.alphas_cumprod[t].view(-1, 1, 1, 1)
    z_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    target = noise if prediction_type == "eps" else ab.sqrt() * noise - (1 - ab).sqrt() * x0
    error = denoiser(z_t, t) - target
    expected = (error**2 if loss_type == "l2" else error.abs()).mean(dim=(1, 2, 3))
    objective = DiffusionObjective(prediction_type, loss_type)
    # rtol 1e-6: the schedule stores sqrt(ab) rounded to float32 once (test_schedule.py)
    torch.testing.assert_close(objective.losses_at(denoiser, SCHEDULE, x0, t, noise), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("prediction_type", ["eps", "v"])
def test_min_snr_weights_multiply_the_loss(prediction_type: str) -> None:
    x0, noise, t = batch(1)
    plain = DiffusionObjective(prediction_type).losses_at(denoiser, SCHEDULE, x0, t, noise)
    weighted = DiffusionObjective(prediction_type, min_snr_gamma=5.0).losses_at(denoiser, SCHEDULE, x0, t, noise)
    snr = SCHEDULE.snr(t)
    weights = torch.minimum(snr, torch.full_like(snr, 5.0)) / (snr if prediction_type == "eps" else snr + 1)
    torch.testing.assert_close(weighted, plain * weights, rtol=1e-12, atol=0)


def test_a_draw_is_t_then_noise_from_the_generator() -> None:
    x0, _, _ = batch(2)
    losses, t = DiffusionObjective("v")(denoiser, SCHEDULE, x0, torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    expected_t = torch.randint(0, 1000, (6,), generator=g)
    expected_noise = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    assert torch.equal(t, expected_t)
    torch.testing.assert_close(losses, DiffusionObjective("v").losses_at(denoiser, SCHEDULE, x0, t, expected_noise))


def test_offset_noise_adds_a_per_channel_constant() -> None:
    objective = DiffusionObjective(noise_offset=0.1)
    noise = objective.sample_noise((4, 3, 8, 8), torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 3, 8, 8, generator=g)
    offset = torch.randn(4, 3, 1, 1, generator=g)
    torch.testing.assert_close(noise, base + 0.1 * offset)
    assert torch.equal(DiffusionObjective().sample_noise((2, 3, 4, 4), torch.Generator().manual_seed(1)),
                       torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("options", [dict(timestep_sampling="uniform"),
                                     dict(timestep_sampling="logit_normal", logit_mean=0.5, logit_std=0.8),
                                     dict(timestep_sampling="shifted", timestep_shift=3.0)])
def test_timestep_distributions_follow_their_densities(options: dict) -> None:
    objective = DiffusionObjective(**options)
    t = objective.sample_timesteps(200_000, 1000, torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and 0 <= t.min() and t.max() <= 999
    density = timestep_density(objective, 1000)
    assert density.sum().item() == pytest.approx(1.0, abs=1e-9)
    # per tenth of the range: empirical frequency vs the closed-form probability (binomial sd < 0.0011)
    empirical = torch.bincount(t // 100, minlength=10).double() / len(t)
    expected = density.view(10, 100).sum(1)
    torch.testing.assert_close(empirical, expected, atol=5e-3, rtol=0)
    if options["timestep_sampling"] == "shifted":
        assert expected[5:].sum() > 0.7  # a shift of 3 puts most of the training at high noise


def test_bad_objective_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="uniform, logit_normal, shifted"):
        DiffusionObjective(timestep_sampling="cosine")
    with pytest.raises(ValueError, match="noise_offset"):
        DiffusionObjective(noise_offset=-0.1)
    with pytest.raises(ValueError, match="eps, v"):
        DiffusionObjective(prediction_type="x0")
    with pytest.raises(ValueError, match="min_snr_gamma"):
        DiffusionObjective(min_snr_gamma=0.0)


TINY = tiny_text_ldm()


def test_model_losses_are_the_objective_on_scaled_latents_with_the_caption() -> None:
    torch.manual_seed(0)
    model = LatentDiffusion(**TINY, prediction_type="v", noise_offset=0.05, timestep_sampling="shifted",
                            timestep_shift=2.0, schedule={"zero_terminal_snr": True})
    for p in model.unet.out.parameters():
        torch.nn.init.normal_(p, std=0.1)
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    batch_ = {"image": images, "caption": ["a red circle", "a blue square", ""]}
    losses, t = model.diffusion_losses(batch_, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    latents = model.first_stage.encode(images).sample(generator=g) * 0.5
    cond = model.conditioner(batch_["caption"])
    objective = DiffusionObjective("v", noise_offset=0.05, timestep_sampling="shifted", timestep_shift=2.0)
    expected, expected_t = objective(lambda z, s: model.unet(z, s, **cond), model.schedule, latents, g)
    assert torch.equal(t, expected_t)
    torch.testing.assert_close(losses, expected)
    assert model.schedule.alphas_cumprod[-1] == 0


def test_model_refuses_eps_on_a_zero_snr_schedule() -> None:
    with pytest.raises(ValueError, match="prediction_type=v"):
        LatentDiffusion(**TINY, prediction_type="eps", schedule={"zero_terminal_snr": True})
