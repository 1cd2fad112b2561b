"""NoiseSchedule and diffusion_loss against diffusers' DDPMScheduler and the closed forms."""
import math

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_ddpm import (
    rescale_zero_terminal_snr as rescale_zero_terminal_snr_diffusers,
)
from hydra import compose, initialize_config_dir

from ldm.diffusion.samplers import sample
from ldm.diffusion.schedule import (
    NoiseSchedule,
    check_prediction_type,
    diffusion_loss,
    make_betas,
)

SCHEDULES = [  # ours, diffusers' name, (beta_start, beta_end)
    ("linear", "linear", (1e-4, 0.02)),
    ("scaled_linear", "scaled_linear", (0.00085, 0.012)),
    ("cosine", "squaredcos_cap_v2", (0.00085, 0.012)),
]


@pytest.mark.parametrize("ours, theirs, betas", SCHEDULES)
def test_betas_and_alpha_bar_match_diffusers(ours: str, theirs: str, betas: tuple[float, float]) -> None:
    schedule = NoiseSchedule(1000, ours, *betas)
    reference = DDPMScheduler(num_train_timesteps=1000, beta_schedule=theirs, beta_start=betas[0], beta_end=betas[1])
    torch.testing.assert_close(schedule.betas, reference.betas, atol=1e-6, rtol=0)
    # diffusers accumulates the product in float32; ours is float64 rounded once.
    torch.testing.assert_close(schedule.alphas_cumprod, reference.alphas_cumprod, atol=1e-6, rtol=0)


def test_alpha_bar_endpoints() -> None:
    scaled = NoiseSchedule(beta_schedule="scaled_linear")
    assert scaled.alphas_cumprod[0].item() == pytest.approx(1 - 0.00085, abs=1e-7)
    # The Stable Diffusion schedule ends at alpha_bar ~ 0.0047 (terminal SNR > 0).
    assert scaled.alphas_cumprod[-1].item() == pytest.approx(0.004660, abs=2e-6)
    linear = NoiseSchedule(beta_schedule="linear", linear_start=1e-4, linear_end=0.02)
    assert linear.alphas_cumprod[-1].item() == pytest.approx(4.04e-5, rel=1e-2)
    cosine = NoiseSchedule(beta_schedule="cosine")
    f = [math.cos((t / 1000 + 8e-3) / (1 + 8e-3) * math.pi / 2) ** 2 for t in range(1001)]
    closed_form = torch.tensor([f[t + 1] / f[0] for t in range(1000)], dtype=torch.float32)
    # Identical until the 0.999 clip on beta bites, at the very end.
    torch.testing.assert_close(cosine.alphas_cumprod[:990], closed_form[:990], atol=1e-7, rtol=1e-5)
    assert cosine.alphas_cumprod[-1].item() < 1e-6
    assert cosine.betas.max().item() == pytest.approx(0.999)
    assert torch.all(scaled.alphas_cumprod[1:] < scaled.alphas_cumprod[:-1])


def test_buffers_are_float32_and_stay_out_of_the_state_dict() -> None:
    schedule = NoiseSchedule()
    assert schedule.state_dict() == {}
    assert {name for name, _ in schedule.named_buffers()} >= {
        "betas", "alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"
    }
    assert all(buffer.dtype == torch.float32 for buffer in schedule.buffers())


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.randn(5, 3, 4, 4, generator=generator)
    noise = torch.randn(5, 3, 4, 4, generator=generator)
    t = torch.tensor([0, 1, 250, 777, 999])
    return x0, noise, t


