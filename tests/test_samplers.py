"""Samplers: step-by-step parity with diffusers' schedulers (every sampler x every timestep spacing, zero-terminal-SNR
schedules, the full 1000-step DDPM chain), guidance and its rescale, reproducibility, img2img.

The parity runs use float64 latents and a fixed deterministic denoiser: the Bayes-optimal eps for
Gaussian data plus a small fixed random conv term, so latents stay O(1) like a trained model's.
What is left of the difference (~1e-6) comes from the alpha_bar tables: diffusers accumulates
them in float32, we in float64 (see test_schedule.py), and its DPM-Solver rounds the latent to
float32 inside each step.
"""
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.guiders.guider_utils import rescale_noise_cfg

from ldm.diffusion.samplers import (
    SAMPLERS,
    TIMESTEP_SPACINGS,
    guided_denoiser,
    make_generators,
    randn_per_sample,
    sample,
    spaced_timesteps,
)
from ldm.diffusion.schedule import NoiseSchedule

SCHEDULE = NoiseSchedule(1000, "scaled_linear", 0.00085, 0.012)
ZERO_SNR = NoiseSchedule(1000, "scaled_linear", 0.00085, 0.012, zero_terminal_snr=True)
DIFFUSERS_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SHAPE = (2, 4, 6, 6)
_CONV = torch.randn(4, 4, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.3


class Denoiser:
    """A deterministic eps- or v-model that records its calls (input batch size, x_t, t).

    Its fixed non-optimal term is added to eps, or (`x0_space`, for zero-terminal-SNR schedules, where
    x0 from eps divides by sqrt(alpha_bar) = 0) to x0."""

    def __init__(self, prediction_type: str = "eps", schedule: NoiseSchedule = SCHEDULE, x0_space: bool = False) -> None:
        self.prediction_type, self.schedule, self.x0_space = prediction_type, schedule, x0_space
        self.calls: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        self.calls.append((x.shape[0], x.clone(), t.clone()))
        ab = self.schedule.alphas_cumprod[t].to(x.dtype).view(-1, 1, 1, 1)
        time_term = (t.to(x.dtype) / 150).sin().view(-1, 1, 1, 1)
        extra = 0.1 * torch.tanh(torch.nn.functional.conv2d(x, _CONV.to(x.dtype), padding=1) + time_term)
        if "y" in cond:
            extra = extra + 0.1 * cond["y"].to(x.dtype).view(-1, 4, 1, 1)
        if self.x0_space:  # E[x0 | x_t] for x0 ~ N(0, 0.5^2), plus the extra term
            x0 = 0.25 * ab.sqrt() * x / (0.25 * ab + 1 - ab) + extra
            eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
        else:  # E[eps | x_t] for x0 ~ N(0, 0.5^2), plus the extra term
            eps = (1 - ab).sqrt() * x / (0.25 * ab + 1 - ab) + extra
            x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
        if self.prediction_type == "eps":
            return eps
        return ab.sqrt() * eps - (1 - ab).sqrt() * x0


def _x_T(dtype: torch.dtype = torch.float64, shape: tuple[int, ...] = SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=dtype)


def _diffusers_trajectory(scheduler, x: torch.Tensor, steps: int, model: Denoiser, step_kwargs: dict,
                          gap: int | None = None) -> list:
    """(t, x after the step) for each step, per-step noise from the same per-sample generators as ours.
    `gap`: make DDIMScheduler step by `gap` timesteps (it steps by T // steps whatever the spacing)."""
    scheduler.set_timesteps(steps)
    if gap is not None:
        scheduler.num_inference_steps = scheduler.config.num_train_timesteps // gap
        assert scheduler.config.num_train_timesteps // scheduler.num_inference_steps == gap
    generators, trajectory = make_generators(5, x.shape[0]), []
    for t in scheduler.timesteps:
        out = model(x, t.expand(x.shape[0]), {})
        x = scheduler.step(out, t, x, generator=generators, **step_kwargs).prev_sample
        trajectory.append((int(t), x))
    return trajectory


SD_DDIM = dict(clip_sample=False, set_alpha_to_one=False)  # Stable Diffusion's DDIM settings
PARITY_CASES = {  # id: (diffusers scheduler, its non-default config, our sample() arguments, steps)
    "ddpm": (DDPMScheduler, dict(clip_sample=False, steps_offset=1), dict(sampler="ddpm"), 10),
    "ddim-eta0": (DDIMScheduler, dict(**SD_DDIM, steps_offset=1), dict(sampler="ddim"), 10),
    "ddim-eta1": (DDIMScheduler, dict(**SD_DDIM, steps_offset=1), dict(sampler="ddim", eta=1.0), 10),
    "ddim-v-trailing": (
        DDIMScheduler,
        dict(**SD_DDIM, timestep_spacing="trailing", prediction_type="v_prediction"),
        dict(sampler="ddim", timestep_spacing="trailing", prediction_type="v"),
        20,
    ),
    "dpmpp2m-linspace": (
        DPMSolverMultistepScheduler,
        dict(algorithm_type="dpmsolver++", solver_order=2),
        dict(sampler="dpmpp_2m", timestep_spacing="linspace"),
        10,
    ),
    "dpmpp2m-leading-20-v": (
        DPMSolverMultistepScheduler,
        dict(algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="leading", steps_offset=1,
             prediction_type="v_prediction"),
        dict(sampler="dpmpp_2m", prediction_type="v"),
        20,
    ),
}


@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_trajectory_matches_diffusers(case: str) -> None:
    scheduler_cls, config, ours, steps = PARITY_CASES[case]
    model = Denoiser(ours.get("prediction_type", "eps"))
    x_T = _x_T()
    step_kwargs = {"eta": ours.get("eta", 0.0)} if scheduler_cls is DDIMScheduler else {}
    expected = _diffusers_trajectory(scheduler_cls(**DIFFUSERS_SCHEDULE, **config), x_T, steps, model, step_kwargs)
    trajectory = []
    final = sample(
        model, SCHEDULE, SHAPE, steps=steps, x_T=x_T, generators=make_generators(5, SHAPE[0]),
        callback=lambda i, t, x: trajectory.append((t, x)), **ours,
    )
    assert [t for t, _ in trajectory] == [t for t, _ in expected]
    for (_, ours_x), (_, theirs_x) in zip(trajectory, expected):
        torch.testing.assert_close(ours_x, theirs_x, atol=1e-5, rtol=0)
    torch.testing.assert_close(final, expected[-1][1], atol=1e-5, rtol=0)
    assert final.abs().max() < 10  # a meaningful comparison: the latents did not blow up


SCHEDULERS = {  # our sampler: the diffusers scheduler with the same update rule, with Stable Diffusion's settings
    "ddpm": (DDPMScheduler, dict(clip_sample=False)),
    "ddim": (DDIMScheduler, SD_DDIM),
    "dpmpp_2m": (DPMSolverMultistepScheduler, dict(algorithm_type="dpmsolver++", solver_order=2)),
}


def _compare_with_diffusers(sampler: str, spacing: str, steps: int, schedule: NoiseSchedule, scheduler,
                            model_kwargs: dict, atol: float, prediction_type: str = "eps", eta: float = 0.0) -> None:
    x_T = _x_T()
    grid = spaced_timesteps(1000, steps, spacing, 1, skip_zero=SAMPLERS[sampler].skips_zero_timestep)
    # diffusers' DDIM steps to t - T // steps; with "linspace" that is off its own grid unless the gap is matched
    gap = grid[0] - grid[1] if sampler == "ddim" and spacing == "linspace" else None
    step_kwargs = {"eta": eta} if sampler == "ddim" else {}
    expected = _diffusers_trajectory(scheduler, x_T, steps, Denoiser(prediction_type, schedule, **model_kwargs),
                                     step_kwargs, gap)
    trajectory = []
    final = sample(Denoiser(prediction_type, schedule, **model_kwargs), schedule, SHAPE, sampler=sampler, steps=steps,
                   eta=eta, x_T=x_T, generators=make_generators(5, SHAPE[0]), timestep_spacing=spacing, steps_offset=1,
                   prediction_type=prediction_type, callback=lambda i, t, x: trajectory.append((t, x)))
    assert [t for t, _ in trajectory] == [t for t, _ in expected] == grid
    for (_, ours_x), (_, theirs_x) in zip(trajectory, expected):
        torch.testing.assert_close(ours_x, theirs_x, atol=atol, rtol=0)
    assert torch.isfinite(final).all() and final.abs().max() < 10


@pytest.mark.parametrize("spacing", TIMESTEP_SPACINGS)
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_spacing_of_every_sampler_matches_diffusers(sampler: str, spacing: str) -> None:
    scheduler_cls, config = SCHEDULERS[sampler]
    scheduler = scheduler_cls(**DIFFUSERS_SCHEDULE, **config, timestep_spacing=spacing, steps_offset=1)
    _compare_with_diffusers(sampler, spacing, 10, SCHEDULE, scheduler, {}, atol=1e-5)


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_zero_terminal_snr_v_sampling_matches_diffusers(sampler: str, spacing: str) -> None:
    """Grids that start at T-1 (pure noise on a zero-SNR schedule). diffusers' DPM-Solver replaces alpha_bar_T = 0
    by 2^-24 (its lambda = log(alpha / sigma) needs alpha > 0); ours takes the exact limit (expm1(-inf) = -1), so the
    first step differs by O(2^-12) there and the comparison is looser for that sampler."""
    scheduler_cls, config = SCHEDULERS[sampler]
    scheduler = scheduler_cls(**DIFFUSERS_SCHEDULE, **config, timestep_spacing=spacing, steps_offset=1,
                              rescale_betas_zero_snr=True, prediction_type="v_prediction")
    _compare_with_diffusers(sampler, spacing, 10, ZERO_SNR, scheduler, {"x0_space": True},
                            atol=2e-3 if sampler == "dpmpp_2m" else 1e-5, prediction_type="v")


def test_zero_snr_dpm_solver_difference_is_only_diffusers_clamp() -> None:
    """With diffusers' alpha_bar_T = 2^-24 put into our tables, our DPM-Solver++ trajectory is diffusers' to 1e-5."""
    clamped = NoiseSchedule(1000, "scaled_linear", 0.00085, 0.012, zero_terminal_snr=True).double()
    clamped.alphas_cumprod[-1] = 2.0**-24
    clamped.sqrt_alphas_cumprod[-1] = 2.0**-12
    clamped.sqrt_one_minus_alphas_cumprod[-1] = (1 - 2.0**-24) ** 0.5
    scheduler_cls, config = SCHEDULERS["dpmpp_2m"]
    scheduler = scheduler_cls(**DIFFUSERS_SCHEDULE, **config, timestep_spacing="trailing", rescale_betas_zero_snr=True,
                              prediction_type="v_prediction")
    x_T, model = _x_T(), Denoiser("v", ZERO_SNR, x0_space=True)
    expected = _diffusers_trajectory(scheduler, x_T, 10, model, {})
    ours = sample(model, clamped, SHAPE, sampler="dpmpp_2m", steps=10, x_T=x_T, timestep_spacing="trailing",
                  prediction_type="v")
    torch.testing.assert_close(ours, expected[-1][1], atol=1e-5, rtol=0)


def test_ddpm_with_1000_steps_is_the_full_chain_and_matches_diffusers() -> None:
    grid = spaced_timesteps(1000, 1000, "leading", 1)
    assert grid == list(range(999, -1, -1))
    assert all(spaced_timesteps(1000, 1000, spacing, 1, skip_zero=True) == grid for spacing in TIMESTEP_SPACINGS)
    x_T, steps = _x_T(), 1000
    expected = _diffusers_trajectory(DDPMScheduler(**DIFFUSERS_SCHEDULE, clip_sample=False), x_T, steps, Denoiser(), {})
    final = sample(Denoiser(), SCHEDULE, SHAPE, sampler="ddpm", steps=steps, x_T=x_T, generators=make_generators(5, 2))
    # 1000 steps accumulate the ~1e-6 per-step difference of the float32 / float64 alpha_bar tables (module doc)
    torch.testing.assert_close(final, expected[-1][1], atol=1e-4, rtol=0)
    assert final.abs().max() > 0.5


@pytest.mark.parametrize("prediction_type", ["eps", "v"])
def test_guidance_rescale_matches_diffusers_rescale_noise_cfg(prediction_type: str) -> None:
    model = Denoiser(prediction_type)
    x, t = _x_T(torch.float32), torch.tensor([500, 20])
    cond, uncond = {"y": torch.tensor([[3.0, -2.0, 1.0, 0.0], [-1.0, 2.0, 0.5, 3.0]])}, {"y": torch.zeros(2, 4)}
    out_cond, out_uncond = model(x, t, cond), model(x, t, uncond)
    guided = out_uncond + 7.5 * (out_cond - out_uncond)
    for phi in (0.0, 0.7, 1.0):
        expected = rescale_noise_cfg(guided, out_cond, guidance_rescale=phi)
        torch.testing.assert_close(guided_denoiser(model, cond, uncond, 7.5, phi)(x, t), expected)
    rescaled = guided_denoiser(model, cond, uncond, 7.5, 1.0)(x, t)
    torch.testing.assert_close(rescaled.std(dim=(1, 2, 3)), out_cond.std(dim=(1, 2, 3)))  # phi = 1: the cond's std
    assert (rescaled - guided).abs().max() > 1e-2
    with pytest.raises(ValueError, match="guidance_rescale must be in"):
        guided_denoiser(model, cond, uncond, 7.5, 1.5)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_eps_and_v_parameterisations_of_one_model_sample_the_same(sampler: str) -> None:
    runs = [
        sample(Denoiser(kind), SCHEDULE, SHAPE, sampler=sampler, steps=8, x_T=_x_T(), prediction_type=kind,
               generators=make_generators(0, 2))
        for kind in ("eps", "v")
    ]
    torch.testing.assert_close(runs[0], runs[1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 7, 10, 50, 333])
def test_timestep_grids_match_diffusers(spacing: str, steps: int) -> None:
    for scheduler_cls, skip_zero in ((DDIMScheduler, False), (DPMSolverMultistepScheduler, True)):
        scheduler = scheduler_cls(**DIFFUSERS_SCHEDULE, timestep_spacing=spacing, steps_offset=1)
        scheduler.set_timesteps(steps)
        assert spaced_timesteps(1000, steps, spacing, 1, skip_zero=skip_zero) == scheduler.timesteps.tolist()


@pytest.mark.parametrize("sampler, eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0), ("dpmpp_2m", 0.0)])
def test_sample_i_does_not_depend_on_the_batch(sampler: str, eta: float) -> None:
    cond = {"y": torch.randn(4, 4, generator=torch.Generator().manual_seed(2))}
    uncond = {"y": torch.zeros(4, 4)}
    common = dict(sampler=sampler, eta=eta, steps=6, cfg_scale=3.0)
    batch = sample(Denoiser(), SCHEDULE, (4, 4, 6, 6), cond=cond, uncond=uncond, generators=make_generators(10, 4),
                   **common)
    alone = sample(Denoiser(), SCHEDULE, (1, 4, 6, 6), cond={"y": cond["y"][3:]}, uncond={"y": uncond["y"][3:]},
                   generators=make_generators(10, 1, offset=3), **common)
    torch.testing.assert_close(batch[3:], alone, atol=1e-6, rtol=0)
    assert not torch.allclose(batch[0], batch[3], atol=1e-3)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_one_model_call_per_step_and_one_batched_call_for_guidance(sampler: str) -> None:
    cond, uncond = {"y": torch.ones(2, 4)}, {"y": torch.zeros(2, 4)}
    plain, guided = Denoiser(), Denoiser()
    sample(plain, SCHEDULE, (2, 4, 6, 6), sampler=sampler, steps=7, cond=cond, generators=make_generators(0, 2))
    sample(guided, SCHEDULE, (2, 4, 6, 6), sampler=sampler, steps=7, cond=cond, uncond=uncond, cfg_scale=4.0,
           generators=make_generators(0, 2))
    assert [batch for batch, _, _ in plain.calls] == [2] * 7
    assert [batch for batch, _, _ in guided.calls] == [4] * 7
    grid = spaced_timesteps(1000, 7, "leading", 1, skip_zero=sampler == "dpmpp_2m")
    assert [t[0].item() for _, _, t in plain.calls] == grid


def test_guidance_scale_one_is_the_conditional_model_and_other_scales_change_the_output() -> None:
    cond, uncond = {"y": torch.ones(2, 4)}, {"y": -torch.ones(2, 4)}
    common = dict(steps=5, x_T=_x_T(torch.float32), cond=cond)
    conditional_only, scale_one = Denoiser(), Denoiser()
    reference = sample(conditional_only, SCHEDULE, SHAPE, **common)
    torch.testing.assert_close(sample(scale_one, SCHEDULE, SHAPE, uncond=uncond, cfg_scale=1.0, **common), reference,
                               atol=0, rtol=0)
    assert [batch for batch, _, _ in scale_one.calls] == [2] * 5  # no unconditional pass
    guided = sample(Denoiser(), SCHEDULE, SHAPE, uncond=uncond, cfg_scale=5.0, **common)
    assert (guided - reference).abs().max() > 1e-2


@pytest.mark.parametrize("prediction_type", ["eps", "v"])
def test_guided_output_is_uncond_plus_scale_times_difference(prediction_type: str) -> None:
    model = Denoiser(prediction_type)
    x, t = _x_T(torch.float32), torch.tensor([500, 20])
    cond, uncond = {"y": torch.ones(2, 4)}, {"y": torch.zeros(2, 4)}
    expected = model(x, t, uncond) + 7.5 * (model(x, t, cond) - model(x, t, uncond))
    torch.testing.assert_close(guided_denoiser(model, cond, uncond, 7.5)(x, t), expected)
    with pytest.raises(ValueError, match="same keys"):
        guided_denoiser(model, cond, {"context": torch.zeros(2, 3, 8)}, 7.5)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_img2img_runs_the_last_steps_from_the_noised_init_latent(sampler: str) -> None:
    init_latent = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    model = Denoiser()
    out = sample(model, SCHEDULE, SHAPE, sampler=sampler, steps=10, init_latent=init_latent, strength=0.55,
                 generators=make_generators(3, 2))
    grid = spaced_timesteps(1000, 10, "leading", 1, skip_zero=sampler == "dpmpp_2m")
    assert [t[0].item() for _, _, t in model.calls] == grid[5:]  # int(10 * 0.55) = 5 steps
    t_start = torch.full((2,), grid[5])
    expected_start = SCHEDULE.q_sample(init_latent, t_start, randn_per_sample(SHAPE, make_generators(3, 2), "cpu"))
    torch.testing.assert_close(model.calls[0][1], expected_start, atol=0, rtol=0)
    assert out.shape == SHAPE and torch.isfinite(out).all()


def test_img2img_matches_diffusers_ddim() -> None:
    init_latent = torch.randn(SHAPE, dtype=torch.float64)
    noise = randn_per_sample(SHAPE, make_generators(3, 2), "cpu", torch.float64)
    ours = sample(Denoiser(), SCHEDULE, SHAPE, steps=10, init_latent=init_latent, strength=0.6,
                  generators=make_generators(3, 2))
    scheduler = DDIMScheduler(**DIFFUSERS_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    scheduler.set_timesteps(10)
    timesteps = scheduler.timesteps[4:]
    x, model = scheduler.add_noise(init_latent, noise, timesteps[:1]), Denoiser()
    for t in timesteps:
        x = scheduler.step(model(x, t.expand(2), {}), t, x).prev_sample
    torch.testing.assert_close(ours, x, atol=1e-5, rtol=0)


def test_bad_arguments_raise_clear_errors() -> None:
    model = Denoiser()
    with pytest.raises(ValueError, match="ddpm, ddim, dpmpp_2m"):
        sample(model, SCHEDULE, SHAPE, sampler="euler")
    with pytest.raises(ValueError, match="leading, trailing, linspace"):
        sample(model, SCHEDULE, SHAPE, timestep_spacing="karras")
    with pytest.raises(ValueError, match="eta only applies"):
        sample(model, SCHEDULE, SHAPE, sampler="ddpm", eta=0.5)
    with pytest.raises(ValueError, match="one generator per sample"):
        sample(model, SCHEDULE, SHAPE, x_T=_x_T(torch.float32), generators=make_generators(0, 3))
    with pytest.raises(ValueError, match="x_T has shape"):
        sample(model, SCHEDULE, SHAPE, x_T=torch.zeros(1, 4, 6, 6))
    with pytest.raises(ValueError, match="strength must be in"):
        sample(model, SCHEDULE, SHAPE, init_latent=torch.zeros(SHAPE), strength=1.5)
    with pytest.raises(ValueError, match="runs no step"):
        sample(model, SCHEDULE, SHAPE, steps=4, init_latent=torch.zeros(SHAPE), strength=0.2)
    with pytest.raises(ValueError, match="batch size"):
        sample(model, SCHEDULE, SHAPE, cond={"y": torch.zeros(3, 4)})
    with pytest.raises(ValueError, match="steps_offset=0"):
        sample(model, SCHEDULE, SHAPE, sampler="ddpm", steps=999, steps_offset=5)
    assert model.calls == []


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "ddpm"])
def test_known_region_ends_at_its_latent_and_the_rest_is_denoised_beside_it(sampler: str) -> None:
    """keep = 1 on the left half: there the result is the known latent (up to alpha_bar_0's noise for the samplers
    that land on t = 0, not on clean); the right half is the sampler's, moved by what the model saw on the left."""
    known = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    keep = torch.zeros(SHAPE[0], 1, *SHAPE[2:], dtype=torch.float64)
    keep[..., :3] = 1
    kwargs = dict(sampler=sampler, steps=8, generators=make_generators(3, 2), x_T=_x_T())
    blended = sample(Denoiser(), SCHEDULE, SHAPE, known=(known, keep), **kwargs)
    free = sample(Denoiser(), SCHEDULE, SHAPE, **{**kwargs, "generators": make_generators(3, 2)})
    final_level = 1.0 if SAMPLERS[sampler].lands_on_clean else float(SCHEDULE.alphas_cumprod[0])
    tolerance = 4 * (1 - final_level) ** 0.5 + 1e-12
    assert (blended[..., :3] - final_level ** 0.5 * known[..., :3]).abs().max() <= tolerance
    assert not torch.allclose(blended[..., 3:], free[..., 3:])  # the denoiser's 3x3 conv sees the known half


def test_keep_nothing_known_is_the_plain_deterministic_sampler() -> None:
    keep = torch.zeros(SHAPE[0], 1, *SHAPE[2:], dtype=torch.float64)
    known = torch.randn(SHAPE, dtype=torch.float64)
    plain = sample(Denoiser(), SCHEDULE, SHAPE, sampler="ddim", steps=6, x_T=_x_T(), generators=make_generators(0, 2))
    masked = sample(Denoiser(), SCHEDULE, SHAPE, sampler="ddim", steps=6, x_T=_x_T(), generators=make_generators(0, 2),
                    known=(known, keep))
    torch.testing.assert_close(masked, plain, atol=0, rtol=0)
