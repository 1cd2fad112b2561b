"""Does a model follow its caption, and could its schedule let it cheat? Two diagnostics of any checkpoint.

1. Caption sensitivity: the denoising loss with a counterfactual caption minus the loss with the true one,
   per timestep quartile, on the same images, timesteps and noise (a paired difference, so a few hundred
   images resolve it). On `shapes` each attribute is swapped in turn (colour, shape, position, via the
   caption grammar of ldm.data.shapes); on any captioned data the captions are also shuffled among the
   images. A gap of ~0 means the model does not use that part of the caption at those noise levels.
   Gaps are given in x0 space (E||x0_hat(c') - z0||^2 - E||x0_hat(c) - z0||^2, latent units: comparable
   between eps- and v-models) and in the model's own training loss.
2. Signal leak: how much of x0's coarse layout (its G x G average-pooled latent) the best linear estimate
   recovers from z_t alone, without any caption, at the largest timestep the sampler starts from. A
   schedule whose terminal SNR is not zero leaks layout into z_T during training: the model learns to put
   the object where the noise hints, which at sampling time (pure noise) is nowhere in particular. For
   z_t = a z0 + s eps, with Sigma the covariance of z0 and P the pooling, the linear MMSE estimate of P z0
   explains R^2 = tr(P Sigma (Sigma + (s/a)^2 I)^-1 Sigma P^T) / tr(P Sigma P^T) of its variance: closed
   form from the empirical Sigma (eigenvectors via an SVD of the centred latents), no regression on noise.
"""
from __future__ import annotations

import math
from typing import Any, Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ldm.data.shapes import ATTRIBUTES, parse_caption_objects, swap_attribute
from ldm.diffusion.samplers import SAMPLERS, spaced_timesteps
from ldm.diffusion.settings import SamplerSettings
from ldm.evaluation.image_sources import ImageSource
from ldm.utils.images import images_to_uint8

NUM_QUARTILES = 4
LAYOUT_GRID = 4  # the coarse layout: a 4 x 4 average pool of the latent
SIGNAL_LEAK_THRESHOLD = 0.01  # R^2 above this at the first sampled t: the schedule leaks layout


@torch.no_grad()
def caption_diagnostics(model: Any, reference: ImageSource, settings: SamplerSettings = SamplerSettings(),
                        num_samples: int = 256, batch_size: int = 32, seed: int = 0) -> dict[str, Any]:
    """Both diagnostics of a LatentDiffusion on `num_samples` reference images (and their captions)."""
    latents, captions = reference_latents(model, reference, num_samples, batch_size)
    result: dict[str, Any] = {"num_samples": len(latents),
                              "signal_leak": signal_leak(model.schedule, latents, settings)}
    if model.conditioner.batch_key == "caption" and any(captions):
        result["caption_sensitivity"] = caption_sensitivity(model, latents, captions, batch_size, seed)
    else:
        result["caption_sensitivity"] = None  # class or unconditional models, or images without captions
    return result


def reference_latents(model: Any, reference: ImageSource, num_samples: int,
                      batch_size: int) -> tuple[Tensor, list[str]]:
    """Scaled posterior means z0 of the reference images (at the model's resolution) and their captions."""
    chunks = []
    for images in reference.batches(batch_size, model.hparams.image_size, num_samples):
        x = images.to(model.device, torch.float32) / 127.5 - 1.0
        chunks.append(model.first_stage.encode(x).mode() * model.scale_factor)
    if not chunks:
        raise ValueError("the diagnostics need reference images: the data's val split (or real_dir) is empty.")
    latents = torch.cat(chunks)[:num_samples]
    captions = list(reference.captions(num_samples))[: len(latents)]
    return latents, captions + [""] * (len(latents) - len(captions))


