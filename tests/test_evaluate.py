"""evaluate.py end to end as a user runs it (a folder, a tiny checkpoint, the data config), its errors,
the reference-statistics cache, and EvaluationCallback inside a short training run."""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import hydra
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from pytorch_lightning.loggers import CSVLogger
from tiny_models import tiny_text_ldm

from ldm.data.shapes import render_sample
from ldm.evaluation.evaluate import (
    build_features,
    evaluate,
    evaluation_conditions,
)
from ldm.evaluation.image_sources import ImageFolder, data_identity
from ldm.evaluation.metrics_files import markdown_table
from ldm.metrics import WeightsUnavailableError
from ldm.metrics.shapes_classifier import (
    load_shapes_classifier_extractor,
    save_shapes_classifier,
    train_shapes_classifier,
)
from ldm.models.concat_conditioners import LowResConditioner
from ldm.models.latent_diffusion import LatentDiffusion
from ldm.training.callbacks import EvaluationCallback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESOLUTION = 32
TINY_MODEL = tiny_text_ldm(image_size=RESOLUTION, ema_decay=0.9, learning_rate=1e-3, warmup_steps=0)
REQUIRED_KEYS = {"fid", "fid_name", "kid", "kid_std", "kid_name", "precision", "recall", "density", "coverage", "is_mean", "is_std", "num_samples",
                 "num_real", "features", "k", "prompt_fidelity_color", "prompt_fidelity_shape",
                 "prompt_fidelity_position", "prompt_fidelity_all"}


@pytest.fixture(scope="session")
def classifier_path(tmp_path_factory) -> str:
    """A shapes classifier trained once per session (60 steps at 32 px: a few seconds, ~90% colour accuracy)."""
    path = str(tmp_path_factory.mktemp("classifier") / f"shapes_classifier_{RESOLUTION}px.safetensors")
    save_shapes_classifier(train_shapes_classifier(RESOLUTION, steps=60, batch_size=32), path, RESOLUTION)
    return path


