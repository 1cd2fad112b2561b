"""The start-up check (ldm/training/preflight.py): each contradiction between config, data and model is an error
naming the key to change, and what can be derived (num_classes, grid classes, UNet depth, task name) is."""
import copy
import functools
import io
import json
import re
from pathlib import Path

import hydra
import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from ldm.data.shards import shard_class_count, update_sizes, write_classes, write_shard
from ldm.training.preflight import ConfigError, fit_unet_depth, preflight
from ldm.utils.config import CONFIG_DIR


@functools.lru_cache(maxsize=None)
def _composed(experiment: str, more: tuple[str, ...]):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=["size=tiny", experiment, *more])


def composed(experiment: str, *overrides: str, groups: tuple[str, ...] = ()):
    """The experiment's config (composed once per test session: composing takes seconds on 2 cores) with
    `overrides` applied as Hydra would (`+key=value`: a new key)."""
    cfg = copy.deepcopy(_composed(experiment, groups))
    for override in overrides:
        key, value = override.lstrip("+").split("=", 1)
        OmegaConf.update(cfg, key, yaml.safe_load(value), force_add=True)
    return cfg


def checked(experiment: str, *overrides: str, groups: tuple[str, ...] = ()):
    cfg = composed(experiment, *overrides, groups=groups)
    datamodule = hydra.utils.instantiate(cfg.data)
    preflight(cfg, datamodule)
    return cfg, datamodule


def labelled_shards(directory, labels: list[int], classes_file: int | None = None) -> str:
    """One shard of 8x8 PNGs with the given `.cls` labels (and a classes.json of `classes_file` classes)."""
    directory.mkdir()
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    samples = [(f"{i:04d}", {"png": buffer.getvalue(), "cls": str(label).encode()}) for i, label in enumerate(labels)]
    update_sizes(str(directory), {"train-000000.tar": write_shard(str(directory / "train-000000.tar"), samples)})
    if classes_file is not None:
        write_classes(str(directory), [f"c{i}" for i in range(classes_file)])
    return str(directory / "train-000000.tar")


def own_data(url: str, *extra: str):
    return checked("experiment=ldm_f4_class", f"data.train_urls={url}", "data.resolution=32", *extra,
                   groups=("data=webdataset", "data.train_urls=x"))


def test_num_classes_comes_from_classes_json_or_a_scan_of_the_labels(tmp_path):
    scanned = labelled_shards(tmp_path / "scan", [0, 3, 9, 9, 2])
    assert shard_class_count([scanned])[0] == 10
    cfg, datamodule = own_data(scanned)
    assert cfg.model.conditioner.num_classes == 10 and datamodule.num_classes == 10
    assert cfg.data.num_classes == 10  # the data config reads the model's
    assert list(cfg.callbacks.sample_grid.classes) == [0, 3, 6, 9]  # the grid's default: spread over the classes
    declared = labelled_shards(tmp_path / "declared", [0, 1], classes_file=12)  # classes.json wins over a scan
    assert own_data(declared)[0].model.conditioner.num_classes == 12


def test_built_in_shapes_has_21_classes():
    cfg, datamodule = checked("experiment=ldm_f8_class")
    assert cfg.model.conditioner.num_classes == 21 and datamodule.num_classes == 21


def test_num_classes_that_disagrees_with_the_data_is_an_error(tmp_path):
    url = labelled_shards(tmp_path / "s", list(range(10)))
    with pytest.raises(ConfigError, match=r"model.conditioner.num_classes=21, but the data has 10 classes"):
        own_data(url, "model.conditioner.num_classes=21")
    unlabelled = tmp_path / "u"
    unlabelled.mkdir()
    write_shard(str(unlabelled / "a.tar"), [("0", {"png": b"x"})])
    with pytest.raises(ConfigError, match=r"model.conditioner.num_classes=N"):
        own_data(str(unlabelled / "a.tar"))


def test_grid_classes_outside_the_classes_are_an_error(tmp_path):
    url = labelled_shards(tmp_path / "s", list(range(10)))
    with pytest.raises(ConfigError, match=r"callbacks.sample_grid.classes=\[0, 4, 8, 12\] holds \[12\], outside "
                                          r"\[0, 10\)"):
        own_data(url, "callbacks.sample_grid.classes=[0,4,8,12]")


