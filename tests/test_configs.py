"""Every experiment composes, the size presets shrink networks without changing their structure,
and a mistyped key is a clear error."""
import os
from types import SimpleNamespace

import hydra
import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf, open_dict

from ldm.diffusion.settings import SamplerSettings
from ldm.models.optimization import effective_learning_rate
from ldm.training.run_config import config_hash, resolve_ckpt_path
from ldm.training.stages import first_stage_config

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
EXPERIMENTS = sorted(f[:-5] for f in os.listdir(os.path.join(CONFIG_DIR, "experiment")) if f.endswith(".yaml"))


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=False)


def widths(cfg) -> dict:
    model = cfg.model
    if "vae" in model:
        return {"ch": model.vae.ch, "blocks": model.vae.num_res_blocks, "mult": list(model.vae.ch_mult)}
    return {"ch": model.unet.model_channels, "blocks": model.unet.num_res_blocks, "mult": list(model.unet.channel_mult)}


def test_all_contract_experiments_exist():
    for name in ["ae_kl_f4", "ae_kl_f8", "ae_kl_f16", "ldm_f4_text", "ldm_f8_text", "ldm_f16_text",
                 "ldm_f8_class", "ldm_f8_uncond", "quickstart", "ldm_sr_f4", "ldm_inpaint_f4", "ldm_inpaint_f8",
                 "ldm_semantic_f4"]:
        assert name in EXPERIMENTS


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_tiny_keeps_structure(experiment):
    paper = compose_train([f"experiment={experiment}", "size=paper"])
    tiny = compose_train([f"experiment={experiment}", "size=tiny"])
    OmegaConf.to_container(tiny.model, resolve=True)  # every interpolation resolves
    assert widths(tiny)["ch"] < widths(paper)["ch"]
    assert widths(tiny)["mult"] == widths(paper)["mult"]  # same factor / depth structure
    if "unet" in tiny.model:
        attention = tiny.model.unet.attention_resolutions
        assert list(attention) == list(paper.model.unet.attention_resolutions)
        if tiny.model.unet.get("context_dim") is not None:
            conditioner = tiny.model.conditioner
            text = conditioner.parts.text if "parts" in conditioner else conditioner  # a Composite's text part
            assert tiny.model.unet.context_dim == text.width


def test_size_preset_adds_nothing_and_command_line_wins():
    cfg = compose_train(["experiment=ae_kl_f8", "size=tiny"])
    assert "unet" not in cfg.model and "conditioner" not in cfg.model
    assert cfg.model.vae.ch == 16 and cfg.model.vae.norm_groups == 8
    explicit = compose_train(["experiment=ae_kl_f8", "size=tiny", "model.vae.ch=24"])
    assert explicit.model.vae.ch == 24
    text = compose_train(["experiment=ldm_f8_text", "size=small"])
    assert text.model.conditioner.width == 128 and text.model.unet.context_dim == 128
    classes = compose_train(["experiment=ldm_f8_class", "size=small"])
    assert "width" not in classes.model.conditioner and classes.model.unet.class_embed_dim == 128


def test_factor_experiments_set_latent_channels():
    for f, channels in [(4, 3), (8, 4), (16, 16)]:
        ae = compose_train([f"experiment=ae_kl_f{f}"])
        assert 2 ** (len(ae.model.vae.ch_mult) - 1) == f
        assert ae.model.vae.embed_dim == channels
        ldm = compose_train([f"experiment=ldm_f{f}_text"])
        assert ldm.model.unet.in_channels is None and ldm.model.unet.out_channels is None  # derived at build
        assert ldm.first_stage.experiment == f"ae_kl_f{f}"


def test_unknown_key_is_a_clear_error():
    with pytest.raises(ConfigCompositionException) as info:
        compose_train(["experiment=ae_kl_f8", "model.vae.chanels=3"])
    message = str(info.value) + str(info.value.__cause__)
    assert "chanels" in message


def test_unknown_experiment_is_a_clear_error():
    with pytest.raises(ConfigCompositionException) as info:
        compose_train(["experiment=ae_kl_f32"])
    assert "ae_kl_f32" in str(info.value)


def test_config_hash_ignores_paths_only():
    a = OmegaConf.create({"model": {"x": 1}, "paths": {"output_dir": "/a"}})
    b = OmegaConf.create({"model": {"x": 1}, "paths": {"output_dir": "/b"}})
    c = OmegaConf.create({"model": {"x": 2}, "paths": {"output_dir": "/a"}})
    assert config_hash(a) == config_hash(b) != config_hash(c)


