"""Every experiment in configs/experiment/ trains at `size=tiny` (lightning-hydra-template's `experiment=glob(*)`):
stage-1 experiments from scratch, stage-2 experiments on a tiny autoencoder of their own factor. Also the
debug/ configs compose and do what they say."""
import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from ldm.training.pipeline import train
from ldm.utils.config import CONFIG_DIR

EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))
STAGE_ONE = [name for name in EXPERIMENTS if name.startswith("ae_")]
STAGE_TWO = [name for name in EXPERIMENTS if not name.startswith("ae_")]


def tiny(tmp_path, data_dir: str, name: str) -> list[str]:
    return ["size=tiny", "logger=csv", "debug=fdr", f"paths.output_dir={tmp_path}/{name}",
            f"paths.log_dir={tmp_path}/outputs", f"paths.cache_dir={tmp_path}/cache", f"paths.data_dir={data_dir}",
            "data.resolution=32", "data.num_train=16", "data.num_val=8", "data.batch_size=2", "after_training={}",
            "model.loss.lpips_pretrained=false" if name.startswith("ae_") else "model.p_uncond=0.5"]


def run(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return train(compose(config_name="train", overrides=overrides))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def first_stages(tmp_path_factory, data_dir) -> dict[int, str]:
    """A tiny fast_dev_run autoencoder per factor, shared by the stage-2 experiments."""
    root = tmp_path_factory.mktemp("first_stages")
    return {f: run([f"experiment=ae_kl_f{f}", *tiny(root, data_dir, f"ae_kl_f{f}")]).last_ckpt for f in (4, 8, 16)}


def test_every_experiment_is_covered():
    assert {"ae_kl_f4", "ae_kl_f8", "ae_kl_f16", "ldm_f8_text", "ldm_f8_class", "quickstart"} <= set(EXPERIMENTS)


@pytest.mark.slow
@pytest.mark.parametrize("experiment", STAGE_ONE)
def test_stage_one_experiment_trains_at_size_tiny(tmp_path, data_dir, experiment):
    result = run([f"experiment={experiment}", *tiny(tmp_path, data_dir, experiment)])
    model = result.trainer.lightning_module
    assert result.trainer.global_step == 1 and os.path.isfile(result.last_ckpt)
    factor = int(experiment.rsplit("_f", 1)[1])
    assert model.vae.downsampling_factor == factor


@pytest.mark.slow
@pytest.mark.parametrize("experiment", STAGE_TWO)
def test_stage_two_experiment_trains_at_size_tiny(tmp_path, data_dir, first_stages, experiment):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        factor = compose(config_name="train", overrides=[f"experiment={experiment}"]).model.first_stage_factor
    result = run([f"experiment={experiment}", f"model.first_stage_ckpt={first_stages[factor]}",
                  *tiny(tmp_path, data_dir, experiment), "data.resolution=64"])  # f=16: 4x4 latents
    model = result.trainer.lightning_module
    assert result.trainer.global_step == 1 and os.path.isfile(result.last_ckpt)
    assert model.first_stage.downsampling_factor == factor
    assert torch.isfinite(torch.stack([p.detach().sum() for p in model.unet.parameters()])).all()


@pytest.mark.parametrize("debug, key, value", [
    ("fdr", "trainer.fast_dev_run", True), ("overfit", "trainer.overfit_batches", 3),
    ("limit", "trainer.max_steps", 6), ("profiler", "trainer.profiler", "simple"),
    ("default", "trainer.detect_anomaly", True),
])
def test_debug_configs_compose_over_any_experiment(debug, key, value):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=ldm_f8_text", f"debug={debug}"])
    node = cfg
    for part in key.split("."):
        node = node[part]
    assert node == value and cfg.task_name == "debug" and cfg.data.num_workers == 0 and cfg.extras.print_config
