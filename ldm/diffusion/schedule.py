"""The forward (noising) process of a discrete-time diffusion model and the training targets.

Notation follows Ho et al. 2020 (DDPM, arXiv:2006.11239): beta_t is the noise added at step t,
alpha_t = 1 - beta_t and alpha_bar_t = prod_{s<=t} alpha_s (written `ab` below), with
t = 0 … T-1 (0-based as in the LDM / Stable Diffusion code).
"""
import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
PREDICTION_TYPES = ("eps", "v")
LOSS_TYPES = ("l2", "l1")
# Endpoints (beta_1, beta_T) when none are given: DDPM's for "linear" (Ho et al. 2020, Sec. 4), LDM / Stable
# Diffusion's for "scaled_linear". CompVis calls its sqrt-linear schedule "linear": that is our "scaled_linear".
DEFAULT_ENDPOINTS = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012), "cosine": (None, None)}

log = logging.getLogger(__name__)


class NoiseSchedule(nn.Module):
    """Betas, alpha-bar and the closed forms of q(x_t | x_0) built on them.

    The tables are computed in float64 (a float32 cumulative product over 1000 steps drifts by
    about 1e-6 relative) and stored in float32, the dtype of the models that use them. They are non-persistent
    buffers: they follow the model's device but never enter a checkpoint, since they are a pure
    function of the constructor arguments, which the LightningModule saves as hyperparameters.

    Every method takes the timesteps `t` as an int64 tensor of shape (B,) and broadcasts the
    per-timestep coefficients over the remaining dimensions of the data, in the data's dtype.
    """

    betas: Tensor
    alphas_cumprod: Tensor
    sqrt_alphas_cumprod: Tensor
    sqrt_one_minus_alphas_cumprod: Tensor

    def __init__(
        self,
        num_timesteps: int = 1000,
        beta_schedule: str = "scaled_linear",
        linear_start: float | None = None,
        linear_end: float | None = None,
        cosine_s: float = 8e-3,
        zero_terminal_snr: bool = False,
    ) -> None:
        """`linear_start` / `linear_end` None: the schedule's own endpoints (DEFAULT_ENDPOINTS).
        `zero_terminal_snr` rescales any beta schedule so that alpha_bar_{T-1} = 0 (`rescale_zero_terminal_snr`):
        x_{T-1} is then pure noise, as at sampling time; it needs v-prediction (`check_prediction_type`)."""
        super().__init__()
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be a positive integer, got {num_timesteps}")
        _check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
        default_start, default_end = DEFAULT_ENDPOINTS[beta_schedule]
        self.num_timesteps = num_timesteps
        self.beta_schedule = beta_schedule
        self.linear_start = default_start if linear_start is None else linear_start
        self.linear_end = default_end if linear_end is None else linear_end
        self.cosine_s = cosine_s
        self.zero_terminal_snr = zero_terminal_snr
        if beta_schedule == "linear" and (self.linear_start, self.linear_end) == DEFAULT_ENDPOINTS["scaled_linear"]:
            log.warning("beta_schedule='linear' with the scaled_linear endpoints 0.00085 / 0.012: CompVis configs call "
                        "their sqrt-linear schedule 'linear', which is beta_schedule='scaled_linear' here.")
        betas = make_betas(beta_schedule, num_timesteps, self.linear_start, self.linear_end, cosine_s)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        tables = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
        }
        for name, table in tables.items():
            self.register_buffer(name, table.to(torch.float32), persistent=False)

    def extra_repr(self) -> str:
        return (f"num_timesteps={self.num_timesteps}, beta_schedule={self.beta_schedule!r}, "
                f"zero_terminal_snr={self.zero_terminal_snr}")

    @property
    def terminal_snr(self) -> float:
        """SNR at the last timestep: 0 for a zero-terminal-SNR schedule, 0.0047 for Stable Diffusion's."""
        alpha_bar = float(self.alphas_cumprod[-1])
        return alpha_bar / (1.0 - alpha_bar)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t ~ q(x_t | x_0) = N(sqrt(ab_t) x_0, (1 - ab_t) I)  (DDPM eq. 4), reparameterised."""
        return _at(self.sqrt_alphas_cumprod, t, x0) * x0 + _at(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio ab_t / (1 - ab_t) (Kingma et al. 2021, "Variational Diffusion Models"), shape (B,)."""
        alpha_bar = self.alphas_cumprod[t]
        return alpha_bar / (1.0 - alpha_bar)

    def training_target(self, x0: Tensor, noise: Tensor, t: Tensor, prediction_type: str = "eps") -> Tensor:
        """What the denoiser regresses: eps (DDPM eq. 14) or v = sqrt(ab) eps - sqrt(1-ab) x0
        (Salimans & Ho 2022, "Progressive Distillation", Sec. 4)."""
        _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        if prediction_type == "eps":
            return noise
        return _at(self.sqrt_alphas_cumprod, t, x0) * noise - _at(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0

    def predict_x0(self, x_t: Tensor, t: Tensor, pred: Tensor, prediction_type: str = "eps") -> Tensor:
        """The data estimate implied by a prediction: x0 = (x_t - sqrt(1-ab) eps) / sqrt(ab)
        (DDPM eq. 15), or x0 = sqrt(ab) x_t - sqrt(1-ab) v (Salimans & Ho 2022, App. D)."""
        _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        signal, noise_level = _at(self.sqrt_alphas_cumprod, t, x_t), _at(self.sqrt_one_minus_alphas_cumprod, t, x_t)
        if prediction_type == "eps":
            return (x_t - noise_level * pred) / signal
        return signal * x_t - noise_level * pred

    def predict_eps(self, x_t: Tensor, t: Tensor, pred: Tensor, prediction_type: str = "eps") -> Tensor:
        """The noise estimate implied by a prediction: eps itself, or eps = sqrt(ab) v + sqrt(1-ab) x_t."""
        _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        if prediction_type == "eps":
            return pred
        return _at(self.sqrt_alphas_cumprod, t, x_t) * pred + _at(self.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t

    def loss_weights(self, t: Tensor, prediction_type: str = "eps", min_snr_gamma: float | None = None) -> Tensor:
        """Per-sample loss weights, shape (B,).

        None gives uniform weights (the "simple" loss, DDPM eq. 14). A gamma gives min-SNR-gamma
        weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting"): the
        x0-space weight min(SNR, gamma) expressed in the parameterisation's own loss, i.e.
        min(SNR, gamma) / SNR for eps and min(SNR, gamma) / (SNR + 1) for v. Written as
        min(1, gamma / SNR) for eps, these stay finite at SNR = 0 (zero-terminal-SNR schedules): 1 for eps
        (its limit), 0 for v (an x0 error at SNR = 0 carries weight min(0, gamma) = 0).
        """
        _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        if min_snr_gamma is None:
            return torch.ones(t.shape, device=self.alphas_cumprod.device, dtype=self.alphas_cumprod.dtype)
        if min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be positive (e.g. 5.0) or None, got {min_snr_gamma}")
        snr = self.snr(t)
        if prediction_type == "eps":
            return (min_snr_gamma / snr).clamp(max=1.0)  # SNR = 0: gamma / 0 = inf, clamped to the limit 1
        return snr.clamp(max=min_snr_gamma) / (snr + 1.0)


def check_prediction_type(schedule: NoiseSchedule, prediction_type: str) -> None:
    """Refuse eps-prediction on a zero-terminal-SNR schedule: at SNR = 0 the noise is the whole input, so
    x0 = (x_t - sqrt(1-ab) eps) / sqrt(ab) divides by zero (Lin et al. 2024, Sec. 3.2); v stays defined."""
    _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if prediction_type == "eps" and float(schedule.alphas_cumprod[-1]) == 0.0:
        raise ValueError(
            "prediction_type=eps is undefined on a zero-terminal-SNR schedule (alpha_bar_T = 0: the x0 estimate "
            "divides by sqrt(alpha_bar) = 0). Use prediction_type=v (model.prediction_type=v), or "
            "schedule.zero_terminal_snr=false."
        )


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1: shift
    sqrt(ab) so that its last value is 0 and scale it so that its first value is unchanged, then recover the
    betas (beta_0 = 1 - ab_0, beta_t = 1 - ab_t / ab_{t-1}). Float64 in, float64 out."""
    sqrt_ab = torch.cumprod(1.0 - betas.double(), dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    alpha_bar = sqrt_ab**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1.0 - alphas


def make_betas(
    beta_schedule: str, num_timesteps: int, linear_start: float | None, linear_end: float | None,
    cosine_s: float = 8e-3,
) -> Tensor:
    """The beta_t table in float64.

    - "linear": beta linear in t (DDPM Sec. 4, 1e-4 … 0.02 there);
    - "scaled_linear": sqrt(beta) linear in t (the LDM / Stable Diffusion schedule);
    - "cosine": Nichol & Dhariwal 2021 eq. 17, ab(t) = f(t) / f(0) with
      f(t) = cos((t/T + s) / (1 + s) * pi/2)^2, beta_t = 1 - ab(t+1)/ab(t) clipped at 0.999.
    """
    _check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
    if beta_schedule != "cosine" and (linear_start is None or linear_end is None):
        raise ValueError(f"beta_schedule={beta_schedule!r} needs linear_start and linear_end (DEFAULT_ENDPOINTS).")
    if beta_schedule == "linear":
        return torch.linspace(linear_start, linear_end, num_timesteps, dtype=torch.float64)
    if beta_schedule == "scaled_linear":
        return torch.linspace(math.sqrt(linear_start), math.sqrt(linear_end), num_timesteps, dtype=torch.float64) ** 2
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((steps + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
    return (1.0 - f[1:] / f[:-1]).clamp(max=0.999)


def diffusion_loss(pred: Tensor, target: Tensor, weights: Tensor | None = None, loss_type: str = "l2") -> Tensor:
    """Per-sample regression loss, shape (B,): the squared (or absolute) error averaged over all
    non-batch dimensions, times the optional per-sample weights (see `NoiseSchedule.loss_weights`)."""
    _check_choice("loss_type", loss_type, LOSS_TYPES)
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} does not match target shape {tuple(target.shape)}")
    error = F.mse_loss(pred, target, reduction="none") if loss_type == "l2" else (pred - target).abs()
    per_sample = error.flatten(1).mean(dim=1)
    return per_sample if weights is None else per_sample * weights.to(per_sample.dtype)


def _at(table: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """table[t] shaped (B, 1, …, 1) to broadcast against `like`, in `like`'s dtype."""
    return table[t].to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def _check_choice(what: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid values are: {', '.join(valid)}")
