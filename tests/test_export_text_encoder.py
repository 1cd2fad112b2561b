"""A diffusers export of a model with a CLIP text tower loads bare: `StableDiffusionPipeline.from_pretrained(DIR)`
with no extra argument, its CLIPTextModel + CLIPTokenizer giving the conditioner's own context (SD 1.x style: last
layer, QuickGELU, end-of-text padding; SD 2.x style: penultimate layer, GELU, "!" padding, upcast_attention)."""
import json

import open_clip
import pytest
import torch
from diffusers import StableDiffusionPipeline

from ldm.loading.diffusers_export import export_diffusers
from ldm.models.latent_diffusion import LatentDiffusion

ARCH = "ldm-test-tiny-text-tower"
PROMPTS = ["a red circle at the top left", "A Blue SQUARE, next to a green triangle."]


@pytest.fixture(scope="module", autouse=True)
def tiny_tower_config(tmp_path_factory):
    """A 3-block, 32-wide open_clip text tower with CLIP's real BPE vocabulary and 77-token context."""
    folder = tmp_path_factory.mktemp("arch")
    config = {"embed_dim": 24, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 3}}
    (folder / f"{ARCH}.json").write_text(json.dumps(config))
    # OpenAI CLIP's activation x * sigmoid(1.702 x), which the SD 1.x tower's `openai` tag switches on
    (folder / f"{ARCH}-quickgelu.json").write_text(json.dumps({**config, "quick_gelu": True}))
    open_clip.add_model_config(str(folder))


def tiny_model(layer: str, pad_token_id, quick_gelu: bool, linear: bool) -> LatentDiffusion:
    torch.manual_seed(0)
    model = LatentDiffusion(
        unet=dict(model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[2],
                  num_head_channels=16, use_linear_in_transformer=linear, context_dim=32, norm_groups=8),
        conditioner={"_target_": "ldm.models.conditioners.FrozenOpenCLIP",
                     "arch": ARCH + ("-quickgelu" if quick_gelu else ""), "pretrained": None,
                     "layer": layer, "pad_token_id": pad_token_id, "width": 32},
        first_stage=dict(embed_dim=4, z_channels=4, ch=16, ch_mult=[1, 2], num_res_blocks=1, norm_groups=8),
        image_size=16, scale_factor=0.5, ema_decay=0.0).eval()
    with torch.no_grad():  # random non-zero weights everywhere: a wrong mapping cannot hide behind zeros
        for p in model.conditioner.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("layer, pad, quick_gelu, linear", [("last", 49407, True, False),
                                                            ("penultimate", None, False, True)],
                         ids=["sd1-style", "sd2-style"])
def test_export_loads_bare_with_the_conditioners_text_encoder(tmp_path, layer, pad, quick_gelu, linear):
    model = tiny_model(layer, pad, quick_gelu, linear)
    not_exported = export_diffusers(model, str(tmp_path), use_ema=False)
    assert not_exported == []
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path))  # no text_encoder= / tokenizer= needed
    text_config = pipe.text_encoder.config
    assert text_config.num_hidden_layers == (3 if layer == "last" else 2)
    assert text_config.hidden_act == ("quick_gelu" if quick_gelu else "gelu")
    assert pipe.unet.config.upcast_attention is linear  # SD 2.x's release sets it; SD 1.x's does not
    ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    ours = model.conditioner.tokenize(PROMPTS)
    assert torch.equal(ids, ours.cpu())  # same BPE, same padding token (end-of-text, or "!" = 0 for SD 2.x)
    with torch.no_grad():
        theirs = pipe.text_encoder(ids).last_hidden_state
        expected = model.conditioner(PROMPTS)["context"]
    torch.testing.assert_close(theirs, expected, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # the pipeline runs end to end from the folder alone
        image = pipe(PROMPTS[0], num_inference_steps=2, height=16, width=16, output_type="np").images
    assert image.shape == (1, 16, 16, 3)
