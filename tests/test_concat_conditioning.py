"""Concatenation conditioning (LDM paper, Fig. 3): what each concat conditioner gives at the latent size, the
UNet channels LatentDiffusion derives, classifier-free guidance dropping exactly a Composite's `drop` parts, and
init_from of a concat model from a text-to-image checkpoint (extra input channels start at zero)."""
import pytest
import torch
import torch.nn.functional as F

from ldm.loading.init_from import load_weights_into
from ldm.models.concat_conditioners import (
    Composite,
    LowResConditioner,
    MaskedImageConditioner,
    SemanticMapConditioner,
    condition,
    unet_inputs,
)
from ldm.models.conditioners import TextTransformer
from ldm.models.latent_diffusion import LatentDiffusion

FIRST_STAGE = dict(embed_dim=4, z_channels=4, ch=16, ch_mult=[1, 2, 2], num_res_blocks=1, norm_groups=8)  # f=4
UNET = dict(model_channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[2], num_head_channels=8,
            norm_groups=8)
TEXT = {"_target_": "ldm.models.conditioners.TextTransformer", "width": 32, "layers": 1, "heads": 2}
INPAINT = {"_target_": "ldm.models.concat_conditioners.MaskedImageConditioner"}
LOWRES = {"_target_": "ldm.models.concat_conditioners.LowResConditioner", "factor": 4}
SEMANTIC = {"_target_": "ldm.models.concat_conditioners.SemanticMapConditioner", "num_classes": 5}


def composite(drop=None) -> dict:
    return {"_target_": "ldm.models.concat_conditioners.Composite", "_convert_": "all",
            "parts": {"text": TEXT, "inpaint": INPAINT}, "drop": drop}


def build(conditioner: dict, **unet_extra) -> LatentDiffusion:
    torch.manual_seed(0)
    context = {"context_dim": 32} if conditioner in (TEXT,) or conditioner.get("parts") else {"context_dim": None}
    return LatentDiffusion(unet={**UNET, **context, **unet_extra}, conditioner=conditioner, first_stage=FIRST_STAGE,
                           image_size=32, scale_factor=0.7, ema_decay=0.0)


def inpaint_batch(n: int = 2) -> dict:
    torch.manual_seed(1)
    mask = torch.zeros(n, 1, 32, 32)
    mask[:, :, 4:13, 20:30] = 1
    return {"caption": ["a red circle"] * n, "image": torch.rand(n, 3, 32, 32) * 2 - 1, "mask": mask}


def encode(images: torch.Tensor) -> torch.Tensor:  # a stand-in first stage: average-pool f=4, 4 channels
    return F.avg_pool2d(images, 4).repeat(1, 2, 1, 1)[:, :4]


# ---------------------------------------------------------------- what each conditioner concatenates
def test_lowres_is_resized_to_the_latent_size_and_kept_when_it_fits():
    lowres = torch.rand(2, 3, 8, 8) * 2 - 1
    part = LowResConditioner(factor=4)
    same = part(lowres, latent_size=(8, 8))["concat"]
    assert torch.equal(same, lowres) and part.concat_channels(4) == 3
    resized = part(lowres, latent_size=(4, 4))["concat"]  # f=8 latents of a x4 SR: half the low-res side
    torch.testing.assert_close(resized, F.interpolate(lowres, size=(4, 4), mode="bicubic", antialias=True))


def test_masked_image_is_mask_then_encoded_masked_pixels():
    batch = inpaint_batch()
    concat = MaskedImageConditioner()({"image": batch["image"], "mask": batch["mask"]}, latent_size=(8, 8),
                                      encode=encode)["concat"]
    assert concat.shape == (2, 1 + 4, 8, 8)
    expected_mask = torch.zeros(2, 1, 8, 8)
    expected_mask[:, :, 1:4, 5:8] = 1  # pixels 4..12 x 20..29: every latent cell touching them (max-pooling)
    assert torch.equal(concat[:, :1], expected_mask)
    torch.testing.assert_close(concat[:, 1:], encode(batch["image"] * (1 - batch["mask"])))


