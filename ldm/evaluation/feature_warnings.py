"""What an evaluation must say loudly about its own numbers: features learnt on other data than the images they
judge (issue: the shapes CNN silently scoring user data offline)."""
from __future__ import annotations

from typing import Any, Mapping

from ldm.data.shapes import parse_caption_objects
from ldm.evaluation.image_sources import ImageSource
from ldm.metrics import FeatureExtractor


def feature_warnings(extractor: FeatureExtractor, reference: ImageSource) -> list[str]:
    """What the report must say loudly: features learnt on other data than the images they judge. The shapes
    CNN is trained on the built-in shapes only; on other images its features (and so its FID, precision /
    recall) measure nothing meaningful about them."""
    if getattr(extractor, "name", None) == "shapes_cnn" and not reference.is_shapes and not _shapes_captions(reference):
        return [f"features=shapes_cnn on images that are not the built-in shapes data ({reference.split} split of "
                f"{_short(reference.identity())}): the shapes classifier was trained on shapes only, so its "
                f"{extractor.metric_names()[0]}, precision and recall say nothing about these images. Use "
                "features=inception_v3 (offline: place its weights file; the error names it), clip or dinov2."]
    return []


def _shapes_captions(reference: ImageSource, limit: int = 64) -> bool:
    """Whether a folder's captions are all shapes captions (images drawn by the shapes renderer, e.g. exported)."""
    captions = reference.captions(limit)
    try:
        return bool(captions) and all(parse_caption_objects(caption) for caption in captions)
    except ValueError:  # not a shapes caption
        return False


def _short(identity: Any) -> str:
    text = identity.get("_target_", str(identity)) if isinstance(identity, Mapping) else str(identity)
    return text if len(text) <= 80 else text[:77] + "..."


def warnings_entry(extractor: FeatureExtractor, reference: ImageSource) -> dict[str, list[str]]:
    """metrics.json's `warnings` entry (absent when there is nothing to say)."""
    found = feature_warnings(extractor, reference)
    return {"warnings": found} if found else {}
