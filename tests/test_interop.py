"""CompVis / Stable Diffusion checkpoints load through the public import path and reproduce the
reference outputs (fixtures: tests/fixtures/README.md).

Models are built as a user would: the sd1 / sd2 presets with the README's size overrides (width 32,
channel_mult [1, 2, 1, 1], context width 64, and the head layout that reproduces the fixture: the
head count is invisible in the weights), or, for kl-f16, an architecture inferred from the file.
The fixtures' config.json is never read.
"""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm.loading import (
    CheckpointMismatchError,
    load_any_first_stage,
    load_compvis_first_stage,
    load_sd_checkpoint,
    load_weights_into,
)
from ldm.loading.stable_diffusion import sd_model_config
from ldm.models.conditioners import MissingConditioner
from ldm.nets.unet import UNetModel
from ldm.nets.vae import AutoencoderNet

TINY = {"unet": {"model_channels": 32, "channel_mult": [1, 2, 1, 1]},
        "first_stage": {"ch": 32, "ch_mult": [1, 2, 1, 1]}, "conditioner": {"width": 64}}
SIZE_OVERRIDES = {
    "sd1": {**TINY, "unet": {**TINY["unet"], "num_heads": 4}},
    "sd2": {**TINY, "unet": {**TINY["unet"], "num_head_channels": 8}},
}
PRESET_OF = {"sd1_tiny": "sd1", "sd2_tiny": "sd2"}
SCHEDULE_BUFFERS = ["betas", "alphas_cumprod", "posterior_mean_coef2"]


def fixture_file(fixtures_dir: str, name: str, file: str = "model.safetensors") -> str:
    return os.path.join(fixtures_dir, name, file)


def assert_matches_reference(out: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def assert_unet_matches(unet, io: dict) -> None:
    with torch.no_grad():
        for x_key, ref_key in [("x", "eps_out"), ("x16", "eps_out16")]:
            assert_matches_reference(unet(io[x_key], io["timesteps"], context=io["context"]), io[ref_key])


def assert_autoencoder_matches(vae, io: dict) -> None:
    with torch.no_grad():
        posterior = vae.encode(io["image"])
        decoded = vae.decode(posterior.mode())
    mean, raw_logvar = posterior.parameters.chunk(2, dim=1)
    assert_matches_reference(mean, io["posterior_mean"])
    assert_matches_reference(raw_logvar, io["posterior_logvar"])
    assert_matches_reference(decoded, io["decoded"])


@pytest.mark.parametrize("name", ["sd1_tiny", "sd2_tiny"])
def test_sd_checkpoint_reproduces_reference_outputs(fixtures_dir, name):
    preset = PRESET_OF[name]
    model = load_sd_checkpoint(fixture_file(fixtures_dir, name), preset, size_overrides=SIZE_OVERRIDES[preset])
    io = load_file(fixture_file(fixtures_dir, name, "io.safetensors"))
    assert_unet_matches(model.unet, io)
    assert_autoencoder_matches(model.first_stage, io)
    assert model.hparams.prediction_type == ("eps" if preset == "sd1" else "v")
    assert float(model.scale_factor) == pytest.approx(0.18215)
    # no text encoder in the file: a placeholder that says which one to supply
    assert isinstance(model.conditioner, MissingConditioner)
    with pytest.raises(RuntimeError, match="FrozenOpenCLIP"):
        model.generate(["a prompt"], steps=1)


def test_kl_f16_first_stage_architecture_is_inferred(fixtures_dir):
    vae, config = load_any_first_stage(fixture_file(fixtures_dir, "ldm_kl_f16_tiny"))
    assert config == {"embed_dim": 16, "z_channels": 16, "ch": 32, "ch_mult": [1, 1, 2, 2, 1], "num_res_blocks": 2,
                      "attention_resolutions": [16], "in_channels": 3, "out_channels": 3}
    assert_autoencoder_matches(vae, load_file(fixture_file(fixtures_dir, "ldm_kl_f16_tiny", "io.safetensors")))


def test_standalone_first_stage_ckpt_with_loss_keys(fixtures_dir, tmp_path):
    """A CompVis first-stage training checkpoint: bare keys, `loss.*` tensors, pickled `.ckpt`."""
    weights = load_file(fixture_file(fixtures_dir, "sd1_tiny"))
    bare = {k.removeprefix("first_stage_model."): v for k, v in weights.items() if k.startswith("first_stage_model.")}
    path = tmp_path / "kl-f8.ckpt"
    torch.save({"state_dict": {**bare, "loss.logvar": torch.zeros(())}, "global_step": 7}, path)
    vae, config = load_compvis_first_stage(str(path))
    assert (config["ch_mult"], config["attention_resolutions"], config["embed_dim"]) == ([1, 2, 1, 1], [], 4)
    assert_autoencoder_matches(vae, load_file(fixture_file(fixtures_dir, "sd1_tiny", "io.safetensors")))


def test_ldm_autoencoder_run_checkpoint_loads_with_its_own_config(tmp_path):
    config = {"embed_dim": 4, "z_channels": 4, "ch": 16, "ch_mult": [1, 2], "num_res_blocks": 1, "norm_groups": 8}
    vae = AutoencoderNet(**config)
    path = tmp_path / "last.ckpt"
    torch.save({"hyper_parameters": {"vae": config}, "state_dict": {f"vae.{k}": v for k, v in vae.state_dict().items()}}, path)
    loaded, loaded_config = load_any_first_stage(str(path))
    assert loaded_config == config  # norm_groups=8 comes from the hparams, not guessed
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(loaded.encode(image).mode()), vae.decode(vae.encode(image).mode()))