def test_semantic_map_is_an_area_rescaled_one_hot():
    labels = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    labels[0, 0, :4, :2] = 3  # half of the top-left 4x4 cell is class 3
    concat = SemanticMapConditioner(num_classes=5)(labels, latent_size=(2, 2))["concat"]
    assert concat.shape == (1, 5, 2, 2)
    torch.testing.assert_close(concat.sum(1), torch.ones(1, 2, 2))
    assert concat[0, 3, 0, 0] == 0.5 and concat[0, 0, 0, 0] == 0.5 and concat[0, 0, 1, 1] == 1.0
    with pytest.raises(ValueError, match=r"class indices in \[0, 5\)"):
        SemanticMapConditioner(num_classes=5)(labels + 3, latent_size=(2, 2))


# ---------------------------------------------------------------- channels
@pytest.mark.parametrize("conditioner, in_channels", [(TEXT, 4), (LOWRES, 4 + 3), (SEMANTIC, 4 + 5),
                                                      (composite(), 4 + 4 + 1)])
def test_unet_channels_are_derived_from_first_stage_and_conditioner(conditioner, in_channels):
    model = build(conditioner)
    assert (model.unet.in_channels, model.unet.out_channels) == (in_channels, 4)
    assert model.unet.input_blocks[0][0].weight.shape[1] == in_channels
    assert build(conditioner, in_channels=in_channels, out_channels=4).unet.in_channels == in_channels  # explicit ok


def test_explicit_wrong_channels_name_the_derived_value():
    with pytest.raises(ValueError, match=r"in_channels=4, .*plus 3 concatenated condition channels: in_channels must be 7"):
        build(LOWRES, in_channels=4)
    with pytest.raises(ValueError, match=r"model.unet.out_channels=7, .*out_channels must be 4"):
        build(LOWRES, out_channels=7)


def test_forward_stacks_concat_on_the_latents():
    model = build(LOWRES)
    z, lowres = torch.randn(2, 4, 8, 8), torch.rand(2, 3, 8, 8)
    t = torch.tensor([10, 500])
    cond = model.conditioning({"lowres": lowres}, None, latent_size=(8, 8))
    torch.testing.assert_close(model(z, t, cond), model.unet(torch.cat([z, lowres], 1), t))
    with pytest.raises(ValueError, match="does not fit the latents"):
        unet_inputs(torch.randn(2, 4, 4, 4), cond)


# ---------------------------------------------------------------- classifier-free guidance
def test_composite_drops_exactly_its_drop_parts():
    batch = inpaint_batch()
    drop = torch.tensor([True, False])
    for parts_dropped in (["text"], ["text", "inpaint"], ["inpaint"]):
        torch.manual_seed(0)
        conditioner = Composite({"text": TextTransformer(width=32, layers=1, heads=2), "inpaint": MaskedImageConditioner()},
                                drop=parts_dropped)
        kept = condition(conditioner, batch, None, latent_size=(8, 8), encode=encode)
        dropped = condition(conditioner, batch, drop, latent_size=(8, 8), encode=encode)
        null_text = conditioner.parts["text"]([""], drop_mask=None)["context"]
        assert torch.equal(dropped["context"][1], kept["context"][1])  # rows not dropped are untouched
        assert torch.equal(dropped["concat"][1], kept["concat"][1])
        if "text" in parts_dropped:
            torch.testing.assert_close(dropped["context"][0], null_text[0])
        else:
            assert torch.equal(dropped["context"][0], kept["context"][0])
        if "inpaint" in parts_dropped:
            assert not dropped["concat"][0].any()
        else:
            assert torch.equal(dropped["concat"][0], kept["concat"][0])


def test_default_drop_is_the_text_and_concat_alone_is_never_dropped():
    conditioner = Composite({"text": TextTransformer(width=32, layers=1, heads=2), "inpaint": MaskedImageConditioner()})
    assert conditioner.drop == ["text"] and conditioner.droppable
    lowres = torch.rand(2, 3, 8, 8)
    out = condition(LowResConditioner(), {"lowres": lowres}, torch.ones(2, dtype=torch.bool), latent_size=(8, 8))
    assert torch.equal(out["concat"], lowres)
    with pytest.raises(ValueError, match="names parts that do not exist"):
        Composite({"inpaint": MaskedImageConditioner()}, drop=["text"])


