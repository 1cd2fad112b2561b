"""FID against published reference statistics (`evaluate.py reference_stats=PATH`), so numbers compare with papers.

The files the field shares are `.npz` with the Gaussian of the reference set's Inception-v3 pool3 features:
`mu` (2048,) and `sigma` (2048, 2048). pytorch-fid's `--save-stats` files hold exactly these; ADM's reference
batches (Dhariwal & Nichol 2021, e.g. VIRTUAL_imagenet256_labeled.npz) hold them next to the images (`arr_0`) and
spatial statistics (`mu_s`, `sigma_s`, unused here). Both were computed with the 2015-12-05 TF Inception graph
(pytorch-fid with its port of those weights; ADM with the graph itself), the network of our `inception_v3`
extractor (torch-fidelity's port of the same weights), so only that extractor is accepted. What still differs
is the resize to 299 px: ours is PIL's antialiased bicubic (clean-fid, Parmar et al. 2022), pytorch-fid's and
the TF graph's are bilinear; resizing filters move FID (Parmar et al. 2022), so the difference is recorded.

The file has no features, so the k-NN metrics (precision / recall, density / coverage) and KID, which need
reference features, are not computed against it.
"""
from __future__ import annotations

import os
import zipfile

import numpy as np

from ldm.metrics.extractors import FeatureExtractor, file_digest
from ldm.metrics.stats_cache import ReferenceStatistics

PUBLISHED_EXTRACTOR = "inception_v3"
PUBLISHED_PREPROCESSING = ("reference: the TF Inception graph's own resize to 299 px (ADM) or bilinear (pytorch-fid); "
                           "generated: PIL antialiased bicubic to 299 px")


def load_published_statistics(path: str, extractor: FeatureExtractor) -> ReferenceStatistics:
    """`mu` and `sigma` of a pytorch-fid / ADM `.npz`, checked against `extractor` (must be Inception-v3 with
    features of the file's dimension); errors name what is wrong and the option to change."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reference_stats={path!r} does not exist (a pytorch-fid or ADM .npz with mu and "
                                "sigma).")
    if not zipfile.is_zipfile(path):  # np.load would take it for a pickle
        raise ValueError(f"reference_stats={path!r} is not a readable .npz file (not a zip archive: a failed "
                         "download?).")
    try:
        with np.load(path, allow_pickle=False) as stored:
            keys = sorted(stored.files)
            if "mu" not in keys or "sigma" not in keys:
                hint = (" It holds images (arr_0) only: write them to a folder and pass real_dir= instead."
                        if keys == ["arr_0"] else "")
                raise ValueError(f"reference_stats={path!r} has no 'mu' and 'sigma' arrays (it has {keys}): "
                                 f"expected the pytorch-fid / ADM format.{hint}")
            mu, sigma = stored["mu"].astype(np.float64), stored["sigma"].astype(np.float64)
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise ValueError(f"reference_stats={path!r} is not a readable .npz file ({error}).") from None
    described = extractor.describe()
    if described["name"] != PUBLISHED_EXTRACTOR:
        raise ValueError(f"reference_stats= are Inception-v3 pool3 statistics (pytorch-fid / ADM), but the "
                         f"extractor is {described['name']}: pass features=inception_v3.")
    dim = int(described["dim"])
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise ValueError(f"reference_stats={path!r} holds mu {mu.shape} and sigma {sigma.shape}, but the "
                         f"{described['name']} features are {dim}-d ({described['layer']}): the file was made with "
                         f"another network or layer (pytorch-fid --dims other than 2048?). Use 2048-d pool3 "
                         f"statistics.")
    identity = {"published": os.path.abspath(path), "sha256": file_digest(path), "extractor": described,
                "preprocessing": PUBLISHED_PREPROCESSING}
    return ReferenceStatistics(mu, sigma, None, None, identity, os.path.abspath(path), cache_hit=True)