def test_q_sample_and_v_target_match_closed_forms_and_diffusers() -> None:
    schedule = NoiseSchedule()
    x0, noise, t = _batch()
    ab = schedule.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    expected_xt = ab.sqrt() * x0.double() + (1 - ab).sqrt() * noise.double()
    expected_v = ab.sqrt() * noise.double() - (1 - ab).sqrt() * x0.double()
    torch.testing.assert_close(schedule.q_sample(x0, t, noise).double(), expected_xt, atol=1e-6, rtol=0)
    torch.testing.assert_close(schedule.training_target(x0, noise, t, "v").double(), expected_v, atol=1e-6, rtol=0)
    assert torch.equal(schedule.training_target(x0, noise, t, "eps"), noise)
    reference = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    torch.testing.assert_close(schedule.q_sample(x0, t, noise), reference.add_noise(x0, noise, t), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        schedule.training_target(x0, noise, t, "v"), reference.get_velocity(x0, noise, t), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("prediction_type", ["eps", "v"])
def test_predict_x0_and_eps_invert_the_forward_process(prediction_type: str) -> None:
    schedule = NoiseSchedule().double()
    x0, noise, t = (tensor.double() if tensor.is_floating_point() else tensor for tensor in _batch(1))
    x_t = schedule.q_sample(x0, t, noise)
    target = schedule.training_target(x0, noise, t, prediction_type)
    # v round trips use sqrt(ab)^2 + sqrt(1-ab)^2 = 1, which the float32 tables keep to ~1e-7.
    torch.testing.assert_close(schedule.predict_x0(x_t, t, target, prediction_type), x0, atol=1e-6, rtol=0)
    torch.testing.assert_close(schedule.predict_eps(x_t, t, target, prediction_type), noise, atol=1e-6, rtol=0)


@pytest.mark.parametrize("prediction_type", ["eps", "v"])
def test_min_snr_weights_equal_min_snr_x0_loss(prediction_type: str) -> None:
    """The weighted loss on the model's own output is min(SNR, gamma) times the x0-space error."""
    schedule, gamma = NoiseSchedule().double(), 5.0
    x0, noise, t = (tensor.double() if tensor.is_floating_point() else tensor for tensor in _batch(2))
    x_t = schedule.q_sample(x0, t, noise)
    target = schedule.training_target(x0, noise, t, prediction_type)
    pred = target + 0.1 * torch.randn(target.shape, generator=torch.Generator().manual_seed(3), dtype=target.dtype)
    weights = schedule.loss_weights(t, prediction_type, min_snr_gamma=gamma)
    ab = schedule.alphas_cumprod[t]
    snr = ab / (1 - ab)
    expected_weights = torch.minimum(snr, torch.full_like(snr, gamma)) / (snr if prediction_type == "eps" else snr + 1)
    torch.testing.assert_close(weights, expected_weights, rtol=1e-12, atol=0)
    x0_error = diffusion_loss(schedule.predict_x0(x_t, t, pred, prediction_type), x0)
    torch.testing.assert_close(diffusion_loss(pred, target, weights), torch.clamp(snr, max=gamma) * x0_error)
    assert torch.equal(schedule.loss_weights(t, prediction_type), torch.ones(5, dtype=torch.float64))


def test_diffusion_loss_is_per_sample_mean_error() -> None:
    pred, target = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    weights = torch.tensor([1.0, 0.5, 0.0])
    l2 = diffusion_loss(pred, target)
    assert l2.shape == (3,)
    torch.testing.assert_close(l2, ((pred - target) ** 2).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(diffusion_loss(pred, target, loss_type="l1"), (pred - target).abs().mean(dim=(1, 2, 3)))
    torch.testing.assert_close(diffusion_loss(pred, target, weights), l2 * weights)
    with pytest.raises(ValueError, match="does not match"):
        diffusion_loss(pred, target[:, :1])


def test_unknown_names_raise_and_list_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="linear, scaled_linear, cosine"):
        NoiseSchedule(beta_schedule="squaredcos_cap_v2")
    schedule = NoiseSchedule()
    x0, noise, t = _batch()
    with pytest.raises(ValueError, match="eps, v"):
        schedule.training_target(x0, noise, t, "epsilon")
    with pytest.raises(ValueError, match="eps, v"):
        schedule.predict_x0(x0, t, noise, "sample")
    with pytest.raises(ValueError, match="eps, v"):
        schedule.loss_weights(t, "x0", min_snr_gamma=5.0)
    with pytest.raises(ValueError, match="l2, l1"):
        diffusion_loss(x0, noise, loss_type="huber")
    with pytest.raises(ValueError, match="min_snr_gamma"):
        schedule.loss_weights(t, "eps", min_snr_gamma=0.0)


# ---------------------------------------------------------------- zero terminal SNR (Lin et al. 2024)
@pytest.mark.parametrize("ours, theirs, betas", SCHEDULES)
def test_zero_terminal_snr_tables_match_diffusers(ours: str, theirs: str, betas: tuple[float, float]) -> None:
    schedule = NoiseSchedule(1000, ours, *betas, zero_terminal_snr=True)
    plain = NoiseSchedule(1000, ours, *betas)
    expected_betas = rescale_zero_terminal_snr_diffusers(make_betas(ours, 1000, *betas))
    torch.testing.assert_close(schedule.betas.double(), expected_betas, atol=1e-6, rtol=0)
    reference = DDPMScheduler(num_train_timesteps=1000, beta_schedule=theirs, beta_start=betas[0], beta_end=betas[1],
                              rescale_betas_zero_snr=True)
    torch.testing.assert_close(schedule.alphas_cumprod, reference.alphas_cumprod, atol=1e-6, rtol=0)
    assert schedule.alphas_cumprod[-1].item() == 0.0 and schedule.terminal_snr == 0.0  # exactly pure noise at T-1
    assert schedule.alphas_cumprod[0].item() == pytest.approx(plain.alphas_cumprod[0].item(), abs=1e-7)
    assert torch.all(schedule.alphas_cumprod[1:] < schedule.alphas_cumprod[:-1])
    assert plain.terminal_snr > 0


def test_loss_weights_are_finite_at_zero_snr() -> None:
    schedule = NoiseSchedule(zero_terminal_snr=True).double()
    t = torch.tensor([0, 500, 998, 999])
    snr = schedule.snr(t)
    assert snr[-1].item() == 0.0
    eps_weights = schedule.loss_weights(t, "eps", min_snr_gamma=5.0)
    v_weights = schedule.loss_weights(t, "v", min_snr_gamma=5.0)
    assert torch.isfinite(eps_weights).all() and torch.isfinite(v_weights).all()
    # eps: min(SNR, 5) / SNR -> 1 as SNR -> 0; v: min(SNR, 5) / (SNR + 1) = 0 at SNR = 0
    torch.testing.assert_close(eps_weights, torch.minimum(torch.ones_like(snr), 5.0 / snr.clamp(min=1e-30)))
    torch.testing.assert_close(v_weights, torch.minimum(snr, torch.full_like(snr, 5.0)) / (snr + 1))
    assert eps_weights[-1].item() == 1.0 and v_weights[-1].item() == 0.0


def test_eps_prediction_on_a_zero_snr_schedule_is_refused_naming_v() -> None:
    with pytest.raises(ValueError, match="prediction_type=v"):
        check_prediction_type(NoiseSchedule(zero_terminal_snr=True), "eps")
    check_prediction_type(NoiseSchedule(zero_terminal_snr=True), "v")
    check_prediction_type(NoiseSchedule(), "eps")
    schedule = NoiseSchedule(zero_terminal_snr=True)
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="prediction_type=v"):
        sample(lambda x, t, c: x, schedule, (1, 4, 2, 2), steps=2, prediction_type="eps", x_T=x)
    # v at SNR = 0: x0 = -v and eps = x_t, both finite
    t = torch.tensor([999])
    v = torch.randn(1, 4, 2, 2)
    x_t = torch.randn(1, 4, 2, 2)
    torch.testing.assert_close(schedule.predict_x0(x_t, t, v, "v"), -v)
    torch.testing.assert_close(schedule.predict_eps(x_t, t, v, "v"), x_t)


