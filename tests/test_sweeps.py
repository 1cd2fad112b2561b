"""Sweeps through the real command line: the factor comparison chains each LDM to the autoencoder of its own
factor and reports it; an Optuna search runs its trials, returns the objective and is summarised."""
import dataclasses
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from ldm.diffusion.settings import SamplerSettings
from ldm.evaluation.reports import compare_factors, summarize_sweep
from ldm.evaluation.sweep import bootstrap_precision_recall, sweep_table
from ldm.metrics import manifold_membership, precision_recall
from ldm.metrics.shapes_classifier import (
    save_shapes_classifier,
    train_shapes_classifier,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RES = 64  # f=16 needs 4x4 latents for its 3-level UNet
FACTORS = (4, 8, 16)


def paths(tmp, data_dir) -> list[str]:
    return [f"paths.log_dir={tmp}/outputs", f"paths.cache_dir={tmp}/cache", f"paths.data_dir={data_dir}",
            "data.num_train=32", "data.num_val=16", "data.batch_size=4", "data.num_workers=0",
            "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1"]


def run_train(args: list[str]) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def factor_sweep(tmp_path_factory):
    """`python train.py -m hparams_search=compare_factors` at toy sizes: stage 1 for 1 step, stage 2 for 2,
    evaluated at steps 1 and 2 (with a quickly trained shapes classifier standing in for the cached one)."""
    tmp = tmp_path_factory.mktemp("compare")
    classifier = tmp / "cache" / "metrics" / f"shapes_classifier_{RES}px.safetensors"
    classifier.parent.mkdir(parents=True)
    save_shapes_classifier(train_shapes_classifier(RES, steps=5, batch_size=8), str(classifier), RES)
    run_train([
        "hparams_search=compare_factors", "size=tiny", f"hydra.sweep.dir={tmp}/sweep", *paths(tmp, tmp / "data"),
        f"data.resolution={RES}", "trainer.max_steps=2", "trainer.val_check_interval=2",
        "first_stage.overrides=['trainer.max_steps=1','trainer.val_check_interval=1','data.batch_size=4',"
        "'model.loss.perceptual_weight=0']",
        "callbacks.evaluation.every_n_steps=1", "callbacks.evaluation.num_samples=6",
        "callbacks.evaluation.num_real=16", "callbacks.sample_grid.every_n_steps=2", "sampling.steps=2",
        "callbacks.sample_grid.samples_per_condition=1",
    ])
    return tmp


def test_each_ldm_run_uses_the_autoencoder_of_its_own_factor(factor_sweep):
    jobs = sorted(os.listdir(factor_sweep / "sweep"))
    assert [job for job in jobs if job[0].isdigit()] == [f"{i}_ldm_f{f}_text" for i, f in enumerate(FACTORS)]
    stage1_ckpts = set()
    for index, factor in enumerate(FACTORS):
        ckpt = torch.load(factor_sweep / "sweep" / f"{index}_ldm_f{factor}_text" / "checkpoints" / "last.ckpt",
                          map_location="cpu", weights_only=True)
        hparams = ckpt["hyper_parameters"]
        stage1 = hparams["first_stage_ckpt"]
        assert re.search(rf"/cache/first_stage/ae_kl_f{factor}_[0-9a-f]{{12}}/checkpoints/last\.ckpt$", stage1), stage1
        assert 2 ** (len(hparams["first_stage"]["ch_mult"]) - 1) == factor
        stage1_ckpts.add(stage1)
    assert len(stage1_ckpts) == 3


def test_report_from_the_real_sweep(factor_sweep):
    report = compare_factors(str(factor_sweep / "sweep"), str(factor_sweep / "report"), sampling={"steps": 2})
    rows = report["rows"]
    assert [row["factor"] for row in rows] == list(FACTORS) and {row["status"] for row in rows} == {"ok"}
    assert [row["latent_shape"][1] for row in rows] == [RES // f for f in FACTORS]
    for row in rows:
        assert row["fid"] is not None and [step for step, _ in row["fid_history"]] == [1, 2]
        assert row["train_samples_per_sec"] > 0 and row["ae_val_psnr"] is not None
        assert row["ae_val_lpips"] is None  # perceptual loss off: not measured
    assert report["fid_vs_steps"] and report["samples"]


def test_optuna_search_runs_its_trials_and_is_summarised(factor_sweep, tmp_path):
    first_stage = next((factor_sweep / "cache" / "first_stage").glob("ae_kl_f4_*")) / "checkpoints" / "last.ckpt"
    run_train([
        "hparams_search=ldm_optuna", "experiment=ldm_f4_text", "size=tiny", "hydra.sweeper.n_trials=2",
        f"hydra.sweeper.storage=sqlite:///{tmp_path}/optuna.db", f"hydra.sweep.dir={tmp_path}/sweep",
        *paths(tmp_path, factor_sweep / "data"), f"model.first_stage_ckpt={first_stage}", "data.resolution=32",
        "model.unet.channel_mult=[1,2]", "model.unet.attention_resolutions=[2]", "callbacks=default",
        "trainer.max_steps=2", "trainer.val_check_interval=2",
    ])
    assert (tmp_path / "optuna.db").is_file() and (tmp_path / "sweep" / "optimization_results.yaml").is_file()
    table = open(summarize_sweep(str(tmp_path / "sweep"))).read()
    rows = [line for line in table.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(rows) == 2 and rows[0].endswith("| best |") and "failed" not in table
    assert "model.learning_rate" in table and "Optuna best" in table


# ------------------------------------------------------------------------------- the sweep table and its intervals
def test_bootstrap_intervals_bracket_the_point_estimates():
    """The intervals resample the per-point terms whose means are precision and recall, so they bracket them (a
    sweep that resampled the features, whose duplicates shrink k-NN radii, once printed recall 0.591 with the
    interval [0.425, 0.545])."""
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(300, 8)), rng.normal(0.3, 1.0, size=(200, 8))
    precision, recall = precision_recall(real, fake, k=3)
    fake_inside, real_inside = manifold_membership(real, fake, k=3)
    assert (fake_inside.mean(), real_inside.mean()) == pytest.approx((precision, recall))
    intervals = bootstrap_precision_recall(real, fake, k=3)
    for name, value in (("precision", precision), ("recall", recall)):
        low, high = intervals[f"{name}_interval"]
        assert low <= value <= high and high - low > 0, name


def test_sweep_table_shows_every_setting_that_varies():
    def record(rescale: float, fidelity: float) -> dict:
        setting = dataclasses.asdict(SamplerSettings(cfg_scale=3.0, guidance_rescale=rescale))
        return {"setting": setting, "fid": 1.0, "prompt_fidelity_all": fidelity, "prompt_fidelity_color": fidelity,
                "prompt_fidelity_shape": 0.5, "prompt_fidelity_position": 0.25}
    table = sweep_table([record(0.0, 0.1), record(0.7, 0.2)])
    header, _, first, second = table.strip().splitlines()
    assert "rescale" in header and "colour" in header and "position" in header and "eta" not in header
    assert first != second and "| 0.7 |" in second
