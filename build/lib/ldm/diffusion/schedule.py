"""The forward (noising) process of a discrete-time diffusion model and the training targets.

Notation follows Ho et al. 2020 (DDPM, arXiv:2006.11239): beta_t is the noise added at step t,
alpha_t = 1 - beta_t and alpha_bar_t = prod_{s<=t} alpha_s (written `ab` below), with
t = 0 … T-1 (0-based as in the LDM / Stable Diffusion code).
"""
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
PREDICTION_TYPES = ("eps", "v")
LOSS_TYPES = ("l2", "l1")


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
        linear_start: float = 0.00085,
        linear_end: float = 0.012,
        cosine_s: float = 8e-3,
    ) -> None:
        super().__init__()
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be a positive integer, got {num_timesteps}")
        self.num_timesteps = num_timesteps
        self.beta_schedule = beta_schedule
        betas = make_betas(beta_schedule, num_timesteps, linear_start, linear_end, cosine_s)
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
        return f"num_timesteps={self.num_timesteps}, beta_schedule={self.beta_schedule!r}"

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
        min(SNR, gamma) / SNR for eps and min(SNR, gamma) / (SNR + 1) for v.
        """
        _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        if min_snr_gamma is None:
            return torch.ones(t.shape, device=self.alphas_cumprod.device, dtype=self.alphas_cumprod.dtype)
        if min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be positive (e.g. 5.0) or None, got {min_snr_gamma}")
        snr = self.snr(t)
        clipped = snr.clamp(max=min_snr_gamma)
        return clipped / snr if prediction_type == "eps" else clipped / (snr + 1.0)


def make_betas(
    beta_schedule: str, num_timesteps: int, linear_start: float, linear_end: float, cosine_s: float = 8e-3
) -> Tensor:
    """The beta_t table in float64.

    - "linear": beta linear in t (DDPM Sec. 4, 1e-4 … 0.02 there);
    - "scaled_linear": sqrt(beta) linear in t (the LDM / Stable Diffusion schedule);
    - "cosine": Nichol & Dhariwal 2021 eq. 17, ab(t) = f(t) / f(0) with
      f(t) = cos((t/T + s) / (1 + s) * pi/2)^2, beta_t = 1 - ab(t+1)/ab(t) clipped at 0.999.
    """
    _check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
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
