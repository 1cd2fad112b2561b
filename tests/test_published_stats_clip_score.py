"""FID against a published pytorch-fid / ADM `.npz` (reference_stats=) and the CLIP score (clip_score.enabled=true):
the formulas, the checks of the extractor a file was made with, the offline failure, and evaluate.py's wiring."""
import json

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torch import nn

from ldm.evaluation import evaluate as evaluate_module
from ldm.metrics import WeightsUnavailableError, feature_statistics, frechet_distance
from ldm.metrics.clip_score import build_clip_score, clip_scores
from ldm.metrics.extractors import normalise, resize_uint8
from ldm.metrics.published_stats import load_published_statistics

TINY_CLIP = "ldm-test-tiny-clip-score"


class MeanColour(nn.Module):
    """A stand-in for Inception-v3 (whose weights are not available offline): per-channel means and stds, 6-d."""

    name, dim = "inception_v3", 6

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], dim=1)

    def describe(self) -> dict:
        return {"name": self.name, "layer": "pool_stub", "dim": self.dim}

    def metric_names(self):
        return "FID", None

    def class_log_probabilities(self, features):
        return None

    def prompt_fidelity(self, features, captions):
        return None


def write_npz(path, **arrays) -> str:
    np.savez(path, **arrays)
    return str(path)


def image_folder(path, n: int = 8, seed: int = 0) -> str:
    path.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(path / f"{i:03d}.png")
        (path / f"{i:03d}.txt").write_text(["a red circle", "a blue square at the top"][i % 2])
    return str(path)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    """A randomly initialised open_clip model (OpenAI's BPE vocabulary, one layer per tower) saved as a local file."""
    folder = tmp_path_factory.mktemp("clip")
    config = {"embed_dim": 16,
              "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (folder / f"{TINY_CLIP}.json").write_text(json.dumps(config))
    open_clip.add_model_config(str(folder))
    torch.manual_seed(0)
    weights = folder / "tiny_clip.pt"
    torch.save(open_clip.create_model(TINY_CLIP).state_dict(), weights)
    return str(weights)


# ------------------------------------------------------------------------------------ reference_stats=
def test_published_statistics_give_the_fid_of_the_features_they_summarise(tmp_path):
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(200, 6)), rng.normal(0.3, 1.2, size=(50, 6))
    mu, sigma = real.mean(0), np.cov(real, rowvar=False)  # what pytorch-fid --save-stats writes
    path = write_npz(tmp_path / "ref.npz", mu=mu, sigma=sigma)
    reference = load_published_statistics(path, MeanColour())
    metrics = evaluate_module.metrics_of_features(torch.from_numpy(fake).float(), reference, MeanColour())
    fake_mu, fake_sigma = feature_statistics(torch.from_numpy(fake).float())
    assert metrics["fid"] == pytest.approx(frechet_distance(mu, sigma, fake_mu, fake_sigma), rel=1e-9)
    assert metrics["fid"] == pytest.approx(frechet_distance(*feature_statistics(real), fake_mu, fake_sigma), rel=1e-6)
    # no reference features in the file: no k-NN metrics and no KID, rather than numbers against nothing
    assert metrics["precision"] is None and metrics["recall"] is None and metrics["kid"] is None
    assert metrics["reference"]["published"]["preprocessing"].startswith("reference: the TF Inception graph")


@pytest.mark.parametrize("case, message", [
    ("other extractor", "are Inception-v3 pool3 statistics (pytorch-fid / ADM), but the extractor is shapes_cnn: "
                        "pass features=inception_v3"),
    ("other dimension", "holds mu (2048,) and sigma (2048, 2048), but the inception_v3 features are 6-d"),
    ("images only", "has no 'mu' and 'sigma' arrays (it has ['arr_0']): expected the pytorch-fid / ADM format. "
                    "It holds images (arr_0) only"),
    ("not a zip", "is not a readable .npz file"),
])
def test_published_statistics_that_do_not_fit_are_refused_with_the_cause(tmp_path, case, message):
    extractor = MeanColour()
    path = tmp_path / "ref.npz"
    if case == "other extractor":
        extractor.name = "shapes_cnn"
        write_npz(path, mu=np.zeros(6), sigma=np.eye(6))
    elif case == "other dimension":
        write_npz(path, mu=np.zeros(2048), sigma=np.eye(2048, dtype=np.float32))
    elif case == "images only":
        write_npz(path, arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    else:
        path.write_bytes(b"<html>not found</html>")
    with pytest.raises(ValueError) as error:
        load_published_statistics(str(path), extractor)
    assert message in str(error.value)


# ------------------------------------------------------------------------------------ CLIP score
def test_clip_score_is_100_times_the_clipped_cosine():
    images = torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 2.0]])
    texts = torch.tensor([[1.0, 1.0], [-1.0, 0.5], [3.0, 3.0]])
    assert clip_scores(images, texts).tolist() == pytest.approx([100 / np.sqrt(2), 0.0, 100.0])
    with pytest.raises(ValueError, match="one to one"):
        clip_scores(images, texts[:2])


