"""Fréchet distance between Gaussians fitted to features: FID (Heusel et al. 2017) and its variants
(FID_CLIP, FD_DINOv2) differ only in the extractor that produced the features.

Matches the convention of pytorch-fid and clean-fid: float64 statistics, unbiased covariance,
`scipy.linalg.sqrtm` of Σ1·Σ2 with an ε·I retry when that product is singular, and tiny imaginary
parts (numerical noise of sqrtm) dropped only after checking they really are tiny.
"""
from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg
import torch

ArrayLike = np.ndarray | torch.Tensor

# pytorch-fid / clean-fid defaults: the ε added to both diagonals when Σ1·Σ2 is singular, and the
# largest imaginary part of diag(sqrtm) accepted as numerical noise.
SINGULAR_OFFSET = 1e-6
IMAGINARY_TOLERANCE = 1e-3


def feature_statistics(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (ddof=1) of (N, D) features, in float64 as pytorch-fid / clean-fid."""
    array = _as_float64(features)
    if array.ndim != 2 or array.shape[0] < 2:
        raise ValueError(
            f"feature_statistics needs (N, D) features with N >= 2 to estimate a covariance, got shape "
            f"{tuple(array.shape)}; pass more samples."
        )
    return array.mean(axis=0), np.cov(array, rowvar=False)


def frechet_distance(
    mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike, eps: float = SINGULAR_OFFSET
) -> float:
    """Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

    d² = ‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½)   (Heusel et al. 2017, eq. 6; Dowson & Landau 1982)

    As pytorch-fid and clean-fid: when sqrtm of Σ1·Σ2 fails (non-finite result, or scipy reports the
    product singular, which recent scipy does with a warning instead of NaNs) it is recomputed with
    ε·I added to both covariances; an imaginary part above 1e-3 on the diagonal raises.
    """
    mu1, mu2 = np.atleast_1d(_as_float64(mu1)), np.atleast_1d(_as_float64(mu2))
    sigma1, sigma2 = np.atleast_2d(_as_float64(sigma1)), np.atleast_2d(_as_float64(sigma2))
    dim = mu1.shape[0]
    if mu1.shape != mu2.shape or sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ValueError(
            f"frechet_distance got mismatched statistics: mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 "
            f"{mu2.shape}, sigma2 {sigma2.shape}; both sets must come from the same extractor (dim {dim})."
        )
    covmean = _sqrtm_or_none(sigma1 @ sigma2)
    if covmean is None:
        offset = np.eye(dim) * eps
        covmean = _sqrtm_or_none((sigma1 + offset) @ (sigma2 + offset))
        if covmean is None:
            raise ValueError(
                f"sqrtm of the covariance product is still singular with eps={eps}; the features are "
                "degenerate (too few samples, or constant features): use more samples or a larger eps."
            )
    if np.iscomplexobj(covmean):
        largest_imaginary = np.max(np.abs(np.diagonal(covmean).imag))
        if largest_imaginary > IMAGINARY_TOLERANCE:
            raise ValueError(
                f"sqrtm(sigma1 @ sigma2) has an imaginary component {largest_imaginary:.3g} on its diagonal "
                "(tolerance 1e-3): the covariances are not valid (not symmetric PSD?)."
            )
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def _sqrtm_or_none(matrix: np.ndarray) -> np.ndarray | None:
    """scipy's sqrtm, or None when the matrix is singular (warning) or the result is not finite."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", scipy.linalg.LinAlgWarning)
        try:
            root = scipy.linalg.sqrtm(matrix)
        except scipy.linalg.LinAlgWarning:
            return None
    return root if np.isfinite(root).all() else None


def _as_float64(values: ArrayLike) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64)
