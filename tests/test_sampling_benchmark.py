"""benchmarks/sampling.py's grid and its verdict (the sampling itself is evaluate.py's sweep, tested there)."""
from benchmarks.sampling import solver_grid, summarize
from ldm.diffusion.settings import SamplerSettings


def record(sampler: str, steps: int, spacing: str, fid: float, fidelity: float) -> dict:
    setting = SamplerSettings(sampler=sampler, steps=steps, timestep_spacing=spacing).as_dict()
    return {"setting": setting, "label": f"{sampler}_{steps}_{spacing}", "fid": fid, "prompt_fidelity_all": fidelity,
            "precision": 0.5, "recall": 0.5, "seconds_per_image": 1.0, "fid_name": "FID_shapes_cnn"}


def test_grid_starts_with_ddim_50_and_keeps_the_base_guidance():
    grid = solver_grid([8, 12], ["leading", "trailing"], SamplerSettings(cfg_scale=3.0, seed=7))
    assert (grid[0].sampler, grid[0].steps, grid[0].timestep_spacing) == ("ddim", 50, "leading")
    assert [(s.sampler, s.steps, s.timestep_spacing) for s in grid[1:]] == [
        ("dpmpp_2m", 8, "leading"), ("dpmpp_2m", 12, "leading"), ("dpmpp_2m", 8, "trailing"),
        ("dpmpp_2m", 12, "trailing")]
    assert all(s.cfg_scale == 3.0 and s.seed == 7 for s in grid)


def test_fewest_calls_at_reference_quality():
    records = [record("ddim", 50, "leading", 10.0, 0.80), record("dpmpp_2m", 8, "leading", 14.0, 0.80),
               record("dpmpp_2m", 10, "trailing", 10.4, 0.795), record("dpmpp_2m", 12, "leading", 9.0, 0.81),
               record("dpmpp_2m", 8, "trailing", 10.1, 0.70)]  # good FID, but it lost prompt fidelity
    summary = summarize(records, fid_tolerance=0.05, fidelity_tolerance=0.01)
    assert [row["matches_reference"] for row in summary["rows"]] == [True, False, True, True, False]
    assert summary["fewest_calls_matching_reference"]["label"] == "dpmpp_2m_10_trailing"
    assert summarize(records[:2], 0.05, 0.01)["fewest_calls_matching_reference"] is None
