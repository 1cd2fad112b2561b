"""sample.py end to end on tiny checkpoints: the three kinds of output, per-sample seeds, EMA by default,
and clear errors (not a LatentDiffusion checkpoint, prompt vs class mismatch, unknown sampler)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.inference.sampling import (
    SamplerSettings,
    conditions_for,
    generate_to_dir,
    load_latent_diffusion,
)
from ldm.models.latent_diffusion import LatentDiffusion

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIRST_STAGE = dict(embed_dim=4, z_channels=4, ch=16, ch_mult=[1, 2], num_res_blocks=1, norm_groups=8)
UNET = dict(in_channels=4, out_channels=4, model_channels=16, channel_mult=[1, 2], num_res_blocks=1,
            attention_resolutions=[2], num_head_channels=8, norm_groups=8)
TEXT = {"_target_": "ldm.models.conditioners.TextTransformer", "width": 32, "layers": 1, "heads": 2}
CLASSES = {"_target_": "ldm.models.conditioners.ClassEmbedder", "num_classes": 5, "embed_dim": 32}


def save_model(path, conditioner: dict, **unet_extra) -> str:
    torch.manual_seed(0)
    model = LatentDiffusion(unet={**UNET, **unet_extra}, conditioner=conditioner, first_stage=FIRST_STAGE,
                            image_size=32, scale_factor=0.5, ema_decay=0.9)
    for p in model.unet.out.parameters():  # the zero-initialised output layer would make every sample noise-free
        torch.nn.init.normal_(p, std=0.1)
    with torch.no_grad():  # raw weights move away from the EMA copy, which keeps the initial ones
        for p in model.unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    torch.save({"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict(), "global_step": 1}, path)
    return str(path)


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory) -> str:
    return save_model(tmp_path_factory.mktemp("text") / "last.ckpt", TEXT, context_dim=32)


@pytest.fixture(scope="module")
def class_ckpt(tmp_path_factory) -> str:
    return save_model(tmp_path_factory.mktemp("class") / "last.ckpt", CLASSES, class_embed_dim=32)


def run_sample(*overrides: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    return subprocess.run([sys.executable, os.path.join(REPO, "sample.py"), *overrides],
                          capture_output=True, text=True, env=env, timeout=300)


def test_sample_py_writes_pngs_grid_and_records(tmp_path, text_ckpt):
    out = tmp_path / "out"
    proc = run_sample(f"ckpt={text_ckpt}", "prompt=a red circle at the top left", "n=3", "batch_size=2",
                      "sampling.sampler=dpmpp_2m", "sampling.steps=3", "sampling.cfg_scale=2", "sampling.seed=5",
                      "sampling.timestep_spacing=trailing", f"out={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = json.loads((out / "samples.json").read_text())
    assert [r["file"] for r in records] == ["00000.png", "00001.png", "00002.png"]
    assert [r["seed"] for r in records] == [5, 6, 7]
    assert all(r["prompt"] == "a red circle at the top left" and r["sampler"] == "dpmpp_2m" and r["steps"] == 3
               and r["cfg_scale"] == 2 and r["eta"] == 0 and r["ckpt"] == text_ckpt
               and r["timestep_spacing"] == "trailing" for r in records)
    with Image.open(out / "00001.png") as image:
        assert image.size == (32, 32)
    with Image.open(out / "grid.png") as grid:  # one row of n=3 images with 2-px padding
        assert grid.size == (2 + 3 * 34, 2 + 34)
    # per-step progress is logged, so it reaches a pipe (capture_output: no terminal): 2 batches x 3 steps
    assert "sampling batch 2/2 | step 3/3" in proc.stdout + proc.stderr


def test_each_sample_is_its_own_seed_whatever_the_batch(tmp_path, text_ckpt):
    model = load_latent_diffusion(text_ckpt)
    settings = SamplerSettings("ddim", steps=3, cfg_scale=3.0, seed=11)
    conditions = conditions_for(model, ["a blue square at the top", "a red circle at the left"], [], 2)
    generate_to_dir(model, conditions, str(tmp_path / "a"), settings, batch_size=4)
    generate_to_dir(model, conditions, str(tmp_path / "b"), settings, batch_size=1)
    def pixels(folder: str, i: int) -> np.ndarray:
        return np.asarray(Image.open(tmp_path / folder / f"{i:05d}.png"), dtype=np.int16)

    for i in range(4):  # equal up to float rounding of batched kernels: at most one grey level, rarely
        difference = np.abs(pixels("a", i) - pixels("b", i))
        assert difference.max() <= 1 and difference.mean() < 0.01
    assert np.abs(pixels("a", 0) - pixels("a", 1)).mean() > 1


def test_ema_weights_are_the_default(text_ckpt):
    ema = load_latent_diffusion(text_ckpt)
    raw = load_latent_diffusion(text_ckpt, use_ema=False)
    name = "input_blocks.0.0.weight"
    assert not torch.equal(ema.unet.state_dict()[name], raw.unet.state_dict()[name])


def test_class_model_samples_every_class_by_default(class_ckpt, tmp_path):
    proc = run_sample(f"ckpt={class_ckpt}", "n=1", "sampling.steps=2", f"out={tmp_path}/out")
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = json.loads((tmp_path / "out" / "samples.json").read_text())
    assert [r["class_label"] for r in records] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("case, overrides, message", [
    ("prompt to a class model", ["prompt=a red circle"], "class-conditional model"),
    ("class to a text model", ["class_label=3"], "text-conditioned model"),
    ("unknown sampler", ["prompt=a red circle", "sampling.sampler=euler"], "Unknown sampler 'euler'"),
    ("autoencoder checkpoint", ["prompt=a red circle"], "stage-1 autoencoder checkpoint"),
    ("missing checkpoint", ["prompt=a red circle"], "Checkpoint not found"),
    ("no samples", ["prompt=a red circle", "n=0"], "n=0: the number of samples per prompt"),
    ("empty batches", ["prompt=a red circle", "batch_size=0"], "batch_size=0: the number of images sampled"),
    ("negative guidance", ["prompt=a red circle", "sampling.cfg_scale=-1"], "cfg_scale=-1: classifier-free guidance takes"),
    ("guidance below one", ["prompt=a red circle", "sampling.cfg_scale=0.5"], "cfg_scale=0.5: classifier-free guidance"),
    ("fake safetensors", ["prompt=a red circle"], "is not a readable safetensors file"),
])
def test_bad_input_is_a_clear_error_and_nonzero_exit(tmp_path, text_ckpt, class_ckpt, case, overrides, message):
    ckpt = {"prompt to a class model": class_ckpt, "missing checkpoint": str(tmp_path / "nope.ckpt")}.get(case, text_ckpt)
    if case == "autoencoder checkpoint":
        ckpt = str(tmp_path / "ae.ckpt")
        torch.save({"hyper_parameters": {"vae": FIRST_STAGE}, "state_dict": {}}, ckpt)
    if case == "fake safetensors":  # a pickle renamed to .safetensors
        ckpt = str(tmp_path / "model.safetensors")
        torch.save({"state_dict": {}}, ckpt)
        message = f"'{ckpt}' is not a readable safetensors file"
    proc = run_sample(f"ckpt={ckpt}", *overrides, f"out={tmp_path}/out")
    assert proc.returncode == 2
    output = proc.stdout + proc.stderr  # Hydra's logging goes to stdout
    assert message in output
    assert "Traceback" not in output


def test_a_prompt_longer_than_the_context_is_warned_and_its_truncation_recorded(tmp_path, text_ckpt, caplog):
    model = load_latent_diffusion(text_ckpt)
    long_prompt = "a red circle at the top left next to a blue square " * 12  # > 77 tokens
    conditions = conditions_for(model, ["a red circle", long_prompt], [], 1)
    with caplog.at_level("WARNING"):
        settings = SamplerSettings("ddim", steps=1, cfg_scale=0)  # 0: unconditional, accepted
        records = generate_to_dir(model, conditions, str(tmp_path / "out"), settings)
    assert "longer than the text encoder's context of 77 tokens" in caplog.text
    saved = json.loads((tmp_path / "out" / "samples.json").read_text())
    assert "prompt_truncated_to" not in saved[0] and saved[0] == records[0]
    kept = saved[1]["prompt_truncated_to"]
    assert long_prompt.startswith(kept[:40]) and len(model.conditioner.tokenizer.encode(kept)) == 75


def _generate(model, prompt: str, cfg_scale: float, **kwargs) -> torch.Tensor:
    return model.generate([prompt] * 2, settings=SamplerSettings("ddim", steps=2, cfg_scale=cfg_scale, seed=3),
                          **kwargs)


def test_negative_prompt_replaces_the_empty_prompt_in_guidance(text_ckpt):
    model = load_latent_diffusion(text_ckpt, use_ema=False)
    torch.manual_seed(0)
    with torch.no_grad():  # cross-attention's zero-initialised output projection: make the text matter
        for p in model.unet.parameters():
            p.add_(0.1 * torch.randn_like(p))
    prompt, negative = "a red circle", "a blue square at the top"
    default = _generate(model, prompt, 3.0)
    # the empty prompt is the text models' null condition: as a negative prompt it changes nothing
    assert torch.equal(_generate(model, prompt, 3.0, negative_prompt=""), default)
    with_negative = _generate(model, prompt, 3.0, negative_prompt=negative)
    assert (with_negative - default).abs().mean() > 3e-4  # float rounding of batched kernels: ~1e-7
    # out = out(neg) + s (out(prompt) - out(neg)): at s = 0 only out(neg) is left, i.e. sampling the negative
    # prompt itself without guidance (equal up to the batched [uncond; cond] forward's rounding)
    torch.testing.assert_close(_generate(model, prompt, 0.0, negative_prompt=negative),
                               _generate(model, negative, 1.0), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="negative_prompt needs classifier-free guidance"):
        _generate(model, prompt, 1.0, negative_prompt=negative)


def test_negative_prompt_is_refused_by_a_class_model(class_ckpt):
    model = load_latent_diffusion(class_ckpt)
    with pytest.raises(ValueError, match="negative_prompt applies to text-conditioned models only"):
        model.generate(torch.tensor([1]), settings=SamplerSettings("ddim", steps=1, cfg_scale=2), negative_prompt="x")


def test_height_and_width_set_the_image_shape_and_must_fit_the_factor(tmp_path, text_ckpt, caplog):
    model = load_latent_diffusion(text_ckpt)
    settings = SamplerSettings("ddim", steps=2, cfg_scale=2)
    with caplog.at_level("INFO", logger="ldm.inference.sampling"):
        records = generate_to_dir(model, ["a red circle"], str(tmp_path / "out"), settings, height=16, width=40,
                                  negative_prompt="a green triangle", progress=True)
    with Image.open(tmp_path / "out" / "00000.png") as image:
        assert image.size == (40, 16)  # PIL: (width, height)
    assert records[0]["height"] == 16 and records[0]["width"] == 40
    assert records[0]["negative_prompt"] == "a green triangle"
    assert "sampling batch 1/1 | step 2/2" in caplog.text
    assert model.generate(["a"], settings=settings, image_size=(8, 12)).shape == (1, 3, 8, 12)
    with pytest.raises(ValueError, match="height=15 must be a positive multiple of the first stage's factor f=2"):
        generate_to_dir(model, ["a red circle"], str(tmp_path / "bad"), settings, height=15)
    assert not (tmp_path / "bad").exists()  # refused before anything is written