@torch.no_grad()
def reconstruction_fidelity(model: Any, reference: ImageSource, extractor: Any, num_samples: int = 256,
                            batch_size: int = 32) -> dict[str, float | None]:
    """Prompt fidelity of the first stage's reconstructions D(E(x)) of the captioned reference images, as
    `prompt_fidelity_reconstruction_*`: the ceiling stage 1 sets on what any sample decoded from its latents can
    show. Measured on `shapes`: a 500-step quickstart autoencoder gets the colour of half the reconstructions
    wrong (0.49), the 1000-step one 1.00 (shape 0.99), while the judge scores the real images 1.00. Empty where
    the extractor judges no prompts or the images have no captions."""
    latents, captions = reference_latents(model, reference, num_samples, batch_size)
    if not any(captions):
        return {}
    features = []
    for chunk in latents.split(batch_size):
        decoded = model.first_stage.decode(chunk / model.scale_factor).clamp(-1, 1)
        features.append(extractor(images_to_uint8(decoded)).cpu())
    fidelity = extractor.prompt_fidelity(torch.cat(features), captions)
    if not fidelity:
        return {}
    return {key.replace("prompt_fidelity", "prompt_fidelity_reconstruction"): value for key, value in fidelity.items()}


# ------------------------------------------------------------------------------------ caption sensitivity
def counterfactual_captions(captions: list[str], rng: np.random.Generator) -> dict[str, list[str]]:
    """"shuffled" (a derangement: no caption keeps its image) and, when every caption is a shapes caption,
    one list per swapped attribute."""
    order = rng.permutation(len(captions))
    shuffled = [""] * len(captions)
    for i, j in zip(order, np.roll(order, -1)):
        shuffled[i] = captions[j]
    variants = {"shuffled": shuffled}
    try:
        for caption in captions:
            parse_caption_objects(caption)
    except ValueError:
        return variants
    for attribute in ATTRIBUTES:
        variants[attribute] = [swap_attribute(caption, attribute, rng) for caption in captions]
    return variants


