"""Feature extractors: preprocessing, offline failures, weight loading, and the shapes classifier."""
import json
import os
from urllib.error import URLError

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from ldm.data.shapes import render_sample
from ldm.metrics import (
    FeatureExtractor,
    WeightsUnavailableError,
    build_extractor,
    images_to_uint8,
    resize_uint8,
)
from ldm.metrics.extractors import InceptionV3Features
from ldm.metrics.shapes_classifier import (
    caption_match_rates,
    load_shapes_classifier_extractor,
    main,
    parse_caption,
    render_batch,
    train_shapes_classifier,
)

INCEPTION_FILE = InceptionV3Features.WEIGHTS_FILE
TINY = {"resolution": 32, "batch_size": 8, "width": 8, "feature_dim": 16}


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch) -> str:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return str(tmp_path / "torch_home")


def random_uint8_images(count: int, size: int) -> torch.Tensor:
    return torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


# Preprocessing ---------------------------------------------------------------------------------------


def test_images_to_uint8_maps_minus_one_one_to_full_range():
    images = torch.tensor([-1.0, -0.5, 0.0, 1.0, 1.5]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    assert images_to_uint8(images)[0, 0, 0].tolist() == [0, 64, 128, 255, 255]


def test_resize_uint8_is_pil_bicubic_and_identity_at_target_size():
    images = random_uint8_images(2, 40)
    resized = resize_uint8(images, 17)
    expected = np.asarray(Image.fromarray(images[1].permute(1, 2, 0).numpy()).resize((17, 17), Image.BICUBIC))
    assert resized.dtype == torch.uint8 and resized.shape == (2, 3, 17, 17)
    np.testing.assert_array_equal(resized[1].permute(1, 2, 0).numpy(), expected)
    assert resize_uint8(images, 40) is images


def test_extractors_reject_float_images(tmp_path):
    extractor = load_shapes_classifier_extractor(str(tmp_path / "c.safetensors"), 32, steps=0)
    with pytest.raises(ValueError, match="images_to_uint8"):
        extractor(torch.rand(2, 3, 32, 32))


def test_build_extractor_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown feature extractor 'inception'.*inception_v3"):
        build_extractor("inception")


# Offline behaviour and weight files --------------------------------------------------------------------


def test_inception_offline_fails_at_once_naming_the_file(empty_torch_home):
    with pytest.raises(WeightsUnavailableError) as error:
        build_extractor("inception_v3")
    expected_path = os.path.join(empty_torch_home, "hub", "checkpoints", INCEPTION_FILE)
    assert expected_path in str(error.value) and "features.weights_path=" in str(error.value)


def test_inception_failed_download_names_the_file(empty_torch_home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("LDM_OFFLINE", "0")

    def no_network(*args, **kwargs):
        raise URLError("no route to host")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    with pytest.raises(WeightsUnavailableError, match=f"downloading {INCEPTION_FILE} failed.*no route to host"):
        build_extractor("inception_v3")


def test_inception_uses_weights_cached_under_torch_home(empty_torch_home, monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as fidelity_inception

    # A random-weight file under the real name: its values are meaningless, the plumbing is not.
    with monkeypatch.context() as patch:
        patch.setattr(fidelity_inception, "load_state_dict_from_url", lambda *args, **kwargs: {})
        patch.setattr(fidelity_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        random_network = fidelity_inception.FeatureExtractorInceptionV3("random", ["2048"])
    os.makedirs(os.path.join(empty_torch_home, "hub", "checkpoints"))
    torch.save(random_network.state_dict(), os.path.join(empty_torch_home, "hub", "checkpoints", INCEPTION_FILE))

    extractor = build_extractor("inception_v3")
    features = extractor(random_uint8_images(1, 32))
    assert isinstance(extractor, FeatureExtractor)
    assert features.shape == (1, 2048) and features.dtype == torch.float32 and torch.isfinite(features).all()
    assert extractor.describe()["weights"] == INCEPTION_FILE and "bicubic" in extractor.describe()["preprocessing"]


class _RunsCode:
    def __reduce__(self):
        return os.system, ("true",)


@pytest.mark.parametrize("content", ["pickle", "garbage"])
def test_bad_inception_weights_are_refused_naming_the_file_and_the_release_to_put_there(empty_torch_home, content):
    checkpoints = os.path.join(empty_torch_home, "hub", "checkpoints")
    os.makedirs(checkpoints)
    path = os.path.join(checkpoints, INCEPTION_FILE)
    if content == "pickle":
        torch.save({"weights": _RunsCode()}, path)
    else:
        with open(path, "wb") as file:
            file.write(b"<html>rate limited</html>" * 50)  # what a failed download can leave
    with pytest.raises(WeightsUnavailableError) as error:
        build_extractor("inception_v3")
    message = str(error.value)
    assert f"Replace {path} with the released {INCEPTION_FILE} (from https://" in message
    assert ("references posix.system" if content == "pickle" else "not a readable torch checkpoint") in message


def test_clip_offline_fails_at_once_naming_the_option():
    with pytest.raises(WeightsUnavailableError, match="timm/vit_base_patch32_clip_224.openai.*features.pretrained="):
        build_extractor("clip", arch="ViT-B-32", pretrained="openai")


def test_clip_loads_a_local_state_dict(tmp_path):
    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
    }
    (tmp_path / "ldm-test-tiny-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(str(tmp_path))
    weights = tmp_path / "tiny_clip.pt"
    torch.save(open_clip.create_model("ldm-test-tiny-clip").state_dict(), weights)

    extractor = build_extractor("clip", arch="ldm-test-tiny-clip", pretrained=str(weights))
    features = extractor(random_uint8_images(3, 48))
    assert features.shape == (3, 16) and extractor.dim == 16 and extractor.input_size == 32
    assert extractor.describe()["arch"] == "ldm-test-tiny-clip"


def test_dinov2_offline_fails_at_once_naming_the_files(empty_torch_home):
    with pytest.raises(WeightsUnavailableError, match="dinov2_vitl14_pretrain.pth.*features.weights_path="):
        build_extractor("dinov2")


# Shapes classifier ----------------------------------------------------------------------------------


def test_shapes_classifier_training_is_deterministic_and_learns():
    untrained = train_shapes_classifier(steps=0, seed=0, **TINY)
    first = train_shapes_classifier(steps=100, seed=0, **TINY)
    second = train_shapes_classifier(steps=100, seed=0, **TINY)
    for key, value in first.state_dict().items():
        torch.testing.assert_close(value, second.state_dict()[key], rtol=0, atol=0)

    images, labels = render_batch(np.random.default_rng(1), 128, TINY["resolution"])
    inputs = images.float() / 127.5 - 1.0

    def loss(model):
        logits = model.eval()(inputs)[1]
        return sum(torch.nn.functional.cross_entropy(logits[head], labels[head]) for head in labels).item()

    assert loss(first) < 0.8 * loss(untrained)  # about 3.6 vs 5.3 (chance: ln 7 + ln 3 + ln 9)


def test_shapes_extractor_caches_its_weights_and_has_the_extractor_api(tmp_path):
    path = str(tmp_path / "shapes_classifier_32px.safetensors")
    with pytest.raises(FileNotFoundError, match="python -m ldm.metrics.shapes_classifier"):
        load_shapes_classifier_extractor(path, 32, train_if_missing=False)
    trained = load_shapes_classifier_extractor(path, 32, steps=2)
    loaded = build_extractor("shapes_cnn", weights_path=path, resolution=32, train_if_missing=False)
    images = random_uint8_images(4, 64)  # resized to the classifier's 32 px
    torch.testing.assert_close(trained(images), loaded(images))
    assert loaded(images).shape == (4, 256)
    assert loaded.describe()["name"] == "shapes_cnn" and loaded.describe()["layer"] == "penultimate"
    assert {head: values.shape for head, values in loaded.predict(images).items()} == {
        "color": (4,), "shape": (4,), "position": (4,)}
    with pytest.raises(ValueError, match="trained at 32 px, not 64 px"):
        load_shapes_classifier_extractor(path, 64)


def test_shapes_classifier_command_writes_the_file(tmp_path, capsys):
    path = str(tmp_path / "cli.safetensors")
    main(["--out", path, "--resolution", "24", "--steps", "2", "--batch-size", "4"])
    report = json.loads(capsys.readouterr().out)
    assert os.path.isfile(path) and set(report["heldout_accuracy"]) == {"color", "shape", "position"}


def test_parse_caption_handles_multiword_positions_and_refuses_several_objects():
    assert parse_caption("a red circle at the top left") == {"color": 0, "shape": 0, "position": 0}
    assert parse_caption("a white triangle at the top") == {"color": 6, "shape": 2, "position": 1}
    assert parse_caption("a cyan square at the bottom right") == {"color": 5, "shape": 1, "position": 8}
    with pytest.raises(ValueError, match="single-object"):
        parse_caption("a cyan square at the bottom right and a red circle at the top")
    for bad in ("a purple circle at the top", "a red circle at the topleft", "red circle"):
        with pytest.raises(ValueError, match="not a shapes caption"):
            parse_caption(bad)


def test_prompt_fidelity_counts_matches_per_attribute():
    captions = ["a red circle at the top left", "a blue square at the center", "a green triangle at the bottom"]
    predictions = {  # 1st fully right, 2nd wrong colour, 3rd wrong shape and position
        "color": torch.tensor([0, 1, 1]), "shape": torch.tensor([0, 1, 0]), "position": torch.tensor([0, 4, 6])}
    assert caption_match_rates(predictions, captions) == pytest.approx({
        "prompt_fidelity_color": 2 / 3, "prompt_fidelity_shape": 2 / 3,
        "prompt_fidelity_position": 2 / 3, "prompt_fidelity_all": 1 / 3})


def test_prompt_fidelity_of_rendered_images_with_a_trained_classifier(tmp_path):
    extractor = load_shapes_classifier_extractor(str(tmp_path / "c.safetensors"), 32, steps=2)
    rng = np.random.default_rng(3)
    samples = [render_sample(rng, 32) for _ in range(6)]
    images = torch.from_numpy(np.stack([np.asarray(image) for image, _ in samples])).permute(0, 3, 1, 2)
    scores = extractor.prompt_fidelity(extractor(images), [attributes["caption"] for _, attributes in samples])
    assert set(scores) == {f"prompt_fidelity_{key}" for key in ("color", "shape", "position", "all")}
    assert all(0.0 <= value <= 1.0 for value in scores.values())
    assert scores["prompt_fidelity_all"] <= min(scores.values())
