"""benchmarks/time_to_quality.py's bookkeeping: checkpoint minutes, the before column, minutes to a target (the
training and evaluation are train.py's and evaluate.py's, tested there)."""
import json
import os

import pytest

from benchmarks.time_to_quality import checkpoint_minutes, minutes_to, step_cost_difference_ms


def test_checkpoint_minutes_are_file_write_times_after_the_start(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for step, written in ((400, 1_000.0 + 90), (200, 1_000.0 + 30)):
        path = folder / f"step{step:07d}.ckpt"
        path.write_bytes(b"")
        os.utime(path, (written, written))
    (folder / "last.ckpt").write_bytes(b"")  # not a frontier point
    found = checkpoint_minutes(tmp_path, start=1_000.0)
    assert list(found) == [200, 400]
    assert found[200][1] == pytest.approx(0.5) and found[400][1] == pytest.approx(1.5)


def test_before_column_adds_the_measured_step_cost_difference(tmp_path):
    report = {"setup": {"threads": 2}, "results": [  # the layout benchmarks/train_step.py writes
        {"data": "images", "vocabulary": "full", "total_ms": 900.0}, {"data": "images", "vocabulary": "data", "total_ms": 850.0},
        {"data": "latents", "vocabulary": "full", "total_ms": 800.0}, {"data": "latents", "vocabulary": "data", "total_ms": 750.0}]}
    (tmp_path / "train_step.json").write_text(json.dumps(report))
    difference, source = step_cost_difference_ms(tmp_path / "train_step.json")
    assert difference == 150.0 and source["before_ms"] == 900.0 and source["after_ms"] == 750.0
    assert source["threads"] == 2
    assert step_cost_difference_ms(tmp_path / "missing.json") == (None, None)


def test_minutes_to_a_target_is_the_first_checkpoint_that_reaches_it():
    rows = [{"step": 200, "minutes": 3.0, "fidelity_position": 0.4}, {"step": 400, "minutes": 6.0, "fidelity_position": 0.85},
            {"step": 600, "minutes": 9.0, "fidelity_position": 0.80}]
    assert minutes_to(rows, "position", 0.8, "minutes") == 6.0
    assert minutes_to(rows, "position", 0.9, "minutes") is None
