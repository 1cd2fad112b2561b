"""Checkpoint retention leaves exactly the newest K periodic checkpoints, every M-th, and last.ckpt."""
import os

import pytest
from hydra import compose, initialize_config_dir

from ldm.training.checkpoint_retention import CheckpointRetention, prune_checkpoints
from ldm.training.pipeline import train
from ldm.utils.config import CONFIG_DIR


def test_prune_keeps_newest_and_multiples(tmp_path):
    for step in (100, 200, 300, 400, 500, 600):
        (tmp_path / f"step{step:07d}.ckpt").write_text("x")
    (tmp_path / "last.ckpt").write_text("x")
    (tmp_path / "notes.txt").write_text("x")
    deleted = prune_checkpoints(str(tmp_path), keep_last=2, keep_every=300)
    assert deleted == ["step0000100.ckpt", "step0000200.ckpt", "step0000400.ckpt"]
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt", "notes.txt", "step0000300.ckpt", "step0000500.ckpt",
                                            "step0000600.ckpt"]
    assert prune_checkpoints(str(tmp_path), keep_last=None, keep_every=None) == []


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="keep_last=0"):
        CheckpointRetention("d", keep_last=0)


def test_a_training_run_leaves_exactly_the_configured_files(tmp_path):
    overrides = ["experiment=ae_kl_f8", "size=tiny", "logger=csv", f"paths.output_dir={tmp_path}/run",
                 f"paths.log_dir={tmp_path}/outputs", f"paths.cache_dir={tmp_path}/cache", f"paths.data_dir={tmp_path}/data",
                 "data.resolution=32", "data.num_train=32", "data.num_val=4", "data.batch_size=2", "data.num_workers=0",
                 "trainer.max_steps=6", "trainer.val_check_interval=6", "trainer.limit_val_batches=1",
                 "model.loss.lpips_pretrained=false", "callbacks.model_checkpoint.every_n_train_steps=1",
                 "callbacks.checkpoint_retention.keep_last=2", "callbacks.checkpoint_retention.keep_every=4"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        train(compose(config_name="train", overrides=overrides))
    left = sorted(name for name in os.listdir(tmp_path / "run" / "checkpoints") if name.endswith(".ckpt"))
    assert left == ["last.ckpt", "step0000004.ckpt", "step0000005.ckpt", "step0000006.ckpt"]
