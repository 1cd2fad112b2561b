"""Our AutoencoderNet loads CompVis / Stability first-stage checkpoints and reproduces their outputs.

Fixtures (see tests/fixtures/README.md): tiny SD 1.x / 2.x f8 autoencoders and an LDM kl-f16
one with attention, random weights, outputs produced by the original reference code. Each model is
built as a user would, from the released architecture with the README's size overrides, never from
the fixture's config.json.
"""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from ldm.nets.vae import AutoencoderNet

PREFIX = "first_stage_model."

# SD v1/v2 first stage (f8, z 4; no attention outside the middle) at width 32 with ch_mult [1, 2, 1, 1].
TINY_SD_VAE = dict(embed_dim=4, z_channels=4, ch=32, ch_mult=[1, 2, 1, 1], num_res_blocks=2)
# LDM autoencoder_kl_16x16x16 (f16, z 16, attention at the 1/16 level, i.e. attn_resolutions [16]
# at resolution 256) at width 32 with ch_mult [1, 1, 2, 2, 1].
TINY_KL_F16 = dict(
    embed_dim=16, z_channels=16, ch=32, ch_mult=[1, 1, 2, 2, 1], num_res_blocks=2,
    attention_resolutions=[16],
)
FIXTURES = {"sd1_tiny": TINY_SD_VAE, "sd2_tiny": TINY_SD_VAE, "ldm_kl_f16_tiny": TINY_KL_F16}


def load_fixture(fixtures_dir: str, name: str) -> tuple[dict, dict]:
    weights = load_file(os.path.join(fixtures_dir, name, "model.safetensors"))
    vae_weights = {k[len(PREFIX):]: v for k, v in weights.items() if k.startswith(PREFIX)}
    return vae_weights, load_file(os.path.join(fixtures_dir, name, "io.safetensors"))


def assert_matches_reference(out: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_full_size_sd_keys_and_shapes_match_the_release(fixtures_dir):
    with open(os.path.join(fixtures_dir, "sd_v1_vae_keys.json")) as handle:
        reference = json.load(handle)["keys"]
    with torch.device("meta"):
        vae = AutoencoderNet(embed_dim=4, z_channels=4, ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2)
    ours = {PREFIX + key: list(tensor.shape) for key, tensor in vae.state_dict().items()}
    assert sorted(ours) == sorted(reference)
    assert ours == reference


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_vae_matches_reference_outputs(fixtures_dir, name):
    weights, io = load_fixture(fixtures_dir, name)
    vae = AutoencoderNet(**FIXTURES[name]).eval()
    vae.load_state_dict(weights, strict=True)
    with torch.no_grad():
        encoder_out = vae.encoder(io["image"])
        posterior = vae.encode(io["image"])
        decoded = vae.decode(posterior.mode())
    mean, raw_logvar = posterior.parameters.chunk(2, dim=1)
    assert_matches_reference(encoder_out, io["debug_encoder_out"])
    assert_matches_reference(mean, io["posterior_mean"])
    assert_matches_reference(raw_logvar, io["posterior_logvar"])
    assert_matches_reference(posterior.logvar, io["posterior_logvar_clamped"])
    assert_matches_reference(decoded, io["decoded"])


def test_swapped_decoder_levels_are_detected(fixtures_dir):
    """The tolerance is tight enough to see a mapping mistake (decoder.up in execution order)."""
    weights, io = load_fixture(fixtures_dir, "sd1_tiny")
    swapped = {
        key.replace("decoder.up.2.", "decoder.up.TMP.").replace("decoder.up.3.", "decoder.up.2.")
        .replace("decoder.up.TMP.", "decoder.up.3."): value
        for key, value in weights.items()
    }
    vae = AutoencoderNet(**TINY_SD_VAE).eval()
    vae.load_state_dict(swapped, strict=True)  # levels 2 and 3 have equal widths: shapes agree
    with torch.no_grad():
        decoded = vae.decode(vae.encode(io["image"]).mode())
    with pytest.raises(AssertionError):
        assert_matches_reference(decoded, io["decoded"])
