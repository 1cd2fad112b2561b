"""Progress a user can read in a log: a line every N steps with step/max_steps, the headline metrics (stage 1:
reconstruction loss and PSNR), steps/s and the ETA; no progress-bar redraws and no library noise when stdout
is not a terminal."""
import csv
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from ldm.training import progress_log
from ldm.training.progress_log import ProgressLog

REPO = Path(__file__).resolve().parents[1]


def fake_trainer(step: int, max_steps: int = 200) -> types.SimpleNamespace:
    return types.SimpleNamespace(global_step=step, max_steps=max_steps)


def test_steps_per_second_and_eta_follow_from_the_clock(monkeypatch):
    clock = iter([100.0, 110.0, 130.0])  # fit starts at step 20 (a resumed run), lines at steps 70 and 120
    monkeypatch.setattr(progress_log.time, "perf_counter", lambda: next(clock))
    callback = ProgressLog(every_n_steps=50)
    callback.on_train_start(fake_trainer(20), None)
    first = callback.format_line(fake_trainer(70), {"loss": 0.12345, "val_loss": 0.1})
    # 50 steps in 10 s: 5 steps/s; 130 steps left at the fit's mean rate of 5 steps/s: 26 s
    assert first == "step 70/200 (35%) | loss 0.1235 | val_loss 0.1 | 5.00 steps/s | ETA 0:00:26"
    second = callback.format_line(fake_trainer(120), {"rec_loss": 0.05, "psnr": 24.567, "val_psnr": 25.0})
    # since the last line 50 steps in 20 s: 2.5 steps/s; mean since the start 100 steps in 30 s: 80 left -> 24 s
    assert second == "step 120/200 (60%) | rec_loss 0.05 | PSNR 24.57 dB | val PSNR 25.00 dB | 2.50 steps/s | ETA 0:00:24"


def test_every_n_steps_must_be_positive():
    with pytest.raises(ValueError, match="callbacks.progress_log.every_n_steps must be >= 1"):
        ProgressLog(every_n_steps=0)


@pytest.fixture(scope="module")
def stage_one_run(tmp_path_factory):
    """`python train.py experiment=ae_kl_f4 size=tiny` for 4 steps, stdout and stderr pipes (not terminals)."""
    tmp = tmp_path_factory.mktemp("progress")
    args = [sys.executable, str(REPO / "train.py"), "experiment=ae_kl_f4", "size=tiny", "trainer.max_steps=4",
            "trainer.val_check_interval=2", "callbacks.progress_log.every_n_steps=2", "model.loss.perceptual_weight=0",
            f"hydra.run.dir={tmp}/run", f"paths.log_dir={tmp}/outputs", f"paths.cache_dir={tmp}/cache",
            f"paths.data_dir={tmp}/data", "data.resolution=32", "data.num_train=32", "data.num_val=8",
            "data.batch_size=4", "data.num_workers=0", "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, tmp / "run"


LINE = re.compile(r"step (\d)/4 \((\d+)%\) \| rec_loss [\d.e+-]+ \| PSNR ([\d.]+) dB \| (?:val PSNR ([\d.]+) dB \| )?"
                  r"[\d.]+ steps/s \| ETA \d+:\d\d:\d\d$")


@pytest.mark.slow
def test_stage_one_logs_reconstruction_loss_and_psnr_every_n_steps(stage_one_run):
    proc, run_dir = stage_one_run
    lines = [match for line in proc.stdout.splitlines() if (match := LINE.search(line))]
    assert [(m.group(1), m.group(2)) for m in lines] == [("2", "50"), ("4", "100")], proc.stdout
    assert "finished at step 4: 4 steps in" in proc.stdout
    # the PSNR shown is the one logged as train/psnr; the val PSNR the one validation logged
    with open(run_dir / "csv" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    train_psnr = {row["step"]: float(row["train/psnr"]) for row in rows if row.get("train/psnr")}
    assert [f"{train_psnr[m.group(1)]:.2f}" for m in lines] == [m.group(3) for m in lines]
    val_psnr = [float(row["val/psnr"]) for row in rows if row.get("val/psnr")]
    # validation runs after a step's callbacks: the step-4 line shows the step-2 validation, the step-2 line none
    assert lines[0].group(4) is None and lines[1].group(4) == f"{val_psnr[0]:.2f}"


@pytest.mark.slow
def test_no_progress_bar_redraws_or_library_noise_outside_a_terminal(stage_one_run):
    proc, _ = stage_one_run
    output = proc.stdout + proc.stderr
    assert "\r" not in output  # Lightning's bar is off when stdout is not a terminal
    for noise in ("litlogger", "LeafSpec", "`weights_only` was not set"):
        assert noise not in output