@pytest.mark.parametrize("overrides, match", [
    (["experiment=ldm_f8_text", "callbacks.sample_grid.prompts=[]"], r"callbacks.sample_grid.prompts is empty"),
    (["experiment=ldm_f8_text", "callbacks.sample_grid.classes=[0,1]"], r"sample_grid.classes=\[0, 1\] is for class"),
    (["experiment=ldm_f8_class", "+after_training.samples.prompts=[a red circle]"],
     r"after_training.samples.prompts is given, but this is a class model.*class_labels instead"),
    (["experiment=ldm_f8_uncond", "+after_training.samples.class_labels=[1]"],
     r"after_training.samples.class_labels is given, but this is a unconditional"),
    (["experiment=ldm_f8_class", "+after_training.samples.class_labels=[3,21]"], r"holds \[21\], outside \[0, 21\)"),
    (["experiment=ldm_f8_class", "data.resolution=60"],
     r"data.resolution=60 is not a multiple of the first stage's factor f=8 \(model.first_stage_factor\).*56 or 64"),
    (["experiment=ae_kl_f8", "data.resolution=36"], r"f=8 \(model.vae.ch_mult\)"),
])
def test_contradictions_fail_naming_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        checked(*overrides)


@pytest.mark.parametrize("channel_mult, attention, resolution, factor, expected", [
    ([1, 2, 4, 4], [4, 2, 1], 256, 8, ([1, 2, 4, 4], [4, 2, 1])),  # the paper's: 32 -> 4 px, unchanged
    ([1, 2, 3, 4], [8, 4, 2], 32, 4, ([1, 2], [2])),               # digits: 8x8 latents stop at 4 px
    ([1, 2, 4], [4, 2, 1], 32, 16, ([1], [1])),                     # 2x2 latents: no downsampling
    ([1, 2, 3, 4], [8, 4], 48, 4, ([1, 2], [2])),                   # 12 px: 6 px, then 3 would be < 4
    ([1, 2, 3, 4], [], 32, 4, ([1, 2], [])),                        # no attention stays none
])
def test_unet_depth_keeps_the_deepest_latents_at_4_px(channel_mult, attention, resolution, factor, expected):
    assert fit_unet_depth(channel_mult, attention, resolution, factor) == expected


def test_the_start_up_check_cuts_the_unet_to_the_latent_size():
    cfg, _ = checked("experiment=ldm_f8_class")  # shapes, 64 px: 8x8 latents
    assert list(cfg.model.unet.channel_mult) == [1, 2] and list(cfg.model.unet.attention_resolutions) == [2, 1]


def test_task_name_and_first_stage_follow_the_factor():
    cfg = composed("experiment=ldm_f8_class", "model.first_stage_factor=4")  # interpolations follow the update
    assert cfg.task_name == "ldm_f4_class" and cfg.first_stage.experiment == "ae_kl_f4"
    assert composed("experiment=ldm_f16_text").task_name == "ldm_f16_text"


def test_classes_json_is_what_make_shards_writes(tmp_path):
    write_classes(str(tmp_path), ["cat", "dog"])
    assert json.loads((tmp_path / "classes.json").read_text()) == {"num_classes": 2, "names": ["cat", "dog"]}


def test_the_readme_sizing_table_is_the_rule():
    """README "A small class-labelled set": every cell of the sizing table is what fit_unet_depth keeps."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    cell = r"(\d+ px: \d+ levels? \(\d+\))"  # only the sizing table's rows, not every numeric table's
    rows = re.findall(rf"^\| (\d+) \| {cell} \| {cell} \| {cell} \|$", readme, re.M)
    assert len(rows) == 5
    for resolution, *cells in rows:
        for (factor, channel_mult), cell in zip(((4, [1, 2, 3, 4]), (8, [1, 2, 4, 4]), (16, [1, 2, 4])), cells):
            kept, _ = fit_unet_depth(channel_mult, [], int(resolution), factor)
            latent = int(resolution) // factor
            level = "level" if len(kept) == 1 else "levels"
            assert cell == f"{latent} px: {len(kept)} {level} ({latent // 2 ** (len(kept) - 1)})", (resolution, factor)
