"""Conditioners: shapes, null conditions under drop masks, frozen OpenCLIP vs open_clip itself,
fast offline failure, class-label validation, and the classifier-free-guidance dropout rate."""
import json
import math
import os
import socket

import huggingface_hub
import open_clip
import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import save_file

import ldm.models.conditioners as conditioning
import ldm.utils.downloads as downloads
from ldm.models.conditioners import (
    ClassEmbedder,
    FrozenOpenCLIP,
    NullConditioner,
    TextTransformer,
    drop_mask,
)

TINY_CLIP = "ldm-test-tiny-clip"
PROMPTS = ["a red circle at the top", "a blue square", "a green triangle on the left"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    """A 3-block open_clip model registered under a private name (built offline in well under a second)."""
    config_dir = tmp_path_factory.mktemp("open_clip_configs")
    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 16, "patch_size": 16, "head_width": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 3},
    }
    (config_dir / f"{TINY_CLIP}.json").write_text(json.dumps(config))
    open_clip.add_model_config(config_dir)
    return TINY_CLIP


@pytest.fixture(scope="module")
def tiny_clip_weights(tiny_clip, tmp_path_factory):
    """A full CLIP (vision tower included) saved as a local safetensors checkpoint, and the model."""
    torch.manual_seed(0)
    reference = open_clip.create_model(tiny_clip, pretrained=None).eval()
    path = tmp_path_factory.mktemp("weights") / "tiny_clip.safetensors"
    save_file(reference.state_dict(), str(path))
    return str(path), reference


# ---------------------------------------------------------------- TextTransformer
@pytest.fixture
def text_encoder() -> TextTransformer:
    torch.manual_seed(0)
    return TextTransformer(width=32, layers=2, heads=2)


def test_text_transformer_shape_and_prompt_dependence(text_encoder):
    context = text_encoder(PROMPTS)["context"]
    assert context.shape == (3, 77, 32) and text_encoder.output_dim == 32
    assert text_encoder.batch_key == "caption"
    assert not torch.allclose(context[0], context[1], atol=1e-4)
    assert torch.equal(text_encoder(text_encoder.tokenize(PROMPTS))["context"], context)  # token ids in