def test_stage_one_cache_key_ignores_stage_two_knobs_of_the_size_preset():
    """size.text_vocabulary is read by stage 2 only; the autoencoder's widths (size_model) still change the key."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        keys = [config_hash(first_stage_config(compose(config_name="train", overrides=["size=small", *extra])))
                for extra in ([], ["size.text_vocabulary=null"], ["size.text_encoder.width=64"])]
        tiny = config_hash(first_stage_config(compose(config_name="train", overrides=["size=tiny"])))
    assert len(set(keys)) == 1 and tiny != keys[0]


def test_ckpt_path_last_finds_newest(tmp_path):
    for run, mtime in [("2026-01-01_00-00-00", 100), ("2026-01-02_00-00-00", 200)]:
        path = tmp_path / "ae" / "runs" / run / "checkpoints" / "last.ckpt"
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
        os.utime(path, (mtime, mtime))
    assert resolve_ckpt_path("last", str(tmp_path), "ae").endswith("2026-01-02_00-00-00/checkpoints/last.ckpt")
    with pytest.raises(FileNotFoundError, match="ckpt_path=last"):
        resolve_ckpt_path("last", str(tmp_path), "other")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_ckpt_path(str(tmp_path / "nope.ckpt"), str(tmp_path), "ae")


def test_first_stage_reads_the_parent_data_set_with_its_own_batch_size_and_overrides():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        parent = compose(config_name="train", overrides=["experiment=quickstart", "data.num_train=500",
                                                         "data.num_workers=1"])
        with open_dict(parent):
            parent.first_stage.overrides = ["data.num_workers=0", "trainer.max_steps=7"]
        stage1 = first_stage_config(parent)
    assert parent.data.batch_size == 32
    assert stage1.data.batch_size == 8 and stage1.model.batch_size == 8  # size=small's stage-1 preset
    assert stage1.data.num_workers == 0 and stage1.trainer.max_steps == 7  # explicit first_stage.overrides
    assert stage1.data.num_train == 500 and stage1.data.root == parent.data.root  # the parent's data set
    assert stage1.model.vae.ch_mult == [1, 2, 4]  # quickstart's f=4 first stage


@pytest.mark.parametrize("factor", [4, 8, 16])
@pytest.mark.parametrize("world_size", [1, 8])
def test_paper_text_experiments_train_at_the_target_rate_whatever_the_batch(factor, world_size):
    """CompVis' txt2img base_learning_rate 5e-5 is the rate itself (scale_lr false), not 5e-5 x 32 x GPUs."""
    cfg = compose_train([f"experiment=ldm_f{factor}_text", "size=paper"])
    trainer = SimpleNamespace(world_size=world_size, accumulate_grad_batches=2)
    rate = effective_learning_rate(cfg.model.learning_rate, cfg.model.scale_lr, trainer, cfg.model.batch_size)
    assert rate == 5e-5
    assert cfg.model.weight_decay == 0.01  # CompVis: torch.optim.AdamW's default
    # scale_lr keeps CompVis' per-sample semantics: base x batch x devices x accumulation
    assert effective_learning_rate(1e-6, True, trainer, 32) == pytest.approx(1e-6 * 32 * world_size * 2)


def test_one_sampling_group_feeds_grids_evaluation_and_after_training():
    cfg = compose_train(["experiment=quickstart", "callbacks=[ldm,evaluation]"])
    sampling = OmegaConf.to_container(cfg.sampling, resolve=True)
    assert sampling["sampler"] == "dpmpp_2m" and sampling["steps"] == 20  # quickstart: sampling=fast
    for node in (cfg.callbacks.sample_grid.sampling, cfg.callbacks.evaluation.sampling,
                 cfg.after_training.samples.sampling, cfg.after_training.evaluation.sampling):
        assert OmegaConf.to_container(node, resolve=True) == sampling
    grid = hydra.utils.instantiate(cfg.callbacks.sample_grid)
    assert grid.settings == SamplerSettings.of(sampling)
    zero_snr = compose_train(["experiment=quickstart", "sampling=zero_snr", "sampling.steps=30"])
    settings = SamplerSettings.of(OmegaConf.to_container(zero_snr.sampling, resolve=True))
    assert (settings.timestep_spacing, settings.steps_offset, settings.guidance_rescale, settings.steps) == (
        "trailing", 0, 0.7, 30)
    assert SamplerSettings.of(OmegaConf.to_container(compose_train([]).sampling)) == SamplerSettings(
        "dpmpp_2m", 20, cfg_scale=3.0, timestep_spacing="trailing", steps_offset=0)  # the quickstart: zero-SNR
    paper = compose_train(["experiment=quickstart_paper"])
    assert SamplerSettings.of(OmegaConf.to_container(paper.sampling)) == SamplerSettings("dpmpp_2m", 20, cfg_scale=3.0)
    assert (paper.model.prediction_type, paper.model.schedule.zero_terminal_snr) == ("eps", False)
    for experiment, expected in (("ldm_semantic_f4", ("v", True, "trailing", 0)),
                                 ("ldm_semantic_f4_paper", ("eps", False, "leading", 1))):
        semantic = compose_train([f"experiment={experiment}"])
        assert (semantic.model.prediction_type, semantic.model.schedule.zero_terminal_snr,
                semantic.sampling.timestep_spacing, semantic.sampling.steps_offset) == expected
    assert SamplerSettings.of(OmegaConf.to_container(
        compose_train(["experiment=ldm_f8_text"]).sampling)) == SamplerSettings()  # the group's default = the class's