@pytest.fixture(scope="session")
def shapes_folders(tmp_path_factory) -> dict[str, str]:
    """Two folders of 24 captioned shapes images (img2dataset layout: <key>.png + <key>.txt), different seeds."""
    folders = {}
    for name, seed in (("real", 1), ("other", 2)):
        folder = tmp_path_factory.mktemp(name)
        rng = np.random.default_rng(seed)
        for index in range(24):
            image, attributes = render_sample(rng, RESOLUTION)
            image.save(folder / f"{index:05d}.png")
            (folder / f"{index:05d}.txt").write_text(attributes["caption"])
        folders[name] = str(folder)
    return folders


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> str:
    """A tiny untrained text-conditioned LDM saved as a Lightning checkpoint would be (step 7)."""
    torch.manual_seed(0)
    model = LatentDiffusion(**TINY_MODEL)
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny.ckpt")
    torch.save({"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict(), "global_step": 7}, path)
    return path


def run_evaluate(*overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "evaluate.py", *overrides], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def shapes_cnn(classifier_path: str, cache: str) -> list[str]:
    return ["features=shapes_cnn", f"features.weights_path={classifier_path}", f"paths.cache_dir={cache}"]


def read_metrics(out) -> dict:
    with open(os.path.join(out, "metrics.json")) as handle:
        return json.load(handle)


# ------------------------------------------------------------------------------------ evaluate.py


def test_identical_folders_then_checkpoint_reuses_cached_reference(tmp_path, classifier_path, shapes_folders, tiny_ckpt):
    cache = tmp_path / "cache"
    first = run_evaluate(f"fake_dir={shapes_folders['real']}", f"real_dir={shapes_folders['real']}",
                         *shapes_cnn(classifier_path, cache), f"out={tmp_path / 'same'}")
    assert first.returncode == 0, first.stderr
    metrics = read_metrics(tmp_path / "same")
    assert REQUIRED_KEYS <= metrics.keys()
    assert abs(metrics["fid"]) < 1e-2
    assert metrics["kid_name"] == "KID_shapes_cnn" and metrics["kid"] <= 1e-9  # identical sets: MMD²_u <= 0
    assert metrics["precision"] == metrics["recall"] == metrics["coverage"] == 1.0
    assert metrics["fid_name"] == "FID_shapes_cnn" and metrics["features"]["network"] == "shapes_cnn"
    assert metrics["features"]["dim"] == 256 and metrics["num_samples"] == metrics["num_real"] == 24
    assert metrics["is_name"] == "IS_shapes_cnn" and 1.0 <= metrics["is_mean"] <= 189
    assert 0.0 <= metrics["prompt_fidelity_all"] <= metrics["prompt_fidelity_color"] <= 1.0  # captions from .txt
    assert not metrics["reference"]["cache_hit"]
    assert "| FID_shapes_cnn |" in (tmp_path / "same" / "metrics.md").read_text()

    out = tmp_path / "ckpt"
    second = run_evaluate(f"ckpt={tiny_ckpt}", "num_samples=6", "sampling.steps=2", "batch_size=4", "sampling.cfg_scale=3",
                          "diagnostics=true", "diagnostics_samples=8",
                          f"real_dir={shapes_folders['real']}", *shapes_cnn(classifier_path, cache), f"out={out}")
    assert second.returncode == 0, second.stderr
    assert "reference statistics: cache hit" in second.stdout + second.stderr
    metrics = read_metrics(out)
    assert metrics["reference"]["cache_hit"] and metrics["num_samples"] == 6 and metrics["fid"] > 1.0
    assert metrics["checkpoint"]["global_step"] == 7 and metrics["sampler"]["steps"] == 2
    assert metrics["sampler"]["cfg_scale"] == 3.0 and metrics["features"]["preprocessing"]
    with open(out / "samples" / "samples.json") as handle:
        records = json.load(handle)
    real_captions = [(Path(shapes_folders["real"]) / f"{i:05d}.txt").read_text() for i in range(6)]
    assert [record["prompt"] for record in records] == real_captions  # prompts: the reference captions, in order
    pngs = {name for name in os.listdir(out / "samples") if name.endswith(".png")}
    assert pngs == {f"{i:05d}.png" for i in range(6)} | {"grid.png"}  # grid.png is not evaluated (6 samples)
    assert metrics["prompt_fidelity_all"] is not None
    assert 0.0 <= metrics["prompt_fidelity_reconstruction_all"] <= metrics["prompt_fidelity_reconstruction_color"] <= 1.0
    diagnostics = metrics["diagnostics"]  # diagnostics=true: beside the sample metrics, in both files
    assert diagnostics["num_samples"] == 8 and diagnostics["signal_leak"]["t"] == 501  # DDIM, 2 leading steps: 500 + 1
    assert set(diagnostics["caption_sensitivity"]["x0_gap"]) == {"shuffled", "color", "shape", "position"}
    assert "caption gap color" in (out / "metrics.md").read_text()


def test_data_config_reference_picks_shapes_features(tmp_path, classifier_path, shapes_folders):
    """The default reference is the val split of `data=shapes`, and `features=auto` then means shapes_cnn."""
    result = run_evaluate(f"fake_dir={shapes_folders['other']}", f"data.resolution={RESOLUTION}", "data.num_train=8",
                          "data.num_val=16", "data.num_workers=0", f"paths.data_dir={tmp_path / 'data'}",
                          f"features.weights_path={classifier_path}", f"paths.cache_dir={tmp_path / 'cache'}",
                          "num_real=12", f"out={tmp_path / 'out'}")
    assert result.returncode == 0, result.stderr
    metrics = read_metrics(tmp_path / "out")
    assert metrics["features"]["network"] == "shapes_cnn" and metrics["num_real"] == 12
    assert 0.0 <= metrics["precision"] <= 1.0 and metrics["fid"] > 0


@pytest.mark.parametrize("case", ["missing_inception_weights", "missing_ckpt"])
def test_errors_exit_2_with_a_message_and_no_traceback(tmp_path, shapes_folders, case):
    overrides, env, expected = {
        "missing_inception_weights": ([f"fake_dir={shapes_folders['real']}", "features=inception_v3"],
                                      {"TORCH_HOME": str(tmp_path / "empty_torch_home")},
                                      "weights-inception-2015-12-05-6726825d.pth"),
        "missing_ckpt": ([f"ckpt={tmp_path / 'nope.ckpt'}"], {}, "nope.ckpt"),
    }[case]
    result = run_evaluate(*overrides, f"real_dir={shapes_folders['real']}", f"paths.cache_dir={tmp_path / 'cache'}",
                          f"out={tmp_path / 'out'}", env=env)
    assert result.returncode == 2
    assert expected in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_image_folder_errors_name_the_option(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="real_dir=.* holds no images"):
        ImageFolder(str(tmp_path), "real_dir")
    with pytest.raises(FileNotFoundError, match="fake_dir=.* is not a directory"):
        ImageFolder(str(tmp_path / "missing"))


# ------------------------------------------------------------------------------------ configs and library pieces


@pytest.mark.parametrize("features", ["auto", "shapes_cnn", "inception_v3", "clip", "dinov2"])
def test_evaluate_config_composes_with_each_features_choice(features):
    with initialize_config_dir(config_dir=os.path.join(REPO, "configs"), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=[f"features={features}", "out=/tmp/x"])
    assert cfg.features.name == features and cfg.data.resolution == 64 and cfg.k == 3


def test_train_composes_the_evaluation_callback_beside_ldm_callbacks(tmp_path):
    with initialize_config_dir(config_dir=os.path.join(REPO, "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=quickstart", "callbacks=[ldm,evaluation]",
                                                      "callbacks.evaluation.cfg_scales=[1.5,3]",
                                                      f"paths.output_dir={tmp_path}"])
    assert list(cfg.callbacks) == ["model_checkpoint", "lr_monitor", "progress_log", "checkpoint_retention", "sample_grid",
                                   "evaluation"]
    callback = hydra.utils.instantiate(cfg.callbacks.evaluation)
    assert isinstance(callback, EvaluationCallback)
    assert [s.cfg_scale for s in callback.cfg_settings] == [1.5, 3.0]
    assert {s.steps for s in callback.cfg_settings} == {cfg.sampling.steps}  # the run's other sampling settings
    assert data_identity(callback.data_identity)["resolution"] == cfg.data.resolution  # the cache key sees the data
    assert "num_workers" not in data_identity(callback.data_identity)


def test_unknown_features_name_lists_the_choices(tmp_path):
    with pytest.raises(ValueError, match="unknown feature extractor 'incep'.*inception_v3"):
        build_features({"name": "incep"}, reference_is_shapes=False, image_size=32, cache_dir=str(tmp_path))


def test_shapes_class_log_probabilities_are_the_joint_of_the_heads(classifier_path):
    extractor = load_shapes_classifier_extractor(classifier_path, RESOLUTION, train_if_missing=False)
    images = torch.randint(0, 256, (5, 3, RESOLUTION, RESOLUTION), dtype=torch.uint8)
    joint = extractor.class_log_probabilities(extractor(images))
    assert joint.shape == (5, 7 * 3 * 9)
    torch.testing.assert_close(joint.logsumexp(dim=1), torch.zeros(5), atol=1e-5, rtol=0)
    predicted = extractor.predict(images)
    expected = (predicted["color"] * 3 + predicted["shape"]) * 9 + predicted["position"]
    assert joint.argmax(dim=1).tolist() == expected.tolist()


def test_conditions_balance_classes_and_cycle_captions():
    class_model = SimpleNamespace(conditioner=SimpleNamespace(batch_key="class_label", num_classes=3))
    assert evaluation_conditions(class_model, 7, lambda n: []) == [0, 1, 2, 0, 1, 2, 0]
    text_model = SimpleNamespace(conditioner=SimpleNamespace(batch_key="caption"))
    assert evaluation_conditions(text_model, 5, lambda n: ["a", "b"]) == ["a", "b", "a", "b", "a"]
    with pytest.raises(ValueError, match="no captions"):
        evaluation_conditions(text_model, 5, lambda n: ["", ""])
    assert evaluation_conditions(SimpleNamespace(conditioner=SimpleNamespace(batch_key=None)), 3, list) == [None] * 3


def test_image_conditioned_models_need_condition_rows(shapes_folders):
    model = SimpleNamespace(conditioner=LowResConditioner(factor=4))
    with pytest.raises(ValueError, match="python evaluate.py task=sr ckpt="):
        evaluation_conditions(model, 3, list)  # no rows: a folder or a plain evaluate.py run
    rows = [{"lowres": torch.full((3, 2, 2), float(i))} for i in range(2)]
    found = evaluation_conditions(model, 3, list, rows=lambda keys, n: rows if list(keys) == ["lowres"] else [])
    assert [float(row["lowres"][0, 0, 0]) for row in found] == [0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="holds images only, no lowres"):
        ImageFolder(shapes_folders["real"], "real_dir").condition_rows(["lowres"])


def test_markdown_table_names_the_features():
    table = markdown_table({"fid": 1.5, "fid_name": "FID", "is_mean": None, "is_name": None,
                            "features": {"network": "inception_v3", "layer": "pool_2048", "dim": 2048}})
    assert "| FID | 1.5000 |" in table and "| IS mean | n/a |" in table and "inception_v3 / pool_2048" in table


# ------------------------------------------------------------------------------------ callback


class CaptionedShapes(pl.LightningDataModule):
    """Rendered shapes in the batch format of docs/architecture.md."""

    def __init__(self, count: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()
        rng = np.random.default_rng(3)
        self.samples = []
        for index in range(count):
            image, attributes = render_sample(rng, RESOLUTION)
            pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1
            self.samples.append({"image": pixels, "caption": attributes["caption"],
                                 "class_label": attributes["class_label"], "key": f"{index:08d}"})

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.samples, batch_size=4, shuffle=True)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(self.samples, batch_size=4)


def test_callback_logs_metrics_at_each_evaluation_step(tmp_path, classifier_path):
    torch.manual_seed(0)
    callback = EvaluationCallback(every_n_steps=2, num_samples=6, sampling={"steps": 2, "cfg_scale": 3.0}, batch_size=4,
                                  features={"name": "shapes_cnn", "weights_path": classifier_path},
                                  num_real=12, cache_dir=str(tmp_path / "cache"))
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=CSVLogger(tmp_path, name="csv", version=""),
                         callbacks=[callback], limit_val_batches=0, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(LatentDiffusion(**TINY_MODEL), datamodule=CaptionedShapes())
    assert [entry["step"] for entry in callback.history] == [2, 3]  # every 2 steps, and at the end
    for entry in callback.history:
        assert entry["num_samples"] == 6 and entry["num_real"] == 12 and entry["prompt_fidelity_all"] is not None
    with open(tmp_path / "csv" / "metrics.csv") as handle:
        header, *rows = handle.read().splitlines()
    assert {"eval/fid", "eval/precision", "eval/recall", "eval/prompt_fidelity_all"} <= set(header.split(","))
    with open(tmp_path / "eval" / "metrics.jsonl") as handle:
        assert [json.loads(line)["step"] for line in handle] == [2, 3]
    assert len(os.listdir(tmp_path / "cache")) == 1  # reference statistics computed once


def fit_with(callback: EvaluationCallback, model: LatentDiffusion, datamodule, tmp_path, max_steps: int = 2):
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", logger=CSVLogger(tmp_path, name="csv", version=""),
                         callbacks=[callback], limit_val_batches=0, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=datamodule)
    return trainer


def test_callback_cfg_curve_logs_each_scale_and_equals_a_single_evaluation(tmp_path, classifier_path):
    torch.manual_seed(0)
    common = dict(num_samples=6, batch_size=4, features={"name": "shapes_cnn", "weights_path": classifier_path},
                  num_real=12, cache_dir=str(tmp_path / "cache"))
    callback = EvaluationCallback(every_n_steps=2, sampling={"steps": 2, "cfg_scale": 3.0}, cfg_scales=[1, 3], **common)
    model = LatentDiffusion(**TINY_MODEL)
    trainer = fit_with(callback, model, CaptionedShapes(), tmp_path)
    (entry,) = callback.history  # step 2; the end of training is the same step
    assert [record["setting"]["cfg_scale"] for record in entry["cfg_curve"]] == [1, 3]
    with open(tmp_path / "csv" / "metrics.csv") as handle:
        header = set(handle.readline().strip().split(","))
    assert {f"eval/{key}@cfg{scale}" for key in ("fid", "precision", "recall", "prompt_fidelity_all", "seconds_per_image")
            for scale in (1, 3)} <= header and "eval/fid" in header
    table = (tmp_path / "eval" / "cfg_step0000002.md").read_text()
    assert table.count("\n| ddim | 2 |") == 2 and os.path.getsize(tmp_path / "eval" / "cfg_step0000002.png") > 0
    at_three = entry["cfg_curve"][1]
    assert at_three["fid"] == entry["fid"]  # the run's own setting is drawn once
    single = EvaluationCallback(every_n_steps=100, sampling={"steps": 2, "cfg_scale": 1.0}, **common)
    single.on_fit_start(trainer, model)
    alone = single.evaluate(trainer, model)  # the same weights, a plain evaluation at cfg 1
    at_one = entry["cfg_curve"][0]
    assert at_one["fid"] != at_three["fid"]
    for key in ("fid", "kid", "precision", "recall", "density", "coverage", "prompt_fidelity_all"):
        assert at_one[key] == pytest.approx(alone[key], rel=1e-6, abs=1e-9), key


def test_callback_evaluates_an_image_conditioned_model_on_the_val_conditions(tmp_path, classifier_path):
    """Text + inpainting (a Composite with a concat part): sampled for each val sample's own mask and image."""
    torch.manual_seed(0)
    datamodule = CaptionedShapes(count=8)
    for index, sample in enumerate(datamodule.samples):
        sample["mask"] = torch.zeros(1, RESOLUTION, RESOLUTION)
        sample["mask"][:, index:index + 12, 4:20] = 1
    inpaint = {"_target_": "ldm.models.concat_conditioners.Composite", "_convert_": "all",
               "parts": {"text": TINY_MODEL["conditioner"],
                         "inpaint": {"_target_": "ldm.models.concat_conditioners.MaskedImageConditioner"}}}
    unet = {key: value for key, value in TINY_MODEL["unet"].items() if key not in ("in_channels", "out_channels")}
    model = LatentDiffusion(**{**TINY_MODEL, "unet": unet, "conditioner": inpaint})
    callback = EvaluationCallback(every_n_steps=2, num_samples=6, sampling={"steps": 2, "cfg_scale": 3.0}, batch_size=4,
                                  features={"name": "shapes_cnn", "weights_path": classifier_path}, num_real=8,
                                  cache_dir=str(tmp_path / "cache"))
    fit_with(callback, model, datamodule, tmp_path)
    assert [entry["step"] for entry in callback.history] == [2]
    assert callback.history[0]["num_samples"] == 6 and callback.history[0]["prompt_fidelity_all"] is not None
    for condition, sample in zip(callback._conditions, datamodule.samples):  # val order, each with its caption
        assert torch.equal(condition["mask"], sample["mask"]) and torch.equal(condition["image"], sample["image"])
        assert condition["caption"] == sample["caption"]


def test_callback_missing_weights_stop_the_run_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    callback = EvaluationCallback(every_n_steps=1, num_samples=6, features="inception_v3", cache_dir=str(tmp_path))
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, callbacks=[callback], limit_val_batches=0,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    with pytest.raises(WeightsUnavailableError, match="features.weights_path="):
        trainer.fit(LatentDiffusion(**TINY_MODEL), datamodule=CaptionedShapes())
    assert trainer.global_step == 0


# ------------------------------------------------------------------------------------ sweeps over sampling settings
@pytest.mark.slow
def test_sweep_equals_single_runs_shares_seeds_and_plots(tmp_path, classifier_path, shapes_folders, tiny_ckpt):
    common = [f"ckpt={tiny_ckpt}", f"real_dir={shapes_folders['real']}", "num_samples=8", "sampling.steps=2", "sampling.sampler=ddim",
              *shapes_cnn(classifier_path, tmp_path / "cache")]
    swept = run_evaluate(*common, "sweep.cfg_scale=[1,3]", "sweep.sampler=[ddim,dpmpp_2m]", f"out={tmp_path / 'sweep'}")
    assert swept.returncode == 0, swept.stderr[-3000:]
    with open(tmp_path / "sweep" / "sweep.json") as handle:
        records = json.load(handle)["settings"]
    assert [(r["setting"]["sampler"], r["setting"]["cfg_scale"]) for r in records] == [
        ("ddim", 1), ("dpmpp_2m", 1), ("ddim", 3), ("dpmpp_2m", 3)]  # product in sweep.* key order
    assert os.path.getsize(tmp_path / "sweep" / "sweep.png") > 0
    table = (tmp_path / "sweep" / "sweep.md").read_text()
    assert table.count("\n| ddim |") == 2 and "KID_shapes_cnn" in table
    seeds = []
    for record in records:
        with open(os.path.join(record["samples_dir"], "samples.json")) as handle:
            seeds.append([sample["seed"] for sample in json.load(handle)])
        low, high = record["precision_interval"]
        assert low <= high and 0.0 <= low and high <= 1.0
    assert all(s == seeds[0] for s in seeds) and len(seeds[0]) == 8
    single = run_evaluate(*common, "sampling.cfg_scale=3", f"out={tmp_path / 'single'}")
    assert single.returncode == 0, single.stderr[-3000:]
    metrics = read_metrics(tmp_path / "single")
    for key in ("fid", "kid", "precision", "recall", "density", "coverage", "prompt_fidelity_color"):
        assert records[2][key] == pytest.approx(metrics[key], rel=1e-6, abs=1e-9), key


def test_shapes_features_on_other_images_warn_in_the_log_and_both_reports(tmp_path, classifier_path, shapes_folders,
                                                                         caplog):
    """The shapes CNN judging images that are not shapes: said in the log, metrics.json and metrics.md; on shapes
    images (a real_dir of them, known by their captions) nothing is said."""
    noise = tmp_path / "noise"
    noise.mkdir()
    rng = np.random.default_rng(0)
    for index in range(8):
        Image.fromarray(rng.integers(0, 255, (RESOLUTION, RESOLUTION, 3), dtype=np.uint8)).save(noise / f"{index}.png")
    features = {"name": "shapes_cnn", "weights_path": classifier_path}
    with caplog.at_level(logging.WARNING, logger="ldm.evaluation.evaluate"):
        metrics = evaluate(str(tmp_path / "out"), fake_dir=shapes_folders["real"], real_dir=str(noise),
                           features=features, cache_dir=str(tmp_path / "cache"), device="cpu")
    assert "features=shapes_cnn on images that are not the built-in shapes data" in metrics["warnings"][0]
    assert "trained on shapes only" in caplog.text
    assert read_metrics(tmp_path / "out")["warnings"] == metrics["warnings"]
    assert (tmp_path / "out" / "metrics.md").read_text().startswith("> **WARNING**: features=shapes_cnn")
    same = evaluate(str(tmp_path / "same"), fake_dir=shapes_folders["other"], real_dir=shapes_folders["real"],
                    features=features, cache_dir=str(tmp_path / "cache"), device="cpu")
    assert "warnings" not in same
