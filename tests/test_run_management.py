"""`ckpt_path=last` continues the newest run of the experiment in its own directory (same metrics.csv, same
checkpoints folder, same wandb id), never a sweep trial; the whole config reaches the loggers."""
import csv
import os

import pytest
import yaml
from hydra import compose, initialize_config_dir

from ldm.training import loggers
from ldm.training.loggers import WANDB_ID_FILE, build_loggers, wandb_run_id
from ldm.training.pipeline import train
from ldm.training.run_config import resolve_ckpt_path, run_dir_of
from ldm.utils.config import CONFIG_DIR


def overrides(tmp_path, output_dir: str, *extra: str) -> list[str]:
    return ["experiment=ae_kl_f8", "size=tiny", "logger=csv", f"paths.output_dir={output_dir}",
            f"paths.log_dir={tmp_path}/outputs", f"paths.cache_dir={tmp_path}/cache", f"paths.data_dir={tmp_path}/data",
            "data.resolution=32", "data.num_train=32", "data.num_val=4", "data.batch_size=2", "data.num_workers=0",
            "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1",
            "model.loss.lpips_pretrained=false", *extra]


def run(args: list[str]):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return train(compose(config_name="train", overrides=args))


def csv_steps(run_dir) -> list[int]:
    with open(os.path.join(run_dir, "csv", "metrics.csv")) as handle:
        return sorted({int(row["step"]) for row in csv.DictReader(handle) if row.get("train/rec_loss")})


def test_ckpt_path_last_continues_in_the_same_directory(tmp_path):
    first_dir = tmp_path / "outputs" / "ae_kl_f8" / "runs" / "first"
    first = run(overrides(tmp_path, str(first_dir), "trainer.max_steps=2"))
    assert first.trainer.global_step == 2
    steps_before = csv_steps(first_dir)
    hparams = yaml.safe_load((first_dir / "csv" / "hparams.yaml").read_text())
    assert hparams["data"]["batch_size"] == 2 and hparams["seed"] == 0 and hparams["params_trainable"] > 0

    second_dir = tmp_path / "outputs" / "ae_kl_f8" / "runs" / "second"  # what Hydra would make for this launch
    second = run(overrides(tmp_path, str(second_dir), "ckpt_path=last", "trainer.max_steps=4"))
    assert second.output_dir == str(first_dir) and second.trainer.global_step == 4
    assert not (second_dir / "checkpoints").exists()
    steps_after = csv_steps(first_dir)
    assert steps_before and set(steps_before) < set(steps_after) and max(steps_after) >= 3  # appended, not replaced


def test_last_never_picks_a_sweep_trial(tmp_path):
    trial = tmp_path / "task" / "multiruns" / "2026" / "0" / "checkpoints"
    trial.mkdir(parents=True)
    (trial / "last.ckpt").write_text("x")
    with pytest.raises(FileNotFoundError, match="sweep trial"):
        resolve_ckpt_path("last", str(tmp_path), "task")
    single = tmp_path / "task" / "runs" / "2026" / "checkpoints"
    single.mkdir(parents=True)
    (single / "last.ckpt").write_text("x")
    assert resolve_ckpt_path("last", str(tmp_path), "task") == str(single / "last.ckpt")
    assert run_dir_of(str(single / "last.ckpt")) == str(single.parent) and run_dir_of("model.ckpt") is None


def test_wandb_offline_run_keeps_its_id_and_gets_the_config(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_run_id(str(tmp_path)) == wandb_run_id(str(tmp_path))  # written once, then read back
    assert (tmp_path / WANDB_ID_FILE).read_text().strip() == wandb_run_id(str(tmp_path))
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["logger=wandb", f"paths.output_dir={tmp_path}"])
    (logger,) = build_loggers(cfg.logger, str(tmp_path))
    assert logger.version == wandb_run_id(str(tmp_path))
    logger.log_hyperparams({"seed": 0, "data": {"batch_size": 3}})
    logger.experiment.finish()
    run_id = wandb_run_id(str(tmp_path))
    (record,) = (tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")  # the offline run is ours
    assert b"batch_size" in record.read_bytes()  # the config reached the run's records


def test_tensorboard_logger_composes_beside_csv_and_names_its_package_when_missing(tmp_path, monkeypatch):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["logger=[csv,tensorboard]", f"paths.output_dir={tmp_path}"])
    assert set(cfg.logger) == {"csv", "tensorboard"}
    assert cfg.logger.tensorboard.save_dir == str(tmp_path) and cfg.logger.tensorboard.name == "tensorboard"
    monkeypatch.setattr(loggers, "tensorboard_available", lambda: False)
    with pytest.raises(loggers.LoggerUnavailableError, match=r"needs the `tensorboard` package.*\[tensorboard\]"):
        build_loggers(cfg.logger, str(tmp_path))
    monkeypatch.undo()
    if loggers.tensorboard_available():  # with the package: event files in <run dir>/tensorboard, like csv/
        csv_logger, tensorboard = build_loggers(cfg.logger, str(tmp_path))
        assert tensorboard.log_dir == str(tmp_path / "tensorboard")
