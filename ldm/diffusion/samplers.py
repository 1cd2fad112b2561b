"""Reverse-process samplers (DDPM, DDIM, DPM-Solver++ 2M) with classifier-free guidance.

One driver, `sample`, owns everything the samplers share: the timestep grid, the initial latent
(pure noise, or a noised init latent for image-to-image), guidance and per-sample noise. A sampler
is then only its update rule, x_{t_i} -> x_{t_{i+1}}, given the denoiser's x0 and eps estimates.

Defaults follow diffusers' Stable Diffusion configuration so that outputs can be compared with
it one to one: "leading" spacing with steps_offset=1, no clipping of the x0 estimate (latents are
not in [-1, 1]), DDIM's last step going to alpha_bar_0 (set_alpha_to_one=False), DDPM's
"fixed_small" posterior variance, DPM-Solver++ ending at sigma = 0.
"""
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ldm.diffusion.schedule import NoiseSchedule, check_prediction_type

ModelFn = Callable[[Tensor, Tensor, dict[str, Tensor]], Tensor]
StepCallback = Callable[[int, int, Tensor], None]
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@torch.no_grad()
def sample(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    *,
    sampler: str = "ddim",
    steps: int = 50,
    eta: float = 0.0,
    cond: dict[str, Tensor] | None = None,
    uncond: dict[str, Tensor] | None = None,
    cfg_scale: float = 1.0,
    guidance_rescale: float = 0.0,
    prediction_type: str = "eps",
    generators: list[torch.Generator] | None = None,
    x_T: Tensor | None = None,
    init_latent: Tensor | None = None,
    strength: float = 1.0,
    timestep_spacing: str = "leading",
    steps_offset: int = 1,
    progress: bool = False,
    callback: StepCallback | None = None,
    device: torch.device | str | None = None,
    known: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Draw z_0 of the given `shape` (B, C, H, W) with `steps` denoiser calls (no autograd).

    model_fn(x_t, t, cond) returns the `prediction_type` ("eps" or "v") output for x_t at the
    int64 timesteps t (B,). With `uncond` and `cfg_scale` != 1 each step makes ONE batched call on
    [uncond; cond] and guides (see `guided_denoiser`); otherwise `uncond` is not evaluated.
    `generators` (one per sample, see `make_generators`) drive every random draw, so sample i
    does not depend on the batch it is drawn in. `x_T` replaces the initial noise. `init_latent`
    with `strength` in (0, 1] runs image-to-image (SDEdit, Meng et al. 2022): the last
    int(steps * strength) steps of the grid, from q_sample(init_latent) at the first of them.
    `eta` is DDIM's stochasticity (0: deterministic, 1: DDPM-like). `timestep_spacing` and
    `steps_offset` place the grid (see `spaced_timesteps`; offset 1 is Stable Diffusion's).
    `guidance_rescale` in [0, 1] rescales the guided output towards the conditional one's std (Lin et al.
    2024, Sec. 3.4; see `guided_denoiser`). `callback(i, t, x)` sees the latent after each step i, taken at t.
    `known` = (z0_known (B, C, H, W), keep (B, 1, H, W)) holds x where keep is 1 to the known latent, noised
    to each step's level (inpainting; see `impose_known`).
    """
    solver_cls = _lookup_sampler(sampler)
    check_prediction_type(schedule, prediction_type)
    if eta != 0.0 and solver_cls is not DDIMSolver:
        raise ValueError(f"eta only applies to the 'ddim' sampler, got eta={eta} with sampler {sampler!r}")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like), got {eta}")
    cond = {} if cond is None else cond
    batch_size = shape[0]
    if generators is not None and len(generators) != batch_size:
        raise ValueError(f"need one generator per sample: got {len(generators)} for a batch of {batch_size}")
    device = torch.device(device) if device is not None else schedule.alphas_cumprod.device
    timesteps = spaced_timesteps(
        schedule.num_timesteps, steps, timestep_spacing, steps_offset, skip_zero=solver_cls.skips_zero_timestep
    )
    first_step = _first_step(steps, strength, init_latent)
    x = _initial_latent(schedule, shape, timesteps[first_step], x_T, init_latent, generators, device)
    _check_batch("cond", cond, batch_size)
    _check_batch("uncond", uncond or {}, batch_size)
    denoise = guided_denoiser(model_fn, cond, uncond, cfg_scale, guidance_rescale)
    solver = solver_cls(_alpha_bar_levels(schedule, timesteps, solver_cls.lands_on_clean, x.dtype), eta)

    def draw_noise() -> Tensor:
        return randn_per_sample(x.shape, generators, device, x.dtype)

    for i in tqdm(range(first_step, steps), disable=not progress, desc=f"{sampler} sampling"):
        t = torch.full((batch_size,), timesteps[i], device=device, dtype=torch.long)
        prediction = denoise(x, t)
        x0 = schedule.predict_x0(x, t, prediction, prediction_type)
        eps = schedule.predict_eps(x, t, prediction, prediction_type)
        x = solver.step(i, x, x0, eps, draw_noise)
        if known is not None:
            x = impose_known(x, *known, solver.alpha_bars[i + 1], draw_noise)
        if callback is not None:
            callback(i, timesteps[i], x)
    return x


def impose_known(x: Tensor, known_latent: Tensor, keep: Tensor, alpha_bar: Tensor,
                 draw_noise: Callable[[], Tensor]) -> Tensor:
    """Where `keep` is 1, replace x (now at level alpha_bar) by a draw of q(x | z0_known) = N(sqrt(alpha_bar)
    z0_known, (1 - alpha_bar) I) (Ho et al. 2020, eq. 4); elsewhere keep the sampler's x. This is blended latent
    diffusion (Avrahami et al. 2023) and the CompVis DDIM sampler's `mask` / `x0`: the known region ends at its
    clean latent exactly, so it decodes at the autoencoder's reconstruction quality whatever the model learnt,
    and the generated region is denoised next to it at every step."""
    noised = alpha_bar.sqrt() * known_latent + (1.0 - alpha_bar).sqrt() * draw_noise()
    return keep * noised + (1.0 - keep) * x


def guided_denoiser(
    model_fn: ModelFn, cond: dict[str, Tensor], uncond: dict[str, Tensor] | None, cfg_scale: float,
    guidance_rescale: float = 0.0,
) -> Callable[[Tensor, Tensor], Tensor]:
    """The denoiser with classifier-free guidance (Ho & Salimans 2022, eq. 6 with s = 1 + w):
    out = out_u + s (out_c - out_u), in the model's own parameterisation (eps or v, as diffusers).
    `guidance_rescale` phi mixes in the guided output rescaled to the conditional output's per-sample std
    (Lin et al. 2024, Sec. 3.4, Eqs. 15-16): out = phi * out * std(out_c) / std(out) + (1 - phi) * out.

    Both halves go through ONE forward pass on the batch [uncond; cond]; cfg_scale == 1 or no
    `uncond` needs no unconditional half and calls the model on the conditional batch only.
    """
    if not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"guidance_rescale must be in [0, 1] (Lin et al. use 0.7), got {guidance_rescale}")
    if uncond is None or cfg_scale == 1.0:
        return lambda x, t: model_fn(x, t, cond)
    if set(uncond) != set(cond):
        raise ValueError(
            f"cond and uncond must have the same keys for guidance, got {sorted(cond)} and {sorted(uncond)}"
        )
    both = {key: torch.cat([uncond[key], cond[key]]) for key in cond}

    def denoise(x: Tensor, t: Tensor) -> Tensor:
        out_uncond, out_cond = model_fn(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        guided = out_uncond + cfg_scale * (out_cond - out_uncond)
        return rescale_guidance(guided, out_cond, guidance_rescale) if guidance_rescale > 0 else guided

    return denoise


def rescale_guidance(guided: Tensor, conditional: Tensor, guidance_rescale: float) -> Tensor:
    """Lin et al. 2024, Sec. 3.4: phi * guided * std(conditional) / std(guided) + (1 - phi) * guided, the std
    taken per sample over all other dimensions. Undoes the over-exposure strong guidance causes."""
    dims = list(range(1, guided.ndim))
    rescaled = guided * (conditional.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return guidance_rescale * rescaled + (1.0 - guidance_rescale) * guided


def make_generators(seed: int, n: int, offset: int = 0, device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per sample, generator i seeded with seed + offset + i.

    CPU generators (the default) give the same noise whatever device the model runs on.
    """
    return [torch.Generator(device=device).manual_seed(seed + offset + i) for i in range(n)]


def randn_per_sample(
    shape: tuple[int, ...] | torch.Size,
    generators: list[torch.Generator] | None,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standard normal noise of `shape`, row i drawn from generators[i] (on the generator's
    device, then moved), so a row depends only on its own generator. None: the global RNG."""
    if generators is None:
        return torch.randn(shape, device=device, dtype=dtype)
    if len(generators) != shape[0]:
        raise ValueError(f"need one generator per sample: got {len(generators)} generators for a batch of {shape[0]}")
    rows = [torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generators]
    return torch.cat(rows).to(device)


def spaced_timesteps(
    num_timesteps: int, steps: int, spacing: str = "leading", steps_offset: int = 0, *, skip_zero: bool = False
) -> list[int]:
    """The descending timesteps at which the denoiser is evaluated, placed as diffusers does
    (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Table 2):

    - "leading": k * (T // n) + steps_offset, k = 0 … n-1 (steps_offset only applies here);
    - "trailing": round(T - k * T / n) - 1, k = 0 … n-1 (always starts at T - 1);
    - "linspace": round(linspace(0, T - 1, n)).

    n = steps, or steps + 1 with `skip_zero`, dropping the least noisy point (not for "trailing"):
    DPM-Solver's convention, whose last step goes to sigma = 0 instead of evaluating there.
    steps = num_timesteps is the full chain T-1 ... 0 (e.g. ancestral DDPM with 1000 steps) for every spacing.
    """
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"unknown timestep_spacing {spacing!r}; valid values are: {', '.join(TIMESTEP_SPACINGS)}")
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be between 1 and num_timesteps={num_timesteps}, got {steps}")
    if steps == num_timesteps:  # the full chain T-1 ... 0, whatever the spacing (leading + offset would pass T - 1)
        return list(range(num_timesteps - 1, -1, -1))
    n = steps + 1 if skip_zero and spacing != "trailing" else steps
    if spacing == "leading":
        grid = np.arange(n)[::-1] * (num_timesteps // n)
    elif spacing == "trailing":
        grid = np.round(num_timesteps - np.arange(n) * (num_timesteps / n)) - 1
    else:
        grid = np.round(np.linspace(0, num_timesteps - 1, n))[::-1]
    grid = grid[:steps].astype(np.int64) + (steps_offset if spacing == "leading" else 0)
    timesteps = [int(t) for t in grid]
    if timesteps[0] >= num_timesteps or timesteps[-1] < 0 or len(set(timesteps)) != steps:
        raise ValueError(
            f"{steps} {spacing!r} steps with steps_offset={steps_offset} give timesteps "
            f"{timesteps[0]}…{timesteps[-1]}, outside 0…{num_timesteps - 1} or repeated: "
            "use fewer steps, steps_offset=0, or timestep_spacing='trailing'"
        )
    return timesteps


class Solver:
    """The update rule from grid level i to level i + 1.

    `alpha_bars` holds alpha_bar at the grid's timesteps followed by the level the last step goes
    to. Class attributes say where that is (`lands_on_clean`: alpha_bar = 1, else alpha_bar_0)
    and whether the grid skips t = 0 (`skips_zero_timestep`, see `spaced_timesteps`).
    """

    lands_on_clean: bool = True
    skips_zero_timestep: bool = False

    def __init__(self, alpha_bars: Tensor, eta: float = 0.0) -> None:
        self.alpha_bars = alpha_bars
        self.eta = eta
        self.last_step = len(alpha_bars) - 2

    def step(self, i: int, x: Tensor, x0: Tensor, eps: Tensor, draw_noise: Callable[[], Tensor]) -> Tensor:
        raise NotImplementedError


class DDPMSolver(Solver):
    """Ancestral sampling from the posterior q(x_prev | x_t, x0_hat) (Ho et al. 2020, eqs. 6-7)
    with the "fixed_small" variance beta_tilde, on any subsequence of timesteps: beta is then
    1 - alpha_bar_t / alpha_bar_prev (as diffusers' DDPMScheduler with fewer inference steps)."""

    def step(self, i: int, x: Tensor, x0: Tensor, eps: Tensor, draw_noise: Callable[[], Tensor]) -> Tensor:
        alpha_bar, alpha_bar_prev = self.alpha_bars[i], self.alpha_bars[i + 1]
        beta = 1.0 - alpha_bar / alpha_bar_prev
        x0_coef = alpha_bar_prev.sqrt() * beta / (1.0 - alpha_bar)
        x_coef = (1.0 - beta).sqrt() * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
        mean = x0_coef * x0 + x_coef * x
        if i == self.last_step:  # the posterior at alpha_bar_prev = 1 has zero variance
            return mean
        variance = (1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * beta
        return mean + variance.sqrt() * draw_noise()


class DDIMSolver(Solver):
    """DDIM (Song et al. 2021, eq. 12) with sigma_t = eta * sqrt((1 - ab_prev) / (1 - ab_t))
    * sqrt(1 - ab_t / ab_prev) (eq. 16). The last step goes to alpha_bar_0, not 1, as Stable
    Diffusion's scheduler (set_alpha_to_one=False) and the CompVis DDIM sampler.

    Each step goes to the next timestep of the grid. diffusers' DDIMScheduler goes to
    t - T // steps instead: the same for "leading", and for "trailing" when steps divides T, but
    off the grid for "linspace", where we do not follow it."""

    lands_on_clean = False

    def step(self, i: int, x: Tensor, x0: Tensor, eps: Tensor, draw_noise: Callable[[], Tensor]) -> Tensor:
        alpha_bar, alpha_bar_prev = self.alpha_bars[i], self.alpha_bars[i + 1]
        if self.eta == 0.0:
            return alpha_bar_prev.sqrt() * x0 + (1.0 - alpha_bar_prev).sqrt() * eps
        sigma = self.eta * ((1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * (1.0 - alpha_bar / alpha_bar_prev)).sqrt()
        direction = (1.0 - alpha_bar_prev - sigma**2).sqrt() * eps
        return alpha_bar_prev.sqrt() * x0 + direction + sigma * draw_noise()


class DPMSolverPP2M(Solver):
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095, Algorithm 2, midpoint form): a
    multistep second-order solver of the diffusion ODE in data prediction, x_t = (sigma_t /
    sigma_s) x_s - alpha_t (e^{-h} - 1) D with h = lambda_t - lambda_s, lambda = log(alpha /
    sigma), D = x0_s + (x0_s - x0_prev) / (2 r), r = h_prev / h.

    As diffusers' defaults: first order (D = x0_s) at the first step, which has no history, and
    the last step goes to sigma = 0, where the first-order update is exactly x0_s.
    """

    skips_zero_timestep = True

    def __init__(self, alpha_bars: Tensor, eta: float = 0.0) -> None:
        super().__init__(alpha_bars, eta)
        noisy = alpha_bars[:-1]
        self.alpha, self.sigma = noisy.sqrt(), (1.0 - noisy).sqrt()
        self.log_snr_half = self.alpha.log() - self.sigma.log()
        self.previous: tuple[Tensor, Tensor] | None = None  # (x0 estimate, lambda) of the last step

    def step(self, i: int, x: Tensor, x0: Tensor, eps: Tensor, draw_noise: Callable[[], Tensor]) -> Tensor:
        if i == self.last_step:
            self.previous = None
            return x0
        lambda_s, lambda_t = self.log_snr_half[i], self.log_snr_half[i + 1]
        h = lambda_t - lambda_s
        data_term = x0
        if self.previous is not None:
            x0_prev, lambda_prev = self.previous
            ratio = (lambda_s - lambda_prev) / h
            data_term = x0 + (x0 - x0_prev) / (2.0 * ratio)
        self.previous = (x0, lambda_s)
        return (self.sigma[i + 1] / self.sigma[i]) * x - self.alpha[i + 1] * torch.expm1(-h) * data_term


SAMPLERS: dict[str, type[Solver]] = {"ddpm": DDPMSolver, "ddim": DDIMSolver, "dpmpp_2m": DPMSolverPP2M}


def _lookup_sampler(name: str) -> type[Solver]:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid samplers are: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def _first_step(steps: int, strength: float, init_latent: Tensor | None) -> int:
    """Index of the first grid step to run: 0, or steps - int(steps * strength) for img2img."""
    if init_latent is None:
        if strength != 1.0:
            raise ValueError(f"strength={strength} needs an init_latent (image-to-image); leave it at 1.0 otherwise")
        return 0
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1] (the fraction of the steps to run), got {strength}")
    denoising_steps = int(steps * strength)
    if denoising_steps < 1:
        raise ValueError(f"strength={strength} with steps={steps} runs no step: raise strength or steps")
    return steps - denoising_steps


def _initial_latent(
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    t_start: int,
    x_T: Tensor | None,
    init_latent: Tensor | None,
    generators: list[torch.Generator] | None,
    device: torch.device,
) -> Tensor:
    """x_T (given or drawn) or, for img2img, q_sample(init_latent, t_start) with per-sample noise."""
    if x_T is not None and init_latent is not None:
        raise ValueError("pass either x_T (the initial noise) or init_latent (image-to-image), not both")
    given = x_T if x_T is not None else init_latent
    if given is not None and tuple(given.shape) != tuple(shape):
        name = "x_T" if x_T is not None else "init_latent"
        raise ValueError(f"{name} has shape {tuple(given.shape)}, expected {tuple(shape)}")
    if x_T is not None:
        return x_T.to(device)
    dtype = init_latent.dtype if init_latent is not None else torch.float32
    noise = randn_per_sample(shape, generators, device, dtype)
    if init_latent is None:
        return noise
    t = torch.full((shape[0],), t_start, device=device, dtype=torch.long)
    return schedule.q_sample(init_latent.to(device), t, noise)


def _alpha_bar_levels(
    schedule: NoiseSchedule, timesteps: list[int], lands_on_clean: bool, dtype: torch.dtype
) -> Tensor:
    """alpha_bar at the grid timesteps, then at the level the last step goes to."""
    table = schedule.alphas_cumprod
    final = torch.ones_like(table[:1]) if lands_on_clean else table[:1]
    grid = table[torch.tensor(timesteps, device=table.device)]
    return torch.cat([grid, final]).to(dtype)


def _check_batch(name: str, tensors: dict[str, Tensor], batch_size: int) -> None:
    for key, value in tensors.items():
        if value.shape[0] != batch_size:
            raise ValueError(f"{name}[{key!r}] has batch size {value.shape[0]}, expected {batch_size}")
