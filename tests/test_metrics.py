"""Metric values against closed forms, direct O(n²) / scipy references and torch-fidelity."""
import json
import logging

import numpy as np
import pytest
import scipy.linalg
import torch
from torch_fidelity.metric_fid import fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_prc import calculate_precision_recall_full

from ldm.metrics import (
    density_coverage,
    feature_statistics,
    frechet_distance,
    inception_score,
    precision_recall,
)
from ldm.metrics.stats_cache import cache_key, reference_identity, reference_statistics


def gaussian_features(seed: int, n: int = 300, dim: int = 6, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    return rng.normal(size=(n, dim)) @ mixing + shift


# Fréchet distance -----------------------------------------------------------------------------------


def test_feature_statistics_are_float64_mean_and_unbiased_covariance():
    features = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    mu, sigma = feature_statistics(features)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, features.double().mean(0).numpy(), atol=1e-12)
    np.testing.assert_allclose(sigma, torch.cov(features.double().T).numpy(), atol=1e-12)  # ddof=1


def test_frechet_distance_matches_direct_scipy_computation():
    mu1, sigma1 = feature_statistics(gaussian_features(0))
    mu2, sigma2 = feature_statistics(gaussian_features(1, shift=0.7))
    root = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2 - 2 * root)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-9)
    peer = fid_statistics_to_metric({"mu": mu1, "sigma": sigma1}, {"mu": mu2, "sigma": sigma2}, verbose=False)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(peer["frechet_inception_distance"], rel=1e-6)


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    # W2² between N(m1, diag a) and N(m2, diag b) = |m1 − m2|² + Σ (√a − √b)²
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    m1, m2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_of_identical_sets_is_zero():
    mu, sigma = feature_statistics(gaussian_features(2))
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_frechet_distance_retries_with_offset_when_covariance_is_singular():
    # A dead (constant) feature gives exact zero rows in both covariances: Σ1·Σ2 is singular.
    real, fake = gaussian_features(3, n=50, dim=4), gaussian_features(4, n=50, dim=4)
    real[:, 0], fake[:, 0] = 0.0, 3.0
    (mu1, sigma1), (mu2, sigma2) = feature_statistics(real), feature_statistics(fake)
    offset = np.eye(4) * 1e-6
    root = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset)).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2 - 2 * root)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_rejects_mismatched_dimensions():
    with pytest.raises(ValueError, match="same extractor"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# Precision / recall, density / coverage ----------------------------------------------------------------


def reference_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """Kynkäänniemi et al. 2019 with the full n × n distance matrices."""
    def distances(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))

    real_radii = np.sort(distances(real, real), axis=1)[:, k]  # column 0 is the point itself
    fake_radii = np.sort(distances(fake, fake), axis=1)[:, k]
    precision = (distances(fake, real) <= real_radii[None, :]).any(axis=1).mean()
    recall = (distances(real, fake) <= fake_radii[None, :]).any(axis=1).mean()
    return precision, recall


def reference_density_coverage(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """Naeem et al. 2020, eq. (3)-(4), with full distance matrices."""
    real_real = np.sqrt(((real[:, None] - real[None]) ** 2).sum(-1))
    real_fake = np.sqrt(((real[:, None] - fake[None]) ** 2).sum(-1))
    radii = np.sort(real_real, axis=1)[:, k]
    inside = real_fake < radii[:, None]
    return inside.sum() / (k * len(fake)), inside.any(axis=1).mean()


@pytest.fixture(scope="module")
def overlapping_sets() -> tuple[np.ndarray, np.ndarray]:
    return gaussian_features(5, n=150, dim=5).astype(np.float32), gaussian_features(6, n=120, dim=5, shift=0.6).astype(np.float32)


def test_precision_recall_matches_reference_and_torch_fidelity(overlapping_sets):
    real, fake = overlapping_sets
    precision, recall = precision_recall(real, fake, k=3)
    expected = reference_precision_recall(real.astype(np.float64), fake.astype(np.float64), k=3)
    assert (precision, recall) == pytest.approx(expected, abs=1e-12)
    assert 0.0 < precision < 1.0 and 0.0 < recall < 1.0
    peer = calculate_precision_recall_full(torch.from_numpy(fake), torch.from_numpy(real), neighborhood=3)
    assert (precision, recall) == pytest.approx(peer, abs=1e-6)  # torch-fidelity averages in float32


def test_precision_recall_batched_equals_unbatched(overlapping_sets):
    real, fake = overlapping_sets
    assert precision_recall(real, fake, k=4, batch_size=7) == precision_recall(real, fake, k=4, batch_size=10_000)
    assert density_coverage(real, fake, batch_size=7) == pytest.approx(density_coverage(real, fake, batch_size=10_000))


def test_precision_recall_constructed_cases():
    real = torch.randn(60, 8, generator=torch.Generator().manual_seed(0))
    assert precision_recall(real, real.clone()) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0) == (0.0, 0.0)


