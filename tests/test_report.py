"""Reports from run directories built by hand: the factor comparison (a finished, a crashed and an unfinished
run), the throughput callback it reads, and the sweep summary table."""
import json
import os

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm.cli.report import main
from ldm.evaluation.reports import (
    compare_factors,
    last_logged,
    summarize_run,
    summarize_sweep,
)
from ldm.models.latent_diffusion import LatentDiffusion
from ldm.training.throughput import METRIC, TrainThroughput

RES = 32
VAE = dict(embed_dim=3, z_channels=4, ch=8, ch_mult=[1, 2, 2], num_res_blocks=1, attention_resolutions=[],
           norm_groups=8)
UNET = dict(in_channels=3, out_channels=3, model_channels=16, channel_mult=[1, 2], num_res_blocks=1,
            attention_resolutions=[2], num_heads=2, transformer_depth=1, context_dim=32, norm_groups=8)
TEXT = {"_target_": "ldm.models.conditioners.TextTransformer", "width": 32, "layers": 1, "heads": 2}


def write_csv(path, header: list[str], rows: list[list]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        handle.write(",".join(header) + "\n")
        handle.writelines(",".join("" if v is None else str(v) for v in row) + "\n" for row in rows)


def write_run(run_dir, factor: int, max_steps: int, first_stage_ckpt: str, resolved: bool = True) -> None:
    cfg = {"model": {"first_stage_factor": factor, "first_stage_ckpt": first_stage_ckpt},
           "data": {"resolution": RES}, "trainer": {"max_steps": max_steps}}
    if resolved:
        OmegaConf.save(cfg, os.path.join(run_dir, "config_resolved.yaml"))
    else:  # a job that died in stage 1: only Hydra's config, with interpolations no one can resolve now
        cfg["paths"] = {"output_dir": "${hydra:runtime.output_dir}"}
        os.makedirs(os.path.join(run_dir, ".hydra"))
        OmegaConf.save(cfg, os.path.join(run_dir, ".hydra", "config.yaml"))


def save_tiny_ldm(path, global_step: int, first_stage_ckpt: str) -> LatentDiffusion:
    torch.manual_seed(0)
    model = LatentDiffusion(unet=UNET, conditioner=TEXT, first_stage=VAE, first_stage_ckpt=first_stage_ckpt,
                            image_size=RES, scale_factor=1.0, ema_decay=0.999)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams), "global_step": global_step},
               path)
    return model


@pytest.fixture(scope="module")
def fake_multirun(tmp_path_factory):
    """0_ldm_f4_text finished (evaluated twice, its stage-1 run logged PSNR / LPIPS), 1_ldm_f8_text crashed in
    stage 1, 2_ldm_f4b_text stopped at step 5 of 10 before any evaluation."""
    root = tmp_path_factory.mktemp("multirun")
    ae_ckpt = str(root / "cache" / "first_stage" / "ae_kl_f4_abc" / "checkpoints" / "last.ckpt")
    write_csv(str(root / "cache" / "first_stage" / "ae_kl_f4_abc" / "csv" / "metrics.csv"),
              ["step", "train/loss", "val/psnr", "val/lpips"], [[1, 0.5, None, None], [2, None, 21.5, 0.31],
                                                              [3, 0.4, None, None], [4, None, 23.25, 0.25]])
    done = root / "sweep" / "0_ldm_f4_text"
    write_run(str(done.mkdir(parents=True) or done), 4, 10, ae_ckpt)
    model = save_tiny_ldm(str(done / "checkpoints" / "last.ckpt"), 10, ae_ckpt)
    write_csv(str(done / "csv" / "metrics.csv"), ["step", "train/loss", METRIC],
              [[4, 0.9, 12.0], [5, None, None], [9, 0.8, 14.5]])
    os.makedirs(done / "eval")
    with open(done / "eval" / "metrics.jsonl", "w") as handle:
        for step, fid in ((5, 80.0), (10, 60.0)):
            handle.write(json.dumps({"step": step, "fid": fid, "fid_name": "FID_shapes_cnn", "precision": 0.25,
                                     "recall": step / 100}) + "\n")
    crashed = root / "sweep" / "1_ldm_f8_text"
    crashed.mkdir()
    write_run(str(crashed), 8, 10, None, resolved=False)
    unfinished = root / "sweep" / "2_ldm_f4b_text"
    unfinished.mkdir()
    write_run(str(unfinished), 4, 10, ae_ckpt)
    save_tiny_ldm(str(unfinished / "checkpoints" / "last.ckpt"), 5, ae_ckpt)
    return {"root": root, "sweep": str(root / "sweep"), "model": model}


