"""Checkpoints written before the layer reorganisation (main @ 0e4301a, tests/fixtures/legacy/) still load,
and give the outputs the code that wrote them gave (reference_outputs.safetensors, written by that code)."""
import os

import pytest
import torch
from safetensors.torch import load_file

from ldm.loading import load_autoencoder, load_latent_diffusion, upgrade_targets

LEGACY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "legacy")
SETTINGS = dict(sampler="ddim", steps=4, cfg_scale=3.0, seed=0)


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return load_file(os.path.join(LEGACY, "reference_outputs.safetensors"))


def test_stage_one_checkpoint_reconstructs_as_before(reference):
    autoencoder = load_autoencoder(os.path.join(LEGACY, "autoencoder_kl_f8.ckpt"))
    with torch.no_grad():
        reconstruction = autoencoder.vae.decode(autoencoder.vae.encode(reference["ae_input"]).mode())
    torch.testing.assert_close(reconstruction, reference["ae_reconstruction"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name, conditions", [
    ("ldm_text", ["a red circle at the top left", "a blue square"]),
    ("ldm_class", torch.tensor([0, 5])),
])
def test_stage_two_checkpoint_samples_as_before(reference, name, conditions):
    model = load_latent_diffusion(os.path.join(LEGACY, f"{name}.ckpt"))
    assert type(model.conditioner).__module__ == "ldm.models.conditioners"  # the stored _target_ was upgraded
    samples = model.generate(conditions, **SETTINGS)
    key = "text_samples" if name == "ldm_text" else "class_samples"
    torch.testing.assert_close(samples, reference[key], rtol=1e-4, atol=1e-4)


def test_legacy_targets_are_rewritten_at_any_depth():
    old = {"conditioner": {"_target_": "ldm.conditioning.ClassEmbedder", "num_classes": 3},
           "nested": [{"_target_": "ldm.interop.compvis.MissingConditioner"}], "other": {"_target_": "x.Y"}}
    new = upgrade_targets(old)
    assert new["conditioner"]["_target_"] == "ldm.models.conditioners.ClassEmbedder"
    assert new["nested"][0]["_target_"] == "ldm.models.conditioners.MissingConditioner"
    assert new["other"]["_target_"] == "x.Y" and old["conditioner"]["_target_"] == "ldm.conditioning.ClassEmbedder"