def test_density_coverage_matches_reference_and_constructed_cases(overlapping_sets):
    real, fake = overlapping_sets
    density, coverage = density_coverage(real, fake, k=5)
    assert (density, coverage) == pytest.approx(reference_density_coverage(real.astype(np.float64), fake.astype(np.float64), 5),
                                                abs=1e-12)
    assert density_coverage(real, real + 100.0) == (0.0, 0.0)
    # Fakes exactly on the first half of the real points: those balls are covered, and each fake lies
    # in its own ball and its neighbours' (density > 0), while the other half stays uncovered.
    half_density, half_coverage = density_coverage(real, real[:75].copy(), k=5)
    assert 0.5 <= half_coverage < 1.0 and half_density > 0.0
    assert density_coverage(real, real.copy())[1] == 1.0


def test_precision_recall_rejects_too_few_samples():
    with pytest.raises(ValueError, match="more than k samples"):
        precision_recall(torch.randn(3, 2), torch.randn(10, 2), k=3)


# Inception score -------------------------------------------------------------------------------------


def test_inception_score_of_uniform_predictions_is_one():
    mean, std = inception_score(torch.zeros(40, 10), splits=4)
    assert mean == pytest.approx(1.0) and std == pytest.approx(0.0)


def test_inception_score_of_confident_even_predictions_is_num_classes():
    num_classes = 5
    labels = torch.arange(50) % num_classes  # every split of 5 holds each class once
    logits = 1000.0 * torch.nn.functional.one_hot(labels, num_classes).double()
    mean, std = inception_score(logits, splits=10)
    assert mean == pytest.approx(num_classes) and std == pytest.approx(0.0, abs=1e-9)


def test_inception_score_matches_torch_fidelity():
    logits = torch.randn(90, 7, generator=torch.Generator().manual_seed(0)) * 3
    peer = isc_features_to_metric(logits, splits=3, shuffle=False)
    assert inception_score(logits, splits=3) == pytest.approx(
        (peer["inception_score_mean"], peer["inception_score_std"]), rel=1e-9)


# Reference statistics cache -------------------------------------------------------------------------


def test_reference_statistics_cache_hit_and_miss(tmp_path, caplog):
    calls = []
    features = gaussian_features(7, n=40, dim=3).astype(np.float32)

    def compute():
        calls.append(1)
        return torch.from_numpy(features)

    extractor = {"name": "shapes_cnn", "layer": "penultimate", "dim": 3, "weights": "abc"}
    identity = reference_identity({"urls": "shards/val-{000000..000001}.tar"}, "val", 64, extractor)
    first = reference_statistics(identity, compute, str(tmp_path), max_stored_features=10)
    with caplog.at_level(logging.INFO, logger="ldm.metrics.stats_cache"):
        second = reference_statistics(identity, compute, str(tmp_path), max_stored_features=10)
    assert (first.cache_hit, second.cache_hit, len(calls)) == (False, True, 1)
    assert "cache hit" in caplog.text
    np.testing.assert_array_equal(first.sigma, second.sigma)
    np.testing.assert_allclose(second.mu, features.astype(np.float64).mean(0))  # over all 40, not the 10 kept
    assert second.features.shape == (10, 3) and second.num_samples == 40

    retrained = reference_identity({"urls": "shards/val-{000000..000001}.tar"}, "val", 64, {**extractor, "weights": "def"})
    third = reference_statistics(retrained, compute, str(tmp_path))
    assert not third.cache_hit and len(calls) == 2 and third.path != first.path


@pytest.mark.parametrize("kind", ["object_arrays", "raw_pickle"])
def test_a_pickled_statistics_cache_is_refused_naming_the_file_and_the_fix(tmp_path, kind):
    import pickle

    identity = reference_identity({"urls": "x"}, "val", 64, {"name": "shapes_cnn"})
    path = tmp_path / f"reference_{cache_key(identity)}.npz"
    if kind == "object_arrays":
        np.savez(path, mu=np.zeros(2), sigma=np.eye(2), features=np.array([{"a": 1}], dtype=object),
                 num_samples=1, identity=np.array(json.dumps(identity), dtype=object))
    else:
        path.write_bytes(pickle.dumps({"mu": [0.0]}))
    with pytest.raises(ValueError) as error:
        reference_statistics(identity, lambda: pytest.fail("must not recompute over the file"), str(tmp_path))
    assert str(path) in str(error.value) and "Delete the file: the statistics are recomputed" in str(error.value)