def test_run_summary_reads_configs_checkpoints_logs_and_the_stage_one_run(fake_multirun):
    row = summarize_run(os.path.join(fake_multirun["sweep"], "0_ldm_f4_text"))
    model = fake_multirun["model"]
    assert row.status == "ok" and row.factor == 4 and row.latent_shape == [3, RES // 4, RES // 4]
    assert row.compression_ratio == 3 * RES * RES / (3 * 8 * 8)
    assert row.ae_params == sum(p.numel() for p in model.first_stage.parameters())
    assert row.ldm_params == sum(p.numel() for p in model.unet.parameters())
    assert (row.ae_val_psnr, row.ae_val_lpips, row.train_samples_per_sec) == (23.25, 0.25, 14.5)
    assert (row.fid, row.precision, row.recall, row.eval_step) == (60.0, 0.25, 0.1, 10)
    assert row.fid_history == [[5, 80.0], [10, 60.0]]


def test_comparison_report_keeps_crashed_and_unfinished_runs(fake_multirun, tmp_path):
    out = str(tmp_path / "report")
    report = compare_factors(fake_multirun["sweep"], out, prompts=["a red circle", "a blue square"], sampling={"steps": 2})
    rows = {row["run"]: row for row in report["rows"]}
    assert rows["1_ldm_f8_text"]["status"].startswith("failed") and rows["1_ldm_f8_text"]["factor"] == 8
    assert rows["1_ldm_f8_text"]["fid"] is None and rows["1_ldm_f8_text"]["ae_params"] is None
    assert rows["2_ldm_f4b_text"]["status"] == "incomplete: step 5 of 10" and rows["2_ldm_f4b_text"]["fid"] is None
    assert [row["factor"] for row in report["rows"]] == [4, 4, 8]  # sorted by factor

    with open(os.path.join(out, "report.json")) as handle:
        assert json.load(handle)["rows"] == report["rows"]
    table = open(os.path.join(out, "report.md")).read()
    assert "| 0_ldm_f4_text | ok | 4 | 3×8×8 | 16 |" in table and "FID_shapes_cnn" in table
    assert "| 1_ldm_f8_text | failed: no checkpoint | 8 | n/a |" in table
    with Image.open(os.path.join(out, "fid_vs_steps.png")) as plot:
        assert plot.size[0] > 100
    with Image.open(os.path.join(out, "samples.png")) as grid:  # two runs with checkpoints, two prompts each
        assert grid.size[1] == 2 * (RES + 2)
    runs = ("0_ldm_f4_text", "2_ldm_f4b_text")
    records = [json.load(open(os.path.join(out, "samples", run, "samples.json"))) for run in runs]
    assert [(r["prompt"], r["seed"]) for r in records[0]] == [(r["prompt"], r["seed"]) for r in records[1]] == [
        ("a red circle", 0), ("a blue square", 1)]
    # the same weights and seeds give the same pixels: the row is the model's own sample
    first, again = (np.array(Image.open(os.path.join(out, "samples", run, "00000.png")))
                    for run in runs)
    assert np.array_equal(first, again)


def test_report_errors_name_the_runs_argument(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "runs=" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="holds no run directories"):
        compare_factors(str(tmp_path), str(tmp_path / "out"))


def test_last_logged_skips_blank_cells(tmp_path):
    write_csv(str(tmp_path / "m.csv"), ["step", "a", "b"], [[1, 1.0, None], [2, None, 3.0], [3, None, None]])
    assert last_logged(str(tmp_path / "m.csv"), "a") == 1.0 and last_logged(str(tmp_path / "m.csv"), "c") is None


def test_throughput_is_samples_over_the_median_step(monkeypatch):
    clock = iter([0.0, 1.0, 2.0, 12.0, 13.0])  # one slow step (an evaluation) among 1 s steps
    monkeypatch.setattr("ldm.training.throughput.time.perf_counter", lambda: next(clock))
    trainer = type("T", (), {"world_size": 2})()
    callback = TrainThroughput(window=10)
    for index in range(5):
        callback.on_train_batch_start(trainer, None, {"key": ["a"] * 4}, index)
    assert callback.samples_per_second() == 8.0  # 4 samples x 2 ranks per (median) 1 s


def write_trial(sweep, number: int, overrides: list[str], val_loss: float | None) -> None:
    hydra_dir = sweep / str(number) / ".hydra"
    hydra_dir.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), hydra_dir / "overrides.yaml")
    OmegaConf.save({"hydra": {"job": {"num": number}, "sweeper": {"direction": "minimize"}}}, hydra_dir / "hydra.yaml")
    OmegaConf.save({"optimized_metric": "val/loss"}, hydra_dir / "config.yaml")
    if val_loss is not None:
        write_csv(str(sweep / str(number) / "csv" / "metrics.csv"), ["step", "val/loss"],
                  [[1, val_loss + 1], [2, val_loss]])


def test_sweep_summary_ranks_trials_and_shows_only_swept_keys(tmp_path):
    sweep = tmp_path / "sweep"
    fixed = ["experiment=ldm_f8_text", "size=tiny"]
    write_trial(sweep, 0, [*fixed, "model.learning_rate=0.00012520653814999459", "data.batch_size=8"], 0.5)
    write_trial(sweep, 1, [*fixed, "model.learning_rate=0.001", "data.batch_size=16"], 0.25)
    write_trial(sweep, 2, [*fixed, "model.learning_rate=0.01", "data.batch_size=32"], None)  # crashed
    OmegaConf.save({"name": "optuna", "best_params": {"data.batch_size": 16}, "best_value": 0.25},
                   sweep / "optimization_results.yaml")
    table = open(summarize_sweep(str(sweep))).read()
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert lines[0] == "| trial | model.learning_rate | data.batch_size | val/loss |  |"
    assert lines[1:] == ["| 1 | 0.001 | 16 | 0.25 | best |", "| 0 | 0.0001252 | 8 | 0.5 |  |",
                         "| 2 | 0.01 | 32 | failed (no value logged) |  |"]
    assert "Optuna best: 0.25" in table and "1 without a value" in table
