"""KID equals torch-fidelity's on the same features and subsets, is ~0 for one distribution and grows with a shift."""
import pytest
import torch
from torch_fidelity.metric_kid import (
    KEY_METRIC_KID_MEAN,
    KEY_METRIC_KID_STD,
    kid_features_to_metric,
)

from ldm.metrics.kid import kernel_inception_distance


@pytest.mark.parametrize("n_real, n_fake, subset_size", [(300, 200, 100), (150, 150, 150)])
def test_matches_torch_fidelity(n_real, n_fake, subset_size):
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(n_real, 64, generator=generator, dtype=torch.float64)
    fake = torch.randn(n_fake, 64, generator=generator, dtype=torch.float64) * 1.1 + 0.2
    mean, std, used = kernel_inception_distance(real, fake, subsets=20, subset_size=subset_size, seed=7)
    reference = kid_features_to_metric(fake, real, kid_subsets=20, kid_subset_size=subset_size, rng_seed=7,
                                       kid_degree=3, kid_gamma=None, kid_coef0=1, verbose=False)
    assert used == subset_size
    assert mean == pytest.approx(reference[KEY_METRIC_KID_MEAN], rel=1e-9, abs=1e-12)
    assert std == pytest.approx(reference[KEY_METRIC_KID_STD], rel=1e-9, abs=1e-12)


def test_unbiased_near_zero_for_one_distribution_and_larger_for_a_shift():
    generator = torch.Generator().manual_seed(1)
    real, same = torch.randn(400, 32, generator=generator), torch.randn(400, 32, generator=generator)
    mean_same, std_same, _ = kernel_inception_distance(real, same, subsets=30, subset_size=200)
    mean_shift, _, _ = kernel_inception_distance(real, same + 0.5, subsets=30, subset_size=200)
    assert abs(mean_same) < 3 * std_same + 1e-3
    assert mean_shift > 10 * max(abs(mean_same), std_same)


def test_subset_size_is_capped_and_bad_input_refused():
    assert kernel_inception_distance(torch.randn(50, 8), torch.randn(30, 8), subsets=2)[2] == 30
    with pytest.raises(ValueError, match="equal D"):
        kernel_inception_distance(torch.randn(10, 8), torch.randn(10, 9))
