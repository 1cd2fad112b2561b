"""An installed (non-editable) wheel carries the Hydra configs: train.py's composition and the tools work from
site-packages, outside the source tree."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_ships_configs_and_composes_outside_the_repo(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(REPO)], check=True, capture_output=True, timeout=300)
    wheel = next(wheels.glob("ldm-*.whl"))
    shipped = {name for name in zipfile.ZipFile(wheel).namelist() if name.endswith(".yaml")}
    expected = {str(p.relative_to(REPO)) for p in (REPO / "ldm" / "configs").rglob("*.yaml")}
    assert shipped == expected
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site)}
    job = subprocess.run([sys.executable, "-m", "ldm.cli.train", "--cfg", "job", "experiment=ldm_f8_text", "size=tiny"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert job.returncode == 0, job.stderr[-2000:]
    # the experiment's own keys arrived (the task name follows the factor: ldm_f${model.first_stage_factor}_text)
    assert "task_name: ldm_f${model.first_stage_factor}_text" in job.stdout and "first_stage_factor: 8" in job.stdout
    assert str(site) in subprocess.run([sys.executable, "-c", "import ldm; print(ldm.__file__)"], cwd=tmp_path, env=env,
                                       capture_output=True, text=True).stdout
