"""Evaluation metrics: Fréchet distance (FID and variants), precision / recall, density / coverage,
Inception score, the feature extractors they run on, and a cache of reference statistics.

The shapes classifier (`ldm.metrics.shapes_classifier`, extractor `shapes_cnn`) is imported on demand:
it depends on the data package."""
from ldm.metrics.extractors import (
    FeatureExtractor,
    WeightsUnavailableError,
    build_extractor,
    images_to_uint8,
    resize_uint8,
)
from ldm.metrics.frechet import feature_statistics, frechet_distance
from ldm.metrics.inception_score import inception_score
from ldm.metrics.precision_recall import (
    density_coverage,
    manifold_membership,
    precision_recall,
)
from ldm.metrics.stats_cache import (
    ReferenceStatistics,
    reference_identity,
    reference_statistics,
)

__all__ = [
    "FeatureExtractor",
    "ReferenceStatistics",
    "WeightsUnavailableError",
    "build_extractor",
    "density_coverage",
    "feature_statistics",
    "frechet_distance",
    "images_to_uint8",
    "inception_score",
    "manifold_membership",
    "precision_recall",
    "reference_identity",
    "reference_statistics",
    "resize_uint8",
]