def test_linear_schedule_gets_ddpm_endpoints_unless_given() -> None:
    """beta_schedule=linear alone must not keep the scaled-linear endpoints (a silent, different schedule)."""
    linear = NoiseSchedule(beta_schedule="linear")
    assert (linear.linear_start, linear.linear_end) == (1e-4, 0.02)
    reference = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")  # diffusers' DDPM defaults
    torch.testing.assert_close(linear.betas, reference.betas, atol=1e-7, rtol=0)
    assert (NoiseSchedule().linear_start, NoiseSchedule().linear_end) == (0.00085, 0.012)
    explicit = NoiseSchedule(beta_schedule="linear", linear_start=0.001, linear_end=0.01)
    assert explicit.betas[0].item() == pytest.approx(0.001) and explicit.betas[-1].item() == pytest.approx(0.01)


def test_the_config_schedule_follows_beta_schedule(repo_root) -> None:
    with initialize_config_dir(config_dir=f"{repo_root}/configs", version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=ldm_f8_text", "model.schedule.beta_schedule=linear"])
    schedule = NoiseSchedule(**cfg.model.schedule)
    assert (schedule.linear_start, schedule.linear_end) == (1e-4, 0.02)
    assert schedule.alphas_cumprod[-1].item() == pytest.approx(4.04e-5, rel=1e-2)