def test_text_transformer_gradients_reach_every_weight(text_encoder):
    text_encoder(PROMPTS)["context"].square().mean().backward()
    no_grad = [n for n, p in text_encoder.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    # only the embedding rows of tokens absent from the prompts get no gradient, never a whole tensor
    assert no_grad == []


def test_text_transformer_dropped_rows_get_exactly_the_empty_prompt(text_encoder):
    text_encoder.eval()
    mask = torch.tensor([True, False, True])
    context = text_encoder(PROMPTS, drop_mask=mask)["context"]
    assert torch.equal(context, text_encoder(["", PROMPTS[1], ""])["context"])
    torch.testing.assert_close(context[0], text_encoder([""])["context"][0])  # batch-independent


def test_text_transformer_rejects_bad_inputs(text_encoder):
    with pytest.raises(TypeError, match="list of prompts"):
        text_encoder("a single string")
    with pytest.raises(ValueError, match=r"\(B, 77\)"):
        text_encoder(torch.zeros(2, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible"):
        TextTransformer(width=30, layers=1, heads=4)


# ---------------------------------------------------------------- FrozenOpenCLIP
def test_frozen_openclip_random_tower_is_frozen(tiny_clip):
    encoder = FrozenOpenCLIP(tiny_clip, pretrained=None)
    context = encoder(PROMPTS)["context"]
    assert context.shape == (3, 77, 32) and encoder.output_dim == 32
    assert not context.requires_grad
    assert all(not p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not any(m.training for m in encoder.modules())
    assert not any(k.startswith("model.visual") for k in encoder.state_dict())
    assert "model.transformer.resblocks.0.attn.in_proj_weight" in encoder.state_dict()  # SD 2.x layout


@pytest.mark.parametrize("layer, block", [("penultimate", -2), ("last", -1)])
def test_frozen_openclip_matches_open_clip_intermediates(tiny_clip_weights, tiny_clip, layer, block):
    """Token states equal open_clip's own (ln_final-normalised) intermediates of that block."""
    path, reference = tiny_clip_weights
    encoder = FrozenOpenCLIP(tiny_clip, pretrained=None, checkpoint_path=path, layer=layer)
    tokens = encoder.tokenize(PROMPTS)
    expected = reference.forward_intermediates(
        text=tokens, text_indices=[3 + block], intermediates_only=True, normalize_intermediates=True
    )["text_intermediates"][0]
    torch.testing.assert_close(encoder(PROMPTS)["context"], expected)


def test_frozen_openclip_penultimate_differs_from_last(tiny_clip_weights, tiny_clip):
    path, _ = tiny_clip_weights
    layers = [FrozenOpenCLIP(tiny_clip, pretrained=path, layer=layer) for layer in ("penultimate", "last")]
    penultimate, last = (encoder(PROMPTS)["context"] for encoder in layers)
    assert not torch.allclose(penultimate, last, atol=1e-3)


def test_frozen_openclip_dropped_rows_get_the_empty_prompt(tiny_clip):
    encoder = FrozenOpenCLIP(tiny_clip, pretrained=None)
    context = encoder(PROMPTS, drop_mask=torch.tensor([False, True, False]))["context"]
    assert torch.equal(context, encoder([PROMPTS[0], "", PROMPTS[2]])["context"])
    torch.testing.assert_close(context[1], encoder([""])["context"][0])


def _forbid(*_, **__):
    raise AssertionError("a download or a model build was attempted before failing")


@pytest.fixture
def no_network_and_no_cache(monkeypatch):
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _forbid)
    monkeypatch.setattr(open_clip, "download_pretrained", _forbid)
    monkeypatch.setattr(conditioning, "_build_text_only", _forbid)


@pytest.mark.timeout(20)  # a hang guard only: the failure takes milliseconds
def test_frozen_openclip_offline_fails_at_once_with_instructions(monkeypatch, no_network_and_no_cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as error:
        FrozenOpenCLIP("ViT-H-14", "laion2b_s32b_b79k")
    message = str(error.value)
    assert "conditioner.checkpoint_path=" in message
    assert "open_clip_model.safetensors" in message
    assert "huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K" in message


@pytest.mark.timeout(20)
def test_frozen_openclip_unresolvable_hub_fails_at_once(monkeypatch, no_network_and_no_cache):
    """Without HF_HUB_OFFLINE a host that does not resolve also fails before any retrying download."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(downloads.urllib.request, "getproxies", dict)

    def no_dns(*_, **__):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(downloads.socket, "getaddrinfo", no_dns)
    with pytest.raises(FileNotFoundError, match="checkpoint_path="):
        FrozenOpenCLIP("ViT-H-14", "laion2b_s32b_b79k")


def test_frozen_openclip_bad_options(tiny_clip, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        FrozenOpenCLIP(tiny_clip, checkpoint_path=str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="model.conditioner.width=32"):
        FrozenOpenCLIP(tiny_clip, pretrained=None, width=1024)
    with pytest.raises(ValueError, match="penultimate"):
        FrozenOpenCLIP(tiny_clip, pretrained=None, layer="middle")
    with pytest.raises(ValueError, match="known tag"):
        FrozenOpenCLIP("ViT-H-14", pretrained="no_such_tag")


# ---------------------------------------------------------------- classes, none
def test_class_embedder_null_class_and_inputs():
    embedder = ClassEmbedder(num_classes=5, embed_dim=8)
    y = embedder(torch.tensor([0, 4, 2]), drop_mask=torch.tensor([False, False, True]))["y"]
    assert y.shape == (3, 8) and embedder.batch_key == "class_label" and embedder.output_dim == 8
    torch.testing.assert_close(y[2], embedder.embedding.weight[5])  # the learned null class
    torch.testing.assert_close(y[1], embedder.embedding.weight[4])
    torch.testing.assert_close(embedder(["0", 4, "2"])["y"][:2], y[:2])  # digit strings, ints
    y.sum().backward()
    assert embedder.embedding.weight.grad[5].abs().sum() > 0  # the null class trains


def test_class_embedder_rejects_missing_or_out_of_range_labels():
    embedder = ClassEmbedder(num_classes=5, embed_dim=8)
    with pytest.raises(ValueError, match=r"\.cls"):
        embedder(torch.tensor([1, -1]))
    with pytest.raises(ValueError, match=r"\[5\]"):
        embedder(torch.tensor([5, 0]))
    with pytest.raises(TypeError, match="class indices"):
        embedder(["a red circle"])
    # a dropped row needs no label: -1 is fine there
    assert embedder(torch.tensor([1, -1]), drop_mask=torch.tensor([False, True]))["y"].shape == (2, 8)


def test_null_conditioner():
    null = NullConditioner()
    assert null(None) == {} and null(None, drop_mask=torch.ones(2, dtype=torch.bool)) == {}
    assert null.batch_key is None and null.output_dim == 0


# ---------------------------------------------------------------- dropout mask
def test_drop_mask_rate_is_binomial():
    n, p = 20000, 0.1
    mask = drop_mask(n, p, generator=torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and mask.shape == (n,)
    bound = 5 * math.sqrt(n * p * (1 - p))  # 5 sigma of Binomial(n, p)
    assert abs(int(mask.sum()) - n * p) < bound


def test_drop_mask_edges_and_reproducibility():
    assert not drop_mask(100, 0.0).any() and drop_mask(100, 1.0).all()
    a, b = (drop_mask(64, 0.5, generator=torch.Generator().manual_seed(3)) for _ in range(2))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        drop_mask(4, 1.5)


# ---------------------------------------------------------------- padding mask, SD 1.x end-of-text padding
def test_padding_mask_marks_the_tokens_up_to_end_of_text():
    torch.manual_seed(0)
    encoder = TextTransformer(width=32, layers=1, heads=2, padding_mask=True)
    out = encoder(["a red circle", ""], drop_mask=torch.tensor([False, False]))
    mask = out["context_mask"]
    assert mask.shape == (2, 77) and mask.dtype == torch.bool
    assert mask[0].sum() == 5 and mask[0, :5].all()  # <start> a red circle <end>
    assert mask[1].sum() == 2  # the empty prompt: <start> <end>
    dropped = encoder(["a red circle"], drop_mask=torch.tensor([True]))
    assert dropped["context_mask"].sum() == 2  # a dropped row gets the empty prompt's mask too
    assert "context_mask" not in TextTransformer(width=32, layers=1, heads=2)(["a red circle"])  # off: SD parity


def test_sd1_preset_pads_prompts_with_end_of_text(tiny_clip, repo_root):
    with initialize_config_dir(config_dir=os.path.join(repo_root, "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=ldm_f8_text", "model=sd1"])
    assert cfg.model.conditioner.pad_token_id == 49407
    encoder = FrozenOpenCLIP(tiny_clip, pretrained=None, pad_token_id=cfg.model.conditioner.pad_token_id)
    tokens = encoder.tokenize(["a red circle"])
    words = open_clip.get_tokenizer(tiny_clip)(["a red circle"])[0, 1:4].tolist()
    assert tokens[0].tolist() == [49406, *words] + [49407] * 73  # SD 1.x's CLIPTokenizer(padding="max_length")
    assert encoder.null_tokens[0].tolist() == [49406] + [49407] * 76
    ids = torch.tensor([[49406, *words, 49407] + [0] * 72])  # ready-made zero-padded ids are padded the same way
    assert torch.equal(encoder.tokenize(ids), tokens)
    sd2 = FrozenOpenCLIP(tiny_clip, pretrained=None)  # open_clip's own padding (SD 2.x): zeros
    assert sd2.tokenize(["a red circle"])[0, 5:].eq(0).all()
