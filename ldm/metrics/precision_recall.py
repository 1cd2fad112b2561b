"""k-NN manifold metrics: improved precision / recall (Kynkäänniemi et al. 2019) and density /
coverage (Naeem et al. 2020).

Each set's manifold is the union of balls around its points, the radius of a ball being the distance
to the point's k-th nearest neighbour in its own set (the point itself excluded). Distances are
computed with `torch.cdist` in row blocks on the features' device, so memory is O(batch_size × n),
never n × n: 50k × 50k features fit in a few hundred MB.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor

DEFAULT_BATCH_SIZE = 1024


def precision_recall(
    real: ArrayLike, fake: ArrayLike, k: int = 3, batch_size: int = DEFAULT_BATCH_SIZE
) -> tuple[float, float]:
    """Improved precision and recall, Kynkäänniemi et al. 2019, eq. (1)–(2).

    precision = (1/M) Σ_j 1[fake_j ∈ manifold(real)],  recall = (1/N) Σ_i 1[real_i ∈ manifold(fake)],
    with f ∈ manifold(S) iff ‖f − s‖ ≤ NND_k(s) for some s ∈ S (inclusive, as the authors' code and
    torch-fidelity). k = 3 is the paper's default.
    """
    fake_inside, real_inside = manifold_membership(real, fake, k, batch_size)
    return float(fake_inside.mean()), float(real_inside.mean())


def manifold_membership(
    real: ArrayLike, fake: ArrayLike, k: int = 3, batch_size: int = DEFAULT_BATCH_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """The per-point terms of precision and recall: (fake_j ∈ manifold(real) for each j, real_i ∈ manifold(fake)
    for each i), booleans whose means are precision and recall. Intervals resample these terms: resampling the
    points themselves would duplicate some, and a duplicate's k-th neighbour distance collapses, which shrinks
    its set's manifold and biases the resampled recall downwards."""
    real, fake = _as_feature_pair(real, fake, k)
    real_radii = _kth_neighbour_radii(real, k, batch_size)
    fake_radii = _kth_neighbour_radii(fake, k, batch_size)
    fake_inside = _balls_containing(fake, real, real_radii, batch_size, inclusive=True).gt(0)
    real_inside = _balls_containing(real, fake, fake_radii, batch_size, inclusive=True).gt(0)
    return fake_inside.cpu().numpy(), real_inside.cpu().numpy()


def density_coverage(
    real: ArrayLike, fake: ArrayLike, k: int = 5, batch_size: int = DEFAULT_BATCH_SIZE
) -> tuple[float, float]:
    """Density and coverage, Naeem et al. 2020, eq. (3)–(4); only the real manifold is estimated.

    density = 1/(kM) Σ_j Σ_i 1[fake_j ∈ B(real_i, NND_k(real_i))]   (unbounded above; ≈1 when matched)
    coverage = (1/N) Σ_i 1[∃ j: fake_j ∈ B(real_i, NND_k(real_i))]
    Ball membership is strict (<), as in the authors' `prdc` package; k = 5 is their default.
    """
    real, fake = _as_feature_pair(real, fake, k)
    real_radii = _kth_neighbour_radii(real, k, batch_size)
    density = _balls_containing(fake, real, real_radii, batch_size, inclusive=False).double().sum() / (k * len(fake))
    nearest_fake = _blockwise(real, fake, batch_size, lambda distances: distances.min(dim=1).values)
    coverage = (nearest_fake < real_radii).double().mean()
    return float(density), float(coverage)


def _kth_neighbour_radii(points: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """Distance of each point to its k-th nearest neighbour in `points`, itself excluded.

    Each row of the distance matrix holds the point's zero distance to itself, so the k-th neighbour
    is the (k+1)-th smallest value.
    """
    return _blockwise(points, points, batch_size, lambda distances: distances.kthvalue(k + 1, dim=1).values)


def _balls_containing(
    queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, batch_size: int, inclusive: bool
) -> torch.Tensor:
    """For each query, the number of balls B(centre_i, radius_i) that contain it."""
    inside = torch.le if inclusive else torch.lt
    return _blockwise(queries, centres, batch_size, lambda distances: inside(distances, radii).sum(dim=1))


def _blockwise(
    queries: torch.Tensor,
    points: torch.Tensor,
    batch_size: int,
    reduce_rows: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Apply `reduce_rows` to (batch_size, n) blocks of the query-to-point distance matrix."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive number of rows, got {batch_size}.")
    results = []
    for start in range(0, len(queries), batch_size):
        block = queries[start : start + batch_size]
        results.append(reduce_rows(torch.cdist(block, points)))
    return torch.cat(results)


def _as_feature_pair(real: ArrayLike, fake: ArrayLike, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sets as float tensors on one device (the real features'), checked for k-NN use."""
    real_tensor = torch.as_tensor(real)
    fake_tensor = torch.as_tensor(fake).to(real_tensor.device)
    if not real_tensor.is_floating_point():
        real_tensor = real_tensor.float()
    fake_tensor = fake_tensor.to(real_tensor.dtype)
    if real_tensor.ndim != 2 or fake_tensor.ndim != 2 or real_tensor.shape[1] != fake_tensor.shape[1]:
        raise ValueError(
            f"expected real and fake features of shape (N, D) and (M, D), got {tuple(real_tensor.shape)} and "
            f"{tuple(fake_tensor.shape)}; extract both with the same extractor."
        )
    smallest = min(len(real_tensor), len(fake_tensor))
    if k < 1 or smallest <= k:
        raise ValueError(
            f"k={k} nearest neighbours need k >= 1 and more than k samples in each set, got {len(real_tensor)} "
            f"real and {len(fake_tensor)} fake; lower k or pass more samples."
        )
    return real_tensor, fake_tensor