@pytest.mark.parametrize("name, wrong, right", [("sd2_tiny", "sd1", "sd2"), ("sd1_tiny", "sd2", "sd1")])
def test_wrong_preset_names_the_right_one(fixtures_dir, name, wrong, right):
    with pytest.raises(CheckpointMismatchError) as error:
        load_sd_checkpoint(fixture_file(fixtures_dir, name), wrong, size_overrides=SIZE_OVERRIDES[wrong])
    message = str(error.value)
    assert "mis-shaped keys" in message and "proj_in.weight" in message
    assert f"preset='{right}'" in message


def test_partial_checkpoint_is_never_silent(fixtures_dir, tmp_path):
    weights = load_file(fixture_file(fixtures_dir, "sd1_tiny"))
    del weights["model.diffusion_model.out.2.weight"]
    weights["model.diffusion_model.extra.weight"] = torch.zeros(1)
    save_file(weights, tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"1 missing keys \[unet.out.2.weight\]; 1 unexpected keys"):
        load_sd_checkpoint(str(tmp_path / "broken.safetensors"), "sd1", size_overrides=SIZE_OVERRIDES["sd1"])


def test_ema_weights_and_ignored_buffers(fixtures_dir, tmp_path):
    """use_ema=True takes model_ema.diffusion_model<name without dots>; schedule buffers are ignored."""
    weights = load_file(fixture_file(fixtures_dir, "sd1_tiny"))
    checkpoint = {k: (torch.zeros_like(v) if k.startswith("model.diffusion_model.") else v) for k, v in weights.items()}
    checkpoint |= {"model_ema." + k.removeprefix("model.").replace(".", ""): v
                   for k, v in weights.items() if k.startswith("model.diffusion_model.")}
    checkpoint |= {name: torch.linspace(0, 1, 1000) for name in SCHEDULE_BUFFERS}
    checkpoint |= {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(10)}
    path = tmp_path / "with_ema.ckpt"
    torch.save({"state_dict": checkpoint}, path)
    io = load_file(fixture_file(fixtures_dir, "sd1_tiny", "io.safetensors"))
    model = load_sd_checkpoint(str(path), "sd1", size_overrides=SIZE_OVERRIDES["sd1"], use_ema=True)
    assert_unet_matches(model.unet, io)
    raw = load_sd_checkpoint(str(path), "sd1", size_overrides=SIZE_OVERRIDES["sd1"], use_ema=False)
    assert all(not p.detach().any() for p in raw.unet.parameters())
    with pytest.raises(CheckpointMismatchError, match="use_ema=False"):
        load_sd_checkpoint(fixture_file(fixtures_dir, "sd1_tiny"), "sd1", SIZE_OVERRIDES["sd1"], use_ema=True)


def test_init_from_loads_into_a_training_model_and_restarts_ema(fixtures_dir):
    from ldm.models.latent_diffusion import LatentDiffusion

    config = sd_model_config("sd1", SIZE_OVERRIDES["sd1"])
    config["conditioner"] = {"_target_": "ldm.models.conditioners.MissingConditioner", "output_dim": 64, "needed": "a text encoder"}
    model = LatentDiffusion(**{**config, "ema_decay": 0.999})
    load_weights_into(model, fixture_file(fixtures_dir, "sd1_tiny"))
    io = load_file(fixture_file(fixtures_dir, "sd1_tiny", "io.safetensors"))
    assert_unet_matches(model.unet, io)
    assert_autoencoder_matches(model.first_stage, io)
    for shadow, param in zip(model.ema.shadows(), model.unet.parameters()):
        assert torch.equal(shadow, param)


def test_full_size_sd1_preset_matches_the_release_keys(fixtures_dir):
    config = sd_model_config("sd1")
    assert config["unet"].get("in_channels") is None  # derived by LatentDiffusion: latent channels (+ concat)
    channels = {"in_channels": config["first_stage"]["embed_dim"], "out_channels": config["first_stage"]["embed_dim"]}
    with torch.device("meta"):
        unet = UNetModel(**{**config["unet"], **channels})
        vae = AutoencoderNet(**config["first_stage"])
    for net, prefix, file in [(unet, "model.diffusion_model.", "sd_v1_unet_keys.json"),
                              (vae, "first_stage_model.", "sd_v1_vae_keys.json")]:
        with open(os.path.join(fixtures_dir, file)) as handle:
            reference = json.load(handle)["keys"]
        assert {prefix + k: list(v.shape) for k, v in net.state_dict().items()} == reference


@pytest.mark.parametrize("preset", ["sd1", "sd2"])
def test_hydra_preset_agrees_with_the_plain_reading(preset, repo_root, tmp_path):
    """`train.py experiment=ldm_f8_text model=<preset>` composes the architecture load_sd_checkpoint builds."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "stub.yaml").write_text("resolution: 512\nbatch_size: 2\n")  # any data group will do
    overrides = ["data=stub", f"hydra.searchpath=[file://{tmp_path}]", "experiment=ldm_f8_text", f"model={preset}"]
    with initialize_config_dir(config_dir=os.path.join(repo_root, "configs"), version_base="1.3"):
        composed = OmegaConf.to_container(compose("train", overrides=overrides).model, resolve=True)
    plain = sd_model_config(preset)
    for key in ("scale_factor", "prediction_type", "image_size"):
        assert composed[key] == plain[key]
    for key in ("unet", "first_stage", "schedule", "conditioner"):  # Hydra adds defaults (dropout, checkpoint_path)
        assert {k: composed[key][k] for k in plain[key]} == plain[key]
    with torch.device("meta"):
        UNetModel(**{**composed["unet"], "in_channels": 4, "out_channels": 4})  # LatentDiffusion derives these