def caption_sensitivity(model: Any, latents: Tensor, captions: list[str], batch_size: int = 32,
                        seed: int = 0) -> dict[str, Any]:
    """Mean (counterfactual - true) error per variant and timestep quartile, t uniform within each quartile."""
    rng = np.random.default_rng(seed)
    variants = counterfactual_captions(captions, rng)
    generator = torch.Generator().manual_seed(seed)
    T, n = model.schedule.num_timesteps, len(latents)
    edges = [q * T // NUM_QUARTILES for q in range(NUM_QUARTILES + 1)]
    sums = {name: {kind: torch.zeros(NUM_QUARTILES, dtype=torch.float64) for kind in ("x0", "loss")}
            for name in ("true", *variants)}
    for q in range(NUM_QUARTILES):
        t_all = torch.randint(edges[q], edges[q + 1], (n,), generator=generator)
        noise_all = torch.randn(latents.shape, generator=generator)
        for start in range(0, n, batch_size):
            z0 = latents[start:start + batch_size]
            t = t_all[start:start + batch_size].to(model.device)
            noise = noise_all[start:start + batch_size].to(model.device, z0.dtype)
            z_t = model.schedule.q_sample(z0, t, noise)
            for name, texts in (("true", captions), *variants.items()):
                x0_error, loss = _errors(model, z0, z_t, t, noise, texts[start:start + batch_size])
                sums[name]["x0"][q] += x0_error.sum().double().cpu()
                sums[name]["loss"][q] += loss.sum().double().cpu()
    means = {name: {kind: (values / n).tolist() for kind, values in parts.items()} for name, parts in sums.items()}
    return {
        "quartiles": [[edges[q], edges[q + 1] - 1] for q in range(NUM_QUARTILES)],
        "x0_mse_true": means["true"]["x0"],
        "loss_true": means["true"]["loss"],
        "x0_gap": {name: _gap(means[name]["x0"], means["true"]["x0"]) for name in variants},
        "loss_gap": {name: _gap(means[name]["loss"], means["true"]["loss"]) for name in variants},
    }


def _errors(model: Any, z0: Tensor, z_t: Tensor, t: Tensor, noise: Tensor,
            texts: list[str]) -> tuple[Tensor, Tensor]:
    """Per-sample x0-space MSE and training loss (the model's objective, without its weights' SNR terms)."""
    prediction = model.unet(z_t, t, **model.conditioner(texts))
    x0_hat = model.schedule.predict_x0(z_t, t, prediction, model.hparams.prediction_type)
    target = model.schedule.training_target(z0, noise, t, model.hparams.prediction_type)
    x0_error = (x0_hat - z0).pow(2).flatten(1).mean(1)
    return x0_error, (prediction - target).pow(2).flatten(1).mean(1)


def _gap(values: list[float], reference: list[float]) -> list[float]:
    return [value - ref for value, ref in zip(values, reference)]


# ------------------------------------------------------------------------------------ signal leak
def first_sampled_timestep(num_timesteps: int, settings: SamplerSettings) -> int:
    """The timestep the sampler's first denoiser call sees (where its x_T is taken as pure noise)."""
    skip_zero = SAMPLERS[settings.sampler].skips_zero_timestep
    return spaced_timesteps(num_timesteps, settings.steps, settings.timestep_spacing, settings.steps_offset,
                            skip_zero=skip_zero)[0]


def layout_r2(latents: Tensor, alpha_bar: float, grid: int = LAYOUT_GRID) -> float:
    """R^2 of the linear MMSE estimate of the grid x grid pooled z0 from z_t = sqrt(ab) z0 + sqrt(1-ab) eps
    (module docstring), with the covariance of z0 estimated from `latents` (N, C, H, W)."""
    if alpha_bar <= 0.0:
        return 0.0
    z = latents.double().cpu()
    centred = (z - z.mean(0, keepdim=True)).flatten(1)
    _, singular, vectors = torch.linalg.svd(centred, full_matrices=False)  # Sigma = V diag(S^2/(N-1)) V^T
    eigenvalues = singular**2 / max(len(z) - 1, 1)
    pooled_vectors = F.adaptive_avg_pool2d(vectors.reshape(-1, *z.shape[1:]), grid).flatten(1)
    pooled_norms = pooled_vectors.pow(2).sum(1)  # ||P v_i||^2
    noise_ratio = (1.0 - alpha_bar) / alpha_bar  # (s / a)^2
    explained = (eigenvalues**2 / (eigenvalues + noise_ratio) * pooled_norms).sum()
    total = (eigenvalues * pooled_norms).sum()
    return float(explained / total) if total > 0 else 0.0


def signal_leak(schedule: Any, latents: Tensor, settings: SamplerSettings) -> dict[str, Any]:
    """Layout R^2 at the first sampled timestep and at T-1, with the SNR there and the verdict."""
    T = schedule.num_timesteps
    first = first_sampled_timestep(T, settings)
    alpha_bars = schedule.alphas_cumprod.double().cpu()
    r2 = {t: layout_r2(latents, float(alpha_bars[t])) for t in (first, T - 1)}
    snr = float(alpha_bars[first] / (1.0 - alpha_bars[first]))
    return {"t": first, "snr": snr, "r2": r2[first], "r2_t_max": r2[T - 1], "grid": LAYOUT_GRID,
            "threshold": SIGNAL_LEAK_THRESHOLD, "leaks": r2[first] > SIGNAL_LEAK_THRESHOLD}


# ------------------------------------------------------------------------------------ reports
def diagnostics_rows(diagnostics: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(name, value) rows of metrics.md: the leak, then each gap per quartile (x0 space)."""
    leak = diagnostics["signal_leak"]
    yield f"signal leak R² (layout {leak['grid']}x{leak['grid']}) at t={leak['t']}", _fmt(leak["r2"])
    yield "signal leak R² at t=T-1", _fmt(leak["r2_t_max"])
    yield f"leaks (R² > {leak['threshold']})", str(leak["leaks"])
    sensitivity = diagnostics.get("caption_sensitivity")
    if not sensitivity:
        return
    for name, gaps in sensitivity["x0_gap"].items():
        quartiles = " / ".join(_fmt(g) for g in gaps)
        yield f"caption gap {name} (x0 MSE, t quartiles 1-4)", quartiles
    yield "x0 MSE, true caption (t quartiles 1-4)", " / ".join(_fmt(v) for v in sensitivity["x0_mse_true"])


def _fmt(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4g}"