def test_clip_score_offline_fails_at_once_naming_the_file_to_place(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError) as error:
        build_clip_score("ViT-L-14", "openai")
    message = str(error.value)
    assert "downloads are disabled (offline)" in message
    assert "huggingface.co/timm/vit_large_patch14_clip_224.openai/blob/main/open_clip_model.safetensors" in message
    assert "clip_score.pretrained=/path/to/open_clip_model.safetensors (clip_score.arch=ViT-L-14)" in message


def test_clip_score_of_a_local_open_clip_model_scores_each_pair(tiny_clip):
    scorer = build_clip_score(TINY_CLIP, tiny_clip)
    images = torch.randint(0, 256, (3, 3, 40, 40), dtype=torch.uint8)
    prompts = ["a red circle", "a blue square", "a green triangle at the top"]
    model = open_clip.create_model(TINY_CLIP, pretrained=tiny_clip).eval()
    with torch.no_grad():  # open_clip's own towers on CLIP's normalised pixels and tokens
        pixels = normalise(resize_uint8(images, 32), open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
        image_embeddings = model.encode_image(pixels)
        text_embeddings = model.encode_text(open_clip.get_tokenizer(TINY_CLIP)(prompts))
    cosine = torch.nn.functional.cosine_similarity(image_embeddings, text_embeddings)
    torch.testing.assert_close(scorer(images, prompts), 100 * cosine.clamp(min=0), atol=1e-4, rtol=0)
    assert scorer.describe()["arch"] == TINY_CLIP and len(scorer.describe()["pretrained"]) == 16  # file digest


# ------------------------------------------------------------------------------------ evaluate.py
def test_evaluate_reads_reference_stats_and_adds_the_clip_score(tmp_path, monkeypatch, tiny_clip):
    monkeypatch.setattr(evaluate_module, "build_features", lambda *args, **kwargs: MeanColour())
    fake = image_folder(tmp_path / "fake")
    real = np.random.default_rng(1).normal(0.5, 0.1, size=(40, 6))
    npz = write_npz(tmp_path / "ref.npz", mu=real.mean(0), sigma=np.cov(real, rowvar=False))
    metrics = evaluate_module.evaluate(str(tmp_path / "out"), fake_dir=fake, real_dir=fake, reference_stats=npz,
                                       cache_dir=str(tmp_path / "cache"), device="cpu",
                                       clip_score={"enabled": True, "arch": TINY_CLIP, "pretrained": tiny_clip})
    features = MeanColour()(torch.stack([torch.from_numpy(np.array(Image.open(f"{fake}/{i:03d}.png"))).permute(2, 0, 1)
                                         for i in range(8)]))
    expected = frechet_distance(real.mean(0), np.cov(real, rowvar=False), *feature_statistics(features))
    assert metrics["fid"] == pytest.approx(expected, rel=1e-6)
    assert metrics["reference"]["statistics"] == npz and metrics["precision"] is None
    assert 0 <= metrics["clip_score"] <= 100 and metrics["clip_score_model"]["arch"] == TINY_CLIP
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["clip_score"] == pytest.approx(metrics["clip_score"])
    assert "| clip_score |" in (tmp_path / "out" / "metrics.md").read_text()
    off = evaluate_module.evaluate(str(tmp_path / "out2"), fake_dir=fake, real_dir=fake, reference_stats=npz,
                                   cache_dir=str(tmp_path / "cache"), device="cpu", clip_score={"enabled": False})
    assert "clip_score" not in off
