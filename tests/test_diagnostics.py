"""Caption sensitivity and signal leak (ldm/evaluation/diagnostics.py): the counterfactual captions, the gaps of
models that do / do not read an attribute, the closed-form layout R^2 against a least-squares fit, and
`evaluate.py report=captions` end to end."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tiny_models import tiny_text_ldm

from ldm.data.shapes import parse_caption_objects, render_sample
from ldm.diffusion.schedule import NoiseSchedule
from ldm.diffusion.settings import SamplerSettings
from ldm.evaluation.diagnostics import (
    caption_sensitivity,
    counterfactual_captions,
    first_sampled_timestep,
    layout_r2,
    reconstruction_fidelity,
    signal_leak,
)
from ldm.models.latent_diffusion import LatentDiffusion

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shapes_captions(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [render_sample(rng, 16)[1]["caption"] for _ in range(n)]


def test_counterfactuals_change_exactly_one_attribute_and_shuffle_without_fixed_points():
    captions = shapes_captions(40)
    variants = counterfactual_captions(captions, np.random.default_rng(1))
    assert set(variants) == {"shuffled", "color", "shape", "position"}
    assert sorted(variants["shuffled"]) == sorted(captions)
    unique = [f"caption {i}" for i in range(40)]
    shuffled = counterfactual_captions(unique, np.random.default_rng(2))["shuffled"]
    assert sorted(shuffled) == sorted(unique) and all(a != b for a, b in zip(shuffled, unique))  # a derangement
    for attribute in ("color", "shape", "position"):
        for true, swapped in zip(captions, variants[attribute]):
            (a,), (b,) = parse_caption_objects(true), parse_caption_objects(swapped)
            assert a[attribute] != b[attribute]
            assert all(a[k] == b[k] for k in a if k != attribute)
    assert set(counterfactual_captions(["a photo of a cat", "a dog"], np.random.default_rng(0))) == {"shuffled"}


class WordReader:
    """A stub text model whose x0 estimate depends on the colour word only: eps = (x_t - sqrt(ab) c) / sqrt(1-ab)
    with c a per-colour constant, so it is exact when z0 = c(colour) and ignores shape and position."""

    def __init__(self) -> None:
        self.schedule = NoiseSchedule().double()
        self.hparams = SimpleNamespace(prediction_type="eps")
        self.device = torch.device("cpu")
        self.conditioner = self

    def __call__(self, texts, drop_mask=None) -> dict:
        values = [float(len(parse_caption_objects(text)[0]["color"])) / 4 for text in texts]
        return {"context": torch.tensor(values, dtype=torch.float64)}

    def unet(self, z_t, t, context):
        ab = self.schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
        return (z_t - ab.sqrt() * context.view(-1, 1, 1, 1)) / (1 - ab).sqrt()


def test_a_model_reading_only_the_colour_has_a_colour_gap_and_no_position_gap():
    captions = [c for c in shapes_captions(200) if len(parse_caption_objects(c)[0]["color"]) != 4][:32]
    model = WordReader()
    latents = model(captions)["context"].view(-1, 1, 1, 1).expand(-1, 2, 4, 4).clone()
    result = caption_sensitivity(model, latents, captions, batch_size=8)
    assert result["quartiles"] == [[0, 249], [250, 499], [500, 749], [750, 999]]
    assert max(abs(v) for v in result["x0_mse_true"]) < 1e-10  # exact with the true caption
    for attribute in ("shape", "position"):
        assert max(abs(v) for v in result["x0_gap"][attribute]) < 1e-10
    assert min(result["x0_gap"]["color"]) > 1e-3 and min(result["x0_gap"]["shuffled"]) > 1e-4
    # the training-loss gap is the x0 gap times SNR for an eps model: largest at low noise
    assert result["loss_gap"]["color"][0] > result["loss_gap"]["color"][3]


def test_layout_r2_closed_form_matches_a_least_squares_fit():
    torch.manual_seed(0)
    n, alpha_bar = 300, 0.05
    # structured latents: a bright blob in one of four quadrants, plus texture
    latents = 0.2 * torch.randn(n, 2, 4, 4, dtype=torch.float64)
    quadrant = torch.randint(0, 4, (n,))
    for i, q in enumerate(quadrant.tolist()):
        r, c = divmod(q, 2)
        latents[i, :, 2 * r:2 * r + 2, 2 * c:2 * c + 2] += 1.5
    closed_form = layout_r2(latents, alpha_bar, grid=2)
    # Monte Carlo: many noisy copies of the same latents, the best linear map from z_t to the pooled z0
    g = torch.Generator().manual_seed(1)
    index = torch.randint(0, n, (60_000,), generator=g)
    z0 = latents[index]
    z_t = alpha_bar**0.5 * z0 + (1 - alpha_bar) ** 0.5 * torch.randn(z0.shape, generator=g, dtype=torch.float64)
    y = torch.nn.functional.adaptive_avg_pool2d(z0, 2).flatten(1)
    features = torch.cat([z_t.flatten(1), torch.ones(len(z_t), 1, dtype=torch.float64)], dim=1)
    fit = torch.linalg.lstsq(features, y).solution
    residual = (y - features @ fit).pow(2).sum() / (y - y.mean(0)).pow(2).sum()
    assert closed_form == pytest.approx(1 - residual.item(), abs=0.01)
    assert 0.05 < closed_form < 0.95
    assert layout_r2(latents, 0.0) == 0.0 and layout_r2(latents, 1 - 1e-9) == pytest.approx(1.0, abs=1e-6)


def test_signal_leak_flags_the_sd_schedule_and_not_zero_snr_with_trailing():
    torch.manual_seed(0)
    latents = torch.randn(64, 4, 8, 8) + 3 * (torch.rand(64, 1, 1, 1) > 0.5) * torch.linspace(-1, 1, 8).view(1, 1, 1, 8)
    fast = SamplerSettings("dpmpp_2m", 20)
    assert first_sampled_timestep(1000, fast) == 941  # 21 leading points (DPM-Solver drops the last): 20 * 47 + 1
    leaky = signal_leak(NoiseSchedule(), latents, fast)
    assert leaky["t"] == 941 and leaky["leaks"] and leaky["r2"] > leaky["r2_t_max"] > 0
    trailing = SamplerSettings("dpmpp_2m", 20, timestep_spacing="trailing", steps_offset=0)
    clean = signal_leak(NoiseSchedule(zero_terminal_snr=True), latents, trailing)
    assert clean["t"] == 999 and clean["r2"] == 0.0 and clean["snr"] == 0.0 and not clean["leaks"]


@pytest.fixture(scope="module")
def tiny_text_ckpt(tmp_path_factory) -> str:
    torch.manual_seed(0)
    model = LatentDiffusion(**tiny_text_ldm(image_size=32, ema_decay=0.9, prediction_type="v",
                                            schedule={"zero_terminal_snr": True}))
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny.ckpt")
    torch.save({"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict(), "global_step": 3}, path)
    return path


@pytest.mark.slow
def test_evaluate_report_captions_writes_the_diagnostics(tmp_path, tiny_text_ckpt):
    folder = tmp_path / "real"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        image, attributes = render_sample(rng, 32)
        image.save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(attributes["caption"])
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "evaluate.py"), "report=captions", f"ckpt={tiny_text_ckpt}",
                           f"real_dir={folder}", "diagnostics_samples=12", "batch_size=4", "sampling=zero_snr",
                           f"out={out}"], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    diagnostics = metrics["diagnostics"]
    assert diagnostics["num_samples"] == 12
    assert diagnostics["signal_leak"]["t"] == 999 and diagnostics["signal_leak"]["r2"] == 0.0
    gaps = diagnostics["caption_sensitivity"]["x0_gap"]
    assert set(gaps) == {"shuffled", "color", "shape", "position"} and all(len(v) == 4 for v in gaps.values())
    assert metrics["sampler"]["timestep_spacing"] == "trailing"
    table = (out / "metrics.md").read_text()
    assert "caption gap position" in table and "signal leak" in table


class _LosslessFirstStage:
    """encode = identity (its posterior mode), decode = identity: reconstructions equal the inputs."""

    def encode(self, x):
        return SimpleNamespace(mode=lambda: x)

    def decode(self, z):
        return z


class _RecordingJudge:
    """Features = the images themselves; 'fidelity' = the fraction of images whose red channel is brightest
    where the caption says red (enough to see that the judge got the right images with the right captions)."""

    def __init__(self):
        self.seen = []

    def __call__(self, images):
        self.seen.append(images)
        return images.float().mean(dim=(2, 3))

    def prompt_fidelity(self, features, captions):
        red = features.argmax(dim=1) == 0
        said = torch.tensor(["red" in caption for caption in captions])
        return {"prompt_fidelity_color": float((red == said).double().mean())}


def test_reconstruction_fidelity_of_a_lossless_first_stage_judges_exactly_the_reference_images():
    rng = np.random.default_rng(0)
    samples = [render_sample(rng, 32) for _ in range(10)]
    images = torch.stack([torch.from_numpy(np.array(image)).permute(2, 0, 1) for image, _ in samples])
    captions = [attributes["caption"] for _, attributes in samples]
    reference = SimpleNamespace(batches=lambda batch_size, size, limit: iter(images[:limit].split(batch_size)),
                                captions=lambda limit: captions[:limit])
    model = SimpleNamespace(first_stage=_LosslessFirstStage(), scale_factor=0.25, device=torch.device("cpu"),
                            hparams=SimpleNamespace(image_size=32))
    judge = _RecordingJudge()
    found = reconstruction_fidelity(model, reference, judge, num_samples=8, batch_size=3)
    assert torch.equal(torch.cat(judge.seen), images[:8])  # decoded latents / scale_factor -> the same uint8 images
    said_red = [("red" in c) for c in captions[:8]]
    is_red = [bool(images[i].float().mean(dim=(1, 2)).argmax() == 0) for i in range(8)]
    assert found == {"prompt_fidelity_reconstruction_color": np.mean([a == b for a, b in zip(said_red, is_red)])}
    no_captions = SimpleNamespace(batches=reference.batches, captions=lambda limit: [""] * limit)
    assert reconstruction_fidelity(model, no_captions, judge, num_samples=8) == {}
