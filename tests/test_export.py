"""Export to diffusers (checked against diffusers' own UNet2DConditionModel / AutoencoderKL /
DDIMScheduler) and to our shareable safetensors format (checked by loading it back)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from safetensors.torch import load_file

from ldm.cli.export import export
from ldm.diffusion.samplers import spaced_timesteps
from ldm.diffusion.settings import SamplerSettings
from ldm.loading import (
    load_any_first_stage,
    load_exported,
    load_sd_checkpoint,
    load_weights_into,
    save_exported,
)
from ldm.loading.diffusers_export import (
    WEIGHTS_NAME,
    diffusers_vae_config,
    export_diffusers,
    vae_to_diffusers,
)
from ldm.models.latent_diffusion import LatentDiffusion

# Attention on level 1 only (DownBlock2D and CrossAttnDownBlock2D mixed), fixed head width with
# Linear projections, 8 GroupNorm groups, and an autoencoder with an attention level.
TINY_MODEL = dict(
    unet=dict(in_channels=4, out_channels=4, model_channels=32, channel_mult=[1, 2], num_res_blocks=1,
              attention_resolutions=[2], num_head_channels=16, use_linear_in_transformer=True, context_dim=32,
              norm_groups=8),
    conditioner={"_target_": "ldm.models.conditioners.TextTransformer", "width": 32, "layers": 1, "heads": 2},
    first_stage=dict(embed_dim=4, z_channels=4, ch=16, ch_mult=[1, 2], num_res_blocks=1, attention_resolutions=[2],
                     norm_groups=8),
    image_size=16, scale_factor=0.5, prediction_type="v", ema_decay=0.9,
    schedule={"num_timesteps": 1000, "beta_schedule": "scaled_linear", "linear_start": 0.00085, "linear_end": 0.012},
)
SD1_OVERRIDES = {"unet": {"model_channels": 32, "channel_mult": [1, 2, 1, 1], "num_heads": 4},
                 "first_stage": {"ch": 32, "ch_mult": [1, 2, 1, 1]}, "conditioner": {"width": 64}, "image_size": 64}
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_matches(out: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.fixture
def tiny_model() -> LatentDiffusion:
    """A tiny text model whose EMA weights differ from its raw weights (so the exported set is visible)."""
    torch.manual_seed(0)
    model = LatentDiffusion(**TINY_MODEL).eval()
    with torch.no_grad():
        for tensor in list(model.unet.parameters()) + list(model.first_stage.parameters()):
            tensor.normal_(0, 0.05)  # zero-initialised layers would hide mapping mistakes
        for shadow in model.ema.shadows():
            shadow.add_(torch.randn_like(shadow) * 0.05)
    return model


def model_inputs(model: LatentDiffusion) -> dict:
    generator = torch.Generator().manual_seed(1)
    return {"x": torch.randn(2, 4, 4, 4, generator=generator), "t": torch.tensor([3, 900]),
            "context": torch.randn(2, 5, 32, generator=generator),
            "image": torch.rand(2, 3, 16, 16, generator=generator) * 2 - 1}


def assert_diffusers_folder_matches(out_dir: str, unet, first_stage, inputs: dict) -> None:
    """diffusers loads every tensor (key sets equal its own) and computes our outputs."""
    theirs_unet = UNet2DConditionModel.from_pretrained(out_dir, subfolder="unet").eval()
    theirs_vae = DiffusersAutoencoderKL.from_pretrained(out_dir, subfolder="vae").eval()
    for net, name in [(theirs_unet, "unet"), (theirs_vae, "vae")]:
        assert set(load_file(os.path.join(out_dir, name, WEIGHTS_NAME))) == set(net.state_dict())
    with torch.no_grad():
        ours = unet(inputs["x"], inputs["t"], context=inputs["context"])
        theirs = theirs_unet(inputs["x"], inputs["t"], encoder_hidden_states=inputs["context"]).sample
        assert_matches(theirs, ours)
        posterior = first_stage.encode(inputs["image"])
        latent = theirs_vae.encode(inputs["image"]).latent_dist
        assert_matches(latent.mean, posterior.mean)
        assert_matches(latent.logvar, posterior.parameters.chunk(2, dim=1)[1])
        assert_matches(theirs_vae.decode(latent.mean).sample, first_stage.decode(posterior.mode()))


def test_diffusers_export_of_a_trained_model_uses_ema_weights(tiny_model, tmp_path):
    not_exported = export_diffusers(tiny_model, str(tmp_path))
    inputs = model_inputs(tiny_model)
    with tiny_model.ema_weights():
        assert_diffusers_folder_matches(str(tmp_path), tiny_model.unet, tiny_model.first_stage, inputs)
    with torch.no_grad():  # and not the raw weights
        raw = tiny_model.unet(inputs["x"], inputs["t"], context=inputs["context"])
        theirs = UNet2DConditionModel.from_pretrained(str(tmp_path), subfolder="unet")(
            inputs["x"], inputs["t"], encoder_hidden_states=inputs["context"]).sample
    assert (raw - theirs).abs().max() > 1e-2 * raw.abs().max()
    # the text encoder is reported, not faked
    assert len(not_exported) == 1 and "TextTransformer" in not_exported[0]
    assert "TextTransformer" in (tmp_path / "README.md").read_text()
    assert json.loads((tmp_path / "model_index.json").read_text())["text_encoder"] == [None, None]
    assert json.loads((tmp_path / "vae" / "config.json").read_text())["scaling_factor"] == 0.5


def test_scheduler_matches_our_schedule_and_sampler_grid(tiny_model, tmp_path):
    export_diffusers(tiny_model, str(tmp_path))
    scheduler = DDIMScheduler.from_pretrained(str(tmp_path), subfolder="scheduler")
    assert scheduler.config.prediction_type == "v_prediction" and not scheduler.config.set_alpha_to_one
    torch.testing.assert_close(scheduler.alphas_cumprod.float(), tiny_model.schedule.alphas_cumprod)
    scheduler.set_timesteps(50)
    assert scheduler.timesteps.tolist() == list(spaced_timesteps(1000, 50, "leading", steps_offset=1))


@pytest.mark.parametrize("sampler, scheduler_cls", [("ddim", DDIMScheduler), ("dpmpp_2m", DPMSolverMultistepScheduler)])
def test_scheduler_follows_the_sampling_settings_and_a_zero_snr_schedule(sampler, scheduler_cls, tmp_path):
    model = LatentDiffusion(**{**TINY_MODEL, "schedule": {"zero_terminal_snr": True}})
    settings = SamplerSettings(sampler, steps=25, timestep_spacing="trailing", steps_offset=0)
    export_diffusers(model, str(tmp_path), sampling=settings)
    scheduler = scheduler_cls.from_pretrained(str(tmp_path), subfolder="scheduler")
    assert json.loads((tmp_path / "model_index.json").read_text())["scheduler"] == ["diffusers", scheduler_cls.__name__]
    assert scheduler.config.rescale_betas_zero_snr and scheduler.config.timestep_spacing == "trailing"
    ours = model.schedule.alphas_cumprod
    # diffusers' DPM-Solver stores alpha_bar_T = 2^-24 instead of 0 (see test_samplers.py); the rest is ours
    torch.testing.assert_close(scheduler.alphas_cumprod[:-1].float(), ours[:-1], atol=1e-6, rtol=0)
    assert ours[-1] == 0 and scheduler.alphas_cumprod[-1] <= 2.0**-24
    scheduler.set_timesteps(25)
    assert scheduler.timesteps.tolist() == spaced_timesteps(1000, 25, "trailing", 0)


def test_export_refuses_what_diffusers_cannot_represent(tmp_path):
    positional = LatentDiffusion(**{**TINY_MODEL, "unet": {**TINY_MODEL["unet"], "spatial_positional_embedding": True}})
    with pytest.raises(ValueError, match="spatial_positional_embedding"):
        export_diffusers(positional, str(tmp_path / "a"))
    masked = LatentDiffusion(**{**TINY_MODEL, "conditioner": {**TINY_MODEL["conditioner"], "padding_mask": True}})
    not_exported = export_diffusers(masked, str(tmp_path / "b"))
    assert any("encoder_attention_mask" in item for item in not_exported)


def test_sd1_fixture_exports_to_diffusers_exactly(fixtures_dir, tmp_path):
    model = load_sd_checkpoint(os.path.join(fixtures_dir, "sd1_tiny", "model.safetensors"), "sd1", SD1_OVERRIDES)
    export_diffusers(model, str(tmp_path), use_ema=False)
    io = load_file(os.path.join(fixtures_dir, "sd1_tiny", "io.safetensors"))
    theirs_unet = UNet2DConditionModel.from_pretrained(str(tmp_path), subfolder="unet").eval()
    theirs_vae = DiffusersAutoencoderKL.from_pretrained(str(tmp_path), subfolder="vae").eval()
    with torch.no_grad():
        for x_key, ref_key in [("x", "eps_out"), ("x16", "eps_out16")]:
            out = theirs_unet(io[x_key], io["timesteps"], encoder_hidden_states=io["context"]).sample
            assert_matches(out, io[ref_key])
        latent = theirs_vae.encode(io["image"]).latent_dist
        assert_matches(latent.mean, io["posterior_mean"])
        assert_matches(latent.logvar, io["posterior_logvar"])
        assert_matches(theirs_vae.decode(latent.mean).sample, io["decoded"])


def test_kl_f16_autoencoder_with_attention_levels_converts_exactly(fixtures_dir, tmp_path):
    vae, config = load_any_first_stage(os.path.join(fixtures_dir, "ldm_kl_f16_tiny", "model.safetensors"))
    theirs = DiffusersAutoencoderKL(**{k: v for k, v in diffusers_vae_config(config, 64, 1.0).items() if k[0] != "_"})
    theirs.load_state_dict(vae_to_diffusers(vae.state_dict(), config), strict=True)
    io = load_file(os.path.join(fixtures_dir, "ldm_kl_f16_tiny", "io.safetensors"))
    with torch.no_grad():
        latent = theirs.eval().encode(io["image"]).latent_dist
        assert_matches(latent.mean, io["posterior_mean"])
        assert_matches(theirs.decode(latent.mean).sample, io["decoded"])


def test_safetensors_export_round_trip(tiny_model, tmp_path):
    ckpt = tmp_path / "last.ckpt"
    torch.save({"hyper_parameters": dict(tiny_model.hparams), "state_dict": tiny_model.state_dict()}, ckpt)
    out = str(tmp_path / "model.safetensors")
    assert export(str(ckpt), "safetensors", out) == []
    assert not any(key.startswith("ema.") for key in load_file(out))  # the EMA weights ARE the weights
    loaded = load_exported(out)
    inputs = model_inputs(tiny_model)
    with torch.no_grad(), tiny_model.ema_weights():
        expected = tiny_model.unet(inputs["x"], inputs["t"], context=inputs["context"])
        expected_text = tiny_model.conditioner(["a red circle"])["context"]
    with torch.no_grad():
        torch.testing.assert_close(loaded.unet(inputs["x"], inputs["t"], context=inputs["context"]), expected)
        torch.testing.assert_close(loaded.conditioner(["a red circle"])["context"], expected_text)
    assert float(loaded.scale_factor) == 0.5 and loaded.hparams.prediction_type == "v"
    # an export is also a valid `init_from`
    fresh = LatentDiffusion(**TINY_MODEL)
    load_weights_into(fresh, out)
    torch.testing.assert_close(fresh.unet.state_dict(), loaded.unet.state_dict())


def test_export_without_ema_weights_is_refused(tmp_path):
    model = LatentDiffusion(**{**TINY_MODEL, "ema_decay": 0.0})
    with pytest.raises(ValueError, match="use_ema=false"):
        save_exported(model, str(tmp_path / "x.safetensors"))


def test_export_command_line_writes_a_diffusers_folder(tiny_model, tmp_path):
    ckpt = tmp_path / "last.ckpt"
    torch.save({"hyper_parameters": dict(tiny_model.hparams), "state_dict": tiny_model.state_dict()}, ckpt)
    out = tmp_path / "diffusers"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "ldm.cli.export", f"ckpt={ckpt}", "format=diffusers", f"out={out}"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "Not exported: text_encoder" in result.stderr + result.stdout
    with tiny_model.ema_weights():
        assert_diffusers_folder_matches(str(out), tiny_model.unet, tiny_model.first_stage, model_inputs(tiny_model))
