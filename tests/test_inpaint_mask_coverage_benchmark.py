"""benchmarks/inpaint_mask_coverage.py: the share of the object each loader mask hides."""
import numpy as np
import pytest

from benchmarks.inpaint_mask_coverage import object_coverage, summary


def test_summary_counts_hidden_half_hidden_and_untouched_objects():
    found = summary(np.array([0.0, 0.5, 0.95, 1.0]))
    assert found == pytest.approx({"mean_share_hidden": 0.6125, "hidden": 0.5, "half_hidden": 0.75, "untouched": 0.25})


def test_coverage_is_a_share_per_draw_and_outpainting_borders_hide_edge_objects_more_than_strokes():
    outpaint, stroke = (object_coverage(kind, 200, 64, seed=0) for kind in ("outpaint", "stroke"))
    assert outpaint.shape == (200,) and ((0 <= outpaint) & (outpaint <= 1)).all()
    assert (outpaint >= 0.9).mean() > (stroke >= 0.9).mean()
    assert np.array_equal(object_coverage("box", 20, 64, seed=0), object_coverage("box", 20, 64, seed=0))
