"""Reference statistics computed once and cached on disk.

Reference features (the real images of a data split) cost as much to extract as the generated ones,
and they never change: they are cached as `.npz` under a cache directory, one file per identity,
named by a hash of that identity. The identity is everything the features depend on: the data (its
URLs / parameters), the split, the resolution and the extractor's `describe()` (weights included), so
changing any of them is a cache miss and never a stale hit.

A file holds `mu` and `sigma` (over *all* reference features, for the Fréchet distance) and
`features`: a uniform random subset (fixed seed) of at most `max_stored_features` rows kept for
precision / recall, so that 50k × 2048 Inception features do not turn into a 400 MB file.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from ldm.metrics.extractors import FeatureExtractor
from ldm.metrics.frechet import feature_statistics
from ldm.utils.files import write_atomic

logger = logging.getLogger(__name__)

DEFAULT_MAX_STORED_FEATURES = 10_000


@dataclass(frozen=True)
class ReferenceStatistics:
    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None  # float32, at most max_stored_features rows (None: published mu / sigma only)
    num_samples: int | None  # how many features mu and sigma were computed from (None: unknown)
    identity: dict[str, Any]
    path: str
    cache_hit: bool


def reference_identity(
    data: Any, split: str, resolution: int, extractor: FeatureExtractor | dict[str, Any], **extra: Any
) -> dict[str, Any]:
    """The identity the cache is keyed on; `data` is anything JSON-serialisable naming the data set."""
    described = extractor if isinstance(extractor, dict) else extractor.describe()
    return {"data": data, "split": split, "resolution": resolution, "extractor": described, **extra}


def cache_key(identity: dict[str, Any]) -> str:
    """sha256 (first 20 hex digits) of the identity as canonical JSON."""
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:20]


def reference_statistics(
    identity: dict[str, Any],
    compute_features: Callable[[], np.ndarray | torch.Tensor],
    cache_dir: str,
    max_stored_features: int | None = DEFAULT_MAX_STORED_FEATURES,
) -> ReferenceStatistics:
    """Load the statistics of `identity` from `cache_dir`, or compute them with `compute_features()`
    ((N, D) reference features) and store them. `cache_hit` on the result says which happened."""
    path = os.path.join(cache_dir, f"reference_{cache_key(identity)}.npz")
    stored = _load(path, identity)
    if stored is not None:
        logger.info("reference statistics: cache hit %s", path)
        return stored
    logger.info("reference statistics: cache miss, computing %s", path)
    features = compute_features()
    features = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    mu, sigma = feature_statistics(features)
    kept = features
    if max_stored_features is not None and len(features) > max_stored_features:
        rows = np.sort(np.random.default_rng(0).choice(len(features), max_stored_features, replace=False))
        kept = features[rows]
    write_atomic(path, lambda file: np.savez(file, mu=mu, sigma=sigma, features=kept.astype(np.float32),
                                             num_samples=len(features),
                                             identity=json.dumps(identity, sort_keys=True, default=str)))
    return ReferenceStatistics(mu, sigma, kept.astype(np.float32), len(features), identity, path, cache_hit=False)


def _load(path: str, identity: dict[str, Any]) -> ReferenceStatistics | None:
    """The cached statistics if the file exists and was written for exactly this identity."""
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            if json.loads(str(stored["identity"])) != json.loads(json.dumps(identity, sort_keys=True, default=str)):
                logger.warning("reference statistics: %s was written for another identity, recomputing", path)
                return None
            return ReferenceStatistics(stored["mu"], stored["sigma"], stored["features"], int(stored["num_samples"]),
                                       identity, path, cache_hit=True)
    except (ValueError, OSError, KeyError, zipfile.BadZipFile) as error:  # pickles are refused, never loaded
        raise ValueError(
            f"Refused to read the reference-statistics cache {path}: it is not a file this program wrote ({error}). "
            "Pickled data is never loaded, since unpickling can run code. Delete the file: the statistics are "
            "recomputed on the next run."
        ) from None
