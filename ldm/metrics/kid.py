"""Kernel Inception Distance (Bińkowski et al. 2018, "Demystifying MMD GANs", Sec. 3 and App. B).

KID is the squared maximum mean discrepancy between real and generated features under the cubic polynomial
kernel k(x, y) = (x·y / d + 1)^3, estimated without bias:

    MMD²_u = Σ_{i≠j} k(x_i, x_j) / (m(m-1)) + Σ_{i≠j} k(y_i, y_j) / (m(m-1)) - 2 Σ_{i,j} k(x_i, y_j) / m²

Unlike FID it has an unbiased estimator, so it is meaningful at the few hundred samples an in-training
evaluation can afford (FID's bias then dominates the differences one wants to see). As torch-fidelity and the
paper's code, it is averaged over random subsets of `subset_size` samples per side; the std over subsets is its
uncertainty. Subsets are drawn with numpy's RandomState(seed) in torch-fidelity's order, so the two agree exactly.
"""
from __future__ import annotations

import numpy as np
import torch

DEFAULT_SUBSETS = 100
DEFAULT_SUBSET_SIZE = 1000


def kernel_inception_distance(
    real: torch.Tensor | np.ndarray, fake: torch.Tensor | np.ndarray, subsets: int = DEFAULT_SUBSETS,
    subset_size: int = DEFAULT_SUBSET_SIZE, seed: int = 2020,
) -> tuple[float, float, int]:
    """(mean, std over subsets, subset size used) of the unbiased MMD² between (N, D) feature sets.
    The subset size is capped at the smaller set, so small evaluations still get a value."""
    real64, fake64 = (np.asarray(x.detach().cpu() if torch.is_tensor(x) else x, dtype=np.float64) for x in (real, fake))
    if real64.ndim != 2 or fake64.ndim != 2 or real64.shape[1] != fake64.shape[1]:
        raise ValueError(f"KID needs two (N, D) feature sets of equal D, got {real64.shape} and {fake64.shape}")
    size = min(subset_size, len(real64), len(fake64))
    if size < 2:
        raise ValueError(f"KID needs at least 2 samples per side, got {len(fake64)} generated and {len(real64)} real.")
    rng = np.random.RandomState(seed)
    values = np.empty(subsets)
    for i in range(subsets):
        f = fake64[rng.choice(len(fake64), size, replace=False)]
        r = real64[rng.choice(len(real64), size, replace=False)]
        values[i] = _unbiased_mmd2(torch.from_numpy(f), torch.from_numpy(r))
    return float(values.mean()), float(values.std()), size


def _unbiased_mmd2(x: torch.Tensor, y: torch.Tensor) -> float:
    d, m = x.shape[1], x.shape[0]
    k_xx = (x @ x.T / d + 1) ** 3
    k_yy = (y @ y.T / d + 1) ** 3
    k_xy = (x @ y.T / d + 1) ** 3
    off_diagonal = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return float(off_diagonal - 2 * k_xy.mean())