def test_sampling_guides_on_the_text_and_feeds_both_branches_the_image(monkeypatch):
    model = build(composite()).eval()
    seen = []
    forward = model.unet.forward
    monkeypatch.setattr(model.unet, "forward", lambda x, t, **kw: (seen.append((x, kw)), forward(x, t, **kw))[1])
    batch = inpaint_batch(1)
    model.generate(batch, steps=2, cfg_scale=3.0)
    x, kwargs = seen[0]
    assert x.shape == (2, 4 + 5, 8, 8)  # one batched call on [uncond; cond]
    assert torch.equal(x[0, 4:], x[1, 4:])  # mask and masked image in both halves
    assert not torch.equal(kwargs["context"][0], kwargs["context"][1])  # the text differs: null vs prompt


def test_concat_only_model_makes_no_unconditional_pass(monkeypatch):
    model = build(LOWRES).eval()
    calls = []
    forward = model.unet.forward
    monkeypatch.setattr(model.unet, "forward", lambda x, t, **kw: (calls.append(x.shape[0]), forward(x, t, **kw))[1])
    model.generate({"lowres": torch.rand(3, 3, 8, 8)}, steps=2, cfg_scale=5.0)
    assert calls == [3, 3]  # no doubled [uncond; cond] batch: there is nothing to drop


def test_training_dropout_drops_only_the_text():
    model = build(composite())
    batch = inpaint_batch()
    drop = torch.tensor([True, True])
    cond = model.conditioning(batch, drop, latent_size=(8, 8))
    null = model.conditioner.parts["text"](["", ""])["context"]
    torch.testing.assert_close(cond["context"], null)
    assert cond["concat"][:, :1].sum() > 0  # the mask is there
    losses, _ = model.diffusion_losses(batch, generator=torch.Generator().manual_seed(0), p_uncond=1.0)
    assert losses.shape == (2,) and torch.isfinite(losses).all()


def test_missing_condition_names_the_task():
    model = build(LOWRES).eval()
    with pytest.raises(ValueError, match=r"task=sr image=LOWRES.png"):
        model.generate(None, num_samples=1, steps=1)


# ---------------------------------------------------------------- init_from a text-to-image checkpoint
def test_init_from_text_model_zero_initialises_the_extra_input_channels(tmp_path):
    text = build(TEXT)
    with torch.no_grad():
        for p in text.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))  # the zero-initialised output layers would hide any difference
    path = tmp_path / "text.ckpt"
    torch.save({"hyper_parameters": dict(text.hparams), "state_dict": text.state_dict()}, path)
    inpaint = build(composite())
    load_weights_into(inpaint, str(path))
    first = inpaint.unet.input_blocks[0][0].weight
    assert torch.equal(first[:, :4], text.unet.input_blocks[0][0].weight) and not first[:, 4:].any()
    assert torch.equal(inpaint.conditioner.parts["text"].token_embedding.weight, text.conditioner.token_embedding.weight)
    z, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 700])
    batch = inpaint_batch()
    cond = inpaint.conditioning(batch, None, latent_size=(8, 8))
    # the inpainting model starts as the text-to-image one: the concat channels have no effect yet
    torch.testing.assert_close(inpaint(z, t, cond), text(z, t, text.conditioning(batch, None, latent_size=(8, 8))))


def test_init_from_with_use_ema_takes_the_text_encoders_ema_into_the_composite(tmp_path):
    torch.manual_seed(0)
    text = LatentDiffusion(unet={**UNET, "context_dim": 32}, conditioner=TEXT, first_stage=FIRST_STAGE, image_size=32,
                           scale_factor=0.7, ema_decay=0.9)
    with torch.no_grad():  # the EMA shadows differ from the raw weights, so the test sees which ones were taken
        for shadow in text.ema.shadows():
            shadow.add_(0.05 * torch.randn_like(shadow))
    path = tmp_path / "text.ckpt"
    torch.save({"hyper_parameters": dict(text.hparams), "state_dict": text.state_dict()}, path)
    inpaint = build(composite())
    load_weights_into(inpaint, str(path), use_ema=True)
    with text.ema_weights():
        assert torch.equal(inpaint.conditioner.parts["text"].token_embedding.weight,
                           text.conditioner.token_embedding.weight)
        for name, value in inpaint.conditioner.parts["text"].state_dict().items():
            assert torch.equal(value, text.conditioner.state_dict()[name]), name
        assert torch.equal(inpaint.unet.input_blocks[0][0].weight[:, :4], text.unet.input_blocks[0][0].weight)
        assert torch.equal(inpaint.unet.out[-1].weight, text.unet.out[-1].weight)
