"""train.py end to end on the built-in data at toy sizes: each factor runs, resume continues the step
count, the two stages chain (stage 1 trained once, then reused), and the command line works."""
import os
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir

from ldm.training.pipeline import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, "configs")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("datasets"))


def toy_overrides(tmp_path, data_dir: str, resolution: int = 32) -> list[str]:
    return [
        "size=tiny",
        "logger=csv",
        f"paths.output_dir={tmp_path}/run",
        f"paths.log_dir={tmp_path}/outputs",
        f"paths.cache_dir={tmp_path}/cache",
        f"paths.data_dir={data_dir}",
        f"data.resolution={resolution}",
        "data.num_train=64",
        "data.num_val=16",
        "data.batch_size=4",
        "data.num_workers=0",
        "trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=1",
    ]


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def run_train(overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return train(compose(config_name="train", overrides=overrides))


@pytest.mark.parametrize("factor", [4, 8, 16])
def test_autoencoder_fast_dev_run_each_factor(tmp_path, data_dir, factor):
    result = run_train([f"experiment=ae_kl_f{factor}", "trainer.fast_dev_run=2", "model.loss.lpips_pretrained=false",
                        *toy_overrides(tmp_path, data_dir)])
    assert os.path.isfile(result.last_ckpt)
    model = result.trainer.lightning_module
    z = model.encode(torch.zeros(1, 3, 32, 32)).mode()
    assert z.shape == (1, model.vae.embed_dim, 32 // factor, 32 // factor)


def test_resume_from_last_continues_step_count(tmp_path, data_dir, recwarn):
    base = ["experiment=ae_kl_f8", "model.loss.perceptual_weight=0", *toy_overrides(tmp_path, data_dir),
            "trainer.val_check_interval=3"]
    first = run_train([*base, "trainer.max_steps=3"])
    assert first.trainer.global_step == 3
    recwarn.clear()  # recwarn records every warning ("always"): no filter of ours hides one
    resumed = run_train([*base, "trainer.max_steps=5", f"ckpt_path={first.last_ckpt}"])
    assert resumed.trainer.global_step == 5
    # mid-epoch (16 batches an epoch): the README promises an exact resume and weights-only loading
    said = [str(w.message) for w in recwarn]
    assert not [m for m in said if "not resumable" in m or "weights_only" in m], said


def test_latent_diffusion_chains_stage_one_once(tmp_path, data_dir):
    overrides = [
        "experiment=ldm_f8_text",
        *toy_overrides(tmp_path, data_dir, resolution=64),  # f=8: 8x8 latents for a 4-level UNet
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "first_stage.overrides=['trainer.max_steps=2','data.batch_size=4','model.loss.perceptual_weight=0']",
        "callbacks.sample_grid.every_n_steps=3",
        "sampling.steps=2",
        "callbacks.sample_grid.samples_per_condition=1",
    ]
    result = run_train(overrides)
    stage1_dirs = os.listdir(os.path.join(tmp_path, "cache", "first_stage"))
    assert len(stage1_dirs) == 1 and stage1_dirs[0].startswith("ae_kl_f8_")
    marker = os.path.join(tmp_path, "cache", "first_stage", stage1_dirs[0], "DONE")
    stamp = os.path.getmtime(marker)
    assert result.trainer.global_step == 3
    assert os.path.isfile(os.path.join(tmp_path, "run", "images", "samples_step0000003.png"))

    reuse = run_train([*overrides, f"paths.output_dir={tmp_path}/run3"])
    assert os.path.getmtime(marker) == stamp and len(os.listdir(os.path.join(tmp_path, "cache", "first_stage"))) == 1
    assert reuse.trainer.lightning_module.hparams.first_stage_ckpt.startswith(str(tmp_path / "cache"))


def test_command_line_entry_point(tmp_path, data_dir):
    args = [
        sys.executable, os.path.join(REPO, "train.py"), "experiment=ae_kl_f4", "trainer.max_steps=2", "model.loss.perceptual_weight=0",
        "trainer.val_check_interval=2", f"hydra.run.dir={tmp_path}/cli_run",
        *[o for o in toy_overrides(tmp_path, data_dir) if not o.startswith("paths.output_dir")],
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "cli_run"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "config_resolved.yaml").is_file()
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert list((run_dir / "images").glob("recon_step*.png"))


def test_command_line_bad_key_exits_nonzero(tmp_path):
    args = [sys.executable, os.path.join(REPO, "train.py"), "experiment=ae_kl_f8", "model.vae.chanels=3",
            f"hydra.run.dir={tmp_path}/bad"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "chanels" in proc.stderr


CALLS: list[dict] = []


def record_call(**kwargs) -> None:
    CALLS.append(kwargs)


def test_after_training_calls_each_action_and_skips_the_switched_off_ones(tmp_path):
    from omegaconf import OmegaConf

    from ldm.training.pipeline import run_after_training

    CALLS.clear()
    actions = OmegaConf.create({"samples": None, "evaluation": {"_target_": f"{__name__}.record_call", "task": "x"}})
    run_after_training(actions, "run/last.ckpt", str(tmp_path))
    assert CALLS == [{"task": "x", "ckpt": "run/last.ckpt", "out": os.path.join(str(tmp_path), "evaluation")}]
