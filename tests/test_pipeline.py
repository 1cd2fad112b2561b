"""Conditions -> images (ldm/diffusion/pipeline.py) through LatentDiffusion.generate: SamplerSettings reach the
sampler whole (every spacing, every sampler), seeded image-to-image is reproducible and batch-size invariant,
and the cross-attention padding mask survives guidance."""
import pytest
import torch
from tiny_models import tiny_text_ldm

from ldm.diffusion.samplers import SAMPLERS, TIMESTEP_SPACINGS, spaced_timesteps
from ldm.diffusion.settings import SamplerSettings
from ldm.models.latent_diffusion import LatentDiffusion

TINY = tiny_text_ldm()
PROMPTS = ["a red circle at the top left", "a blue square at the center", "a green triangle at the right"]


def tiny_model(**overrides) -> LatentDiffusion:
    torch.manual_seed(0)
    model = LatentDiffusion(**{**TINY, **overrides}).eval()
    for p in model.unet.out.parameters():  # the zero-initialised output layer would make every step trivial
        torch.nn.init.normal_(p, std=0.1)
    for block in model.unet.modules():
        if hasattr(block, "proj_out"):
            torch.nn.init.normal_(block.proj_out.weight, std=0.1)  # let cross-attention (the prompt) matter
    return model


@pytest.fixture(scope="module")
def model() -> LatentDiffusion:
    return tiny_model()


@pytest.mark.parametrize("spacing", TIMESTEP_SPACINGS)
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_spacing_reaches_every_sampler_through_generate(model, sampler: str, spacing: str) -> None:
    seen = []
    hook = model.unet.register_forward_pre_hook(lambda module, args: seen.append(int(args[1][0])))
    try:
        settings = SamplerSettings(sampler, steps=4, cfg_scale=2.0, timestep_spacing=spacing, steps_offset=1)
        model.generate(PROMPTS[:1], settings=settings)
    finally:
        hook.remove()
    assert seen == spaced_timesteps(1000, 4, spacing, 1, skip_zero=SAMPLERS[sampler].skips_zero_timestep)


def test_settings_and_keyword_overrides_compose(model) -> None:
    base = SamplerSettings("ddim", steps=3, cfg_scale=2.0, seed=4)
    reference = model.generate(PROMPTS[:2], settings=base)
    torch.testing.assert_close(model.generate(PROMPTS[:2], sampler="ddim", steps=3, cfg_scale=2.0, seed=4), reference)
    torch.testing.assert_close(model.generate(PROMPTS[:2], settings={"steps": 3, "cfg_scale": 2.0, "seed": 4}), reference)
    strong = model.generate(PROMPTS[:2], settings=base, cfg_scale=50.0)  # an untrained model's prompts differ little
    rescaled = model.generate(PROMPTS[:2], settings=base, cfg_scale=50.0, guidance_rescale=1.0)
    assert (rescaled - strong).abs().max() > 1e-3  # guidance_rescale reaches the denoiser
    with pytest.raises(ValueError, match="unknown sampling setting"):
        model.generate(PROMPTS[:1], settings=base, step=3)


def test_seeded_img2img_is_reproducible_and_batch_size_invariant(model) -> None:
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    settings = SamplerSettings("ddim", steps=6, cfg_scale=2.0, seed=11)
    torch.manual_seed(123)  # the global RNG must not matter
    batch = model.generate(PROMPTS, settings=settings, init_images=images, strength=0.5)
    torch.manual_seed(456)
    again = model.generate(PROMPTS, settings=settings, init_images=images, strength=0.5)
    assert torch.equal(batch, again)
    for i in range(3):
        alone = model.generate(PROMPTS[i:i + 1], settings=settings, init_images=images[i:i + 1], strength=0.5,
                               seed_offset=i)
        torch.testing.assert_close(alone, batch[i:i + 1], atol=1e-5, rtol=0)
    other_seed = model.generate(PROMPTS, settings=SamplerSettings("ddim", steps=6, cfg_scale=2.0, seed=12),
                                init_images=images, strength=0.5)
    assert (other_seed - batch).abs().max() > 1e-3


def test_encode_draws_the_posterior_from_per_sample_generators(model) -> None:
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    make = lambda: [torch.Generator().manual_seed(s) for s in (5, 6)]  # noqa: E731
    both = model.encode(images, make())
    second_alone = model.encode(images[1:], make()[1:])
    torch.testing.assert_close(both[1:], second_alone, atol=1e-6, rtol=0)
    posterior = model.first_stage.encode(images)
    expected = (posterior.mean + posterior.std * torch.randn(1, *posterior.mean.shape[1:],
                                                             generator=torch.Generator().manual_seed(5))[0]) * 0.5
    torch.testing.assert_close(both[0], expected[0], atol=1e-6, rtol=0)


def test_padding_mask_model_samples_with_guidance_and_ignores_padding_states() -> None:
    masked = tiny_model(conditioner={**TINY["conditioner"], "padding_mask": True})
    cond = masked.conditioner(PROMPTS[:2])
    assert set(cond) == {"context", "context_mask"} and cond["context_mask"].dtype == torch.bool
    images = masked.generate(PROMPTS[:2], steps=3, cfg_scale=3.0)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    # what the encoder writes into the padding states no longer reaches the UNet
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([500, 500])
    scrambled = cond["context"].clone()
    scrambled[~cond["context_mask"]] = torch.randn(int((~cond["context_mask"]).sum()), 32)
    with torch.no_grad():
        out = masked.unet(x, t, **cond)
        torch.testing.assert_close(masked.unet(x, t, context=scrambled, context_mask=cond["context_mask"]), out,
                                   atol=1e-5, rtol=0)
        assert (masked.unet(x, t, context=scrambled) - out).abs().max() > 1e-4  # without the mask they do