def test_sampling_configs_of_every_entry_point_are_the_group(repo_root):
    for config_name in ("sample", "evaluate", "export"):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=["ckpt=x", "out=y", "sampling.timestep_spacing=linspace"])
        assert SamplerSettings.of(OmegaConf.to_container(cfg.sampling)).timestep_spacing == "linspace"
        for key in ("sampler", "steps", "cfg_scale", "eta"):  # restated nowhere else
            assert key not in cfg


@pytest.mark.parametrize("data", ["shapes", "webdataset"])
def test_class_models_pass_their_class_count_to_the_data_layer_and_stage_one_reads_no_labels(data, tmp_path):
    """A .cls outside the model's classes is skipped where it is decoded, not raised by the conditioner later."""
    import hydra

    extra = [f"data.train_urls={tmp_path}/x.tar"] if data == "webdataset" else []
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=ldm_f8_class", "size=tiny", f"data={data}",
                                          "model.conditioner.num_classes=7", f"paths.data_dir={tmp_path}", *extra])
        stage1 = first_stage_config(cfg)
    assert hydra.utils.instantiate(cfg.data).num_classes == 7
    assert "num_classes" not in stage1.data  # stage 1 reads no labels: its cache key is unchanged
    text = compose_train(["experiment=ldm_f8_text", "size=tiny", f"paths.data_dir={tmp_path}"])
    assert hydra.utils.instantiate(text.data).num_classes is None


def test_image_conditioned_tasks_share_one_first_stage():
    """Degradations and semantic maps are stage-2 conditions: the stage-1 config (and cache key) ignores them."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        stage1 = {name: first_stage_config(compose(config_name="train", overrides=[f"experiment={name}", "size=small"]))
                  for name in ("ldm_f4_text", "ldm_sr_f4", "ldm_inpaint_f4", "ldm_semantic_f4")}
    assert len({config_hash(cfg) for cfg in stage1.values()}) == 1
    assert "degradations" not in stage1["ldm_sr_f4"].data and "semantic_map" not in stage1["ldm_semantic_f4"].data


def test_quickstart_inpaint_is_the_quickstart_model_with_the_masked_image_concatenated():
    """init_from a quickstart run needs the same UNet, text encoder, schedule and autoencoder (the stage-1 cache
    key is the quickstart's, so a user's run reuses the one already trained); only the concat condition is new."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        text, inpaint = (compose(config_name="train", overrides=[f"experiment={name}"])
                         for name in ("quickstart", "quickstart_inpaint"))
        assert config_hash(first_stage_config(text)) == config_hash(first_stage_config(inpaint))
    text_model, inpaint_model = (OmegaConf.to_container(cfg.model, resolve=True) for cfg in (text, inpaint))
    assert inpaint_model["conditioner"]["parts"]["text"] == text_model["conditioner"]
    assert inpaint_model["conditioner"]["drop"] == ["text"]  # guidance drops the caption, never the image
    assert {key: value for key, value in inpaint_model.items() if key != "conditioner"} == {
        key: value for key, value in text_model.items() if key != "conditioner"}
    assert inpaint.sampling == text.sampling and inpaint.data.degradations.mask.weights.box == 1.0
    assert inpaint.after_training.samples is None  # the quickstart's text-only grid cannot sample an inpainting model
    assert (inpaint.after_training.evaluation._target_, inpaint.after_training.evaluation.task) == (
        "ldm.evaluation.tasks.evaluate_task", "inpaint")
